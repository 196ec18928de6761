import os

# Set before anything imports huggingface_hub: a late setting costs ~23 s of DNS retries per lookup.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402 - after the environment above

from hwtools.train.accelerate_state import reset_accelerate  # noqa: E402
from tests.tiny_models import TINY_ARCHS, save_tiny_model  # noqa: E402


# ------------------------------------------------------------------------------------- fixtures shared by modules
@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    """{arch: folder} of a saved tiny model and tokenizer for every arch in TINY_ARCHS."""
    root = tmp_path_factory.mktemp("tiny")
    return {arch: save_tiny_model(arch, root / arch) for arch in TINY_ARCHS}


@pytest.fixture(scope="module")
def tiny_gemma2(tmp_path_factory):
    """The folder of a saved tiny Gemma-2, for modules that need no other arch."""
    return save_tiny_model("gemma2", tmp_path_factory.mktemp("tiny") / "gemma2")


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """The folder of a saved tiny Llama."""
    return save_tiny_model("llama", tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture(scope="session")
def caption_cache(tmp_path_factory):
    """The embedded Flickr8k-layout set and feature cache, shared by every caption run of the session."""
    from hwtools.caption import synthetic

    path = tmp_path_factory.getbasetemp() / "hwtools-cache"  # one per session: generation is atomic and idempotent
    synthetic.ensure_embedded(path)
    return path


# ---- accelerate's process-wide state
@pytest.fixture
def fresh_accelerate():
    """A test that builds Accelerators (a recipe's main(), the loop) starts and ends as a fresh process would:
    accelerate's process-wide state is forgotten before and after it."""
    reset_accelerate()
    yield
    reset_accelerate()
