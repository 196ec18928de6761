"""The end both recipes share: the test loss with a progress bar, and the run's closing files (loss.png,
summary.json) and tracker entries."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from hwtools.train.loop import evaluate
from hwtools.train.phases import PhaseTimer, counting, progress
from hwtools.train.tracking import read_metrics, write_summary


def evaluate_test_loss(accelerator, model, loader, loss_fn: Callable, desc: str) -> Optional[float]:
    """The loop's evaluate() over a prepared loader, with a progress bar counting batches (the loss function ticks
    it once per batch)."""
    bar = progress(len(loader), desc, "batches", enabled=accelerator.is_local_main_process)
    try:
        return evaluate(accelerator, model, loader, counting(loss_fn, bar))
    finally:
        bar.close()


def write_run_end(run_dir: Path, tracker, result, phases: PhaseTimer, test: dict, title: str, **summary) -> dict:
    """Main process only: loss.png from metrics.jsonl (logged to the tracker), summary.json with the loop's
    result, the phases and `summary`'s blocks, the numeric test scores logged, the summary handed to the tracker."""
    from hwtools.plots import run_loss_curves  # matplotlib only where a run ends

    plot = run_loss_curves(read_metrics(run_dir), Path(run_dir) / "loss.png", title=title)
    tracker.log_images("plots", [plot], step=result.steps)
    out = write_summary(
        run_dir, resources={**result.resources, "phases": phases.as_dict()},
        train={"steps": result.steps, "final_loss": result.final_loss, "stopped_reason": result.stopped_reason},
        eval={"loss": result.eval_loss}, test=test, **summary)
    tracker.log({"step": result.steps, "split": "test",
                 **{k: v for k, v in test.items() if isinstance(v, (int, float))}})
    tracker.summarize(out)
    return out
