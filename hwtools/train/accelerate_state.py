"""accelerate keeps process-wide singletons (AcceleratorState, GradientState): a second run in one process (tests,
benchmarks comparing variants, Trainer building its own Accelerator) must forget them to start as a fresh run."""
from __future__ import annotations


def reset_accelerate() -> None:
    """Forget accelerate's process-wide state, so the next Accelerator is built as in a fresh process."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
