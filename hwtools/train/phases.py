"""Wall time per phase of a run (load, base_eval, train, final_eval, save) and progress bars for the phases that are
not the training loop, so a run never sits silent for minutes."""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable

from tqdm.auto import tqdm

PHASES = ("load", "base_eval", "train", "final_eval", "save")


class PhaseTimer:
    """Wall seconds per named phase: `timer.begin("train")` ends the running phase and starts the next (a recipe
    marks where each phase starts), or `with timer("train"): ...`; repeated names add up."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._running: tuple[str, float] | None = None

    def begin(self, name: str) -> None:
        """End the running phase (if any) and start `name`."""
        self.end()
        self._running = (name, time.perf_counter())

    def end(self) -> None:
        """End the running phase (no-op when none runs)."""
        if self._running is not None:
            name, start = self._running
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
            self._running = None

    @contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def as_dict(self) -> dict[str, float]:
        """summary.json's resources.phases: seconds per phase, in PHASES order, then any other phase; ends the
        running phase."""
        self.end()
        order = [p for p in PHASES if p in self.seconds] + [p for p in self.seconds if p not in PHASES]
        return {p: round(self.seconds[p], 1) for p in order}

    def line(self) -> str:
        """One line for the end of a run: 'phases (s): load 12.0, base_eval 80.3, ... (total 600.1)'."""
        d = self.as_dict()
        return "phases (s): " + ", ".join(f"{k} {v:.1f}" for k, v in d.items()) + f" (total {sum(d.values()):.1f})"


def progress(total: int, desc: str, unit: str, enabled: bool = True):
    """A tqdm bar with counts (e.g. 'base answers: 8/15 answers'); a no-op bar when not enabled (other ranks)."""
    return tqdm(total=total, desc=desc, unit=f" {unit}", disable=not enabled, dynamic_ncols=True)


def counting(fn: Callable, bar) -> Callable:
    """`fn` that ticks `bar` once per call: a loss function evaluated once per batch gets a progress bar without
    the evaluation loop knowing about it."""
    def counted(*args, **kwargs):
        out = fn(*args, **kwargs)
        bar.update(1)
        return out

    return counted

