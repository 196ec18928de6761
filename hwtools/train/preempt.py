"""Preemption: SIGTERM, SIGINT and SIGUSR1 are only recorded; the loop stops at the next optimizer step boundary.

Clusters send SIGTERM on preemption (SLURM can send SIGUSR1 before a time limit), Ctrl-C sends SIGINT. A handler that
only sets a flag lets the step in progress and the checkpoint write finish; a second signal is recorded too, so it
cannot interrupt the save either.
"""
from __future__ import annotations

import signal
import threading
from typing import Optional

import torch

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class StopSignals:
    """Context manager: while inside, the stop signals set `self.received` (the first one's number) instead of
    killing the process; the previous handlers come back on exit."""

    def __init__(self):
        self.received: Optional[int] = None
        self.count = 0
        self._previous = {}

    def _record(self, signum, frame) -> None:
        self.count += 1
        if self.received is None:
            self.received = signum

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():  # Python only lets the main thread set handlers
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._record)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def agreed(self, accelerator) -> Optional[int]:
        """The signal to stop on if any rank received one, the same on every rank (one small all-reduce: a max over
        ranks of the signal number, 0 for none)."""
        local = self.received or 0
        if accelerator.num_processes == 1:
            return local or None
        flag = torch.tensor(local, dtype=torch.int64, device=accelerator.device)
        return int(accelerator.reduce(flag, reduction="max").item()) or None


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name
