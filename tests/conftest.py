import os

# Set before anything imports huggingface_hub: a late setting costs ~23 s of DNS retries per lookup.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# ---- accelerate's process-wide state (imported after the settings above; the module imports accelerate lazily)
import pytest  # noqa: E402

from hwtools.train.accelerate_state import reset_accelerate  # noqa: E402


@pytest.fixture
def fresh_accelerate():
    """A test that builds Accelerators (a recipe's main(), the loop) starts and ends as a fresh process would:
    accelerate's process-wide state is forgotten before and after it."""
    reset_accelerate()
    yield
    reset_accelerate()
