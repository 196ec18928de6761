"""Counts of rows read, used and skipped (by reason): the `data_report` block of summary.json."""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)


@dataclass
class DataReport:
    """Accumulates what a loader did with each row; skipped rows are counted by reason, never fatal."""

    rows_read: int = 0
    rows_used: int = 0
    skipped_by_reason: Counter = field(default_factory=Counter)
    # first place each reason was seen ("file:row"), so the warning can point at a real example
    first_seen: dict = field(default_factory=dict)

    def skip(self, reason: str, where: str = "") -> None:
        self.skipped_by_reason[reason] += 1
        self.first_seen.setdefault(reason, where)

    @property
    def rows_skipped(self) -> int:
        return sum(self.skipped_by_reason.values())

    def merge(self, other: "DataReport") -> "DataReport":
        self.rows_read += other.rows_read
        self.rows_used += other.rows_used
        self.skipped_by_reason.update(other.skipped_by_reason)
        for k, v in other.first_seen.items():
            self.first_seen.setdefault(k, v)
        return self

    def warn(self, log: logging.Logger = logger) -> None:
        """One warning line per skip reason."""
        for reason, n in sorted(self.skipped_by_reason.items()):
            where = self.first_seen.get(reason)
            log.warning("skipped %d row(s): %s%s", n, reason, f" (first at {where})" if where else "")

    def as_dict(self) -> dict:
        return {
            "rows_read": self.rows_read,
            "rows_used": self.rows_used,
            "rows_skipped": self.rows_skipped,
            "skipped_by_reason": dict(sorted(self.skipped_by_reason.items())),
        }
