"""Telling a hub id from a local path, the one rule both data loaders and the model loader use."""
from __future__ import annotations

import re

_HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")


def looks_like_hub_id(name: str, file_suffixes: tuple[str, ...] = ()) -> bool:
    """`owner/name` (or a bare legacy `name`); never a path (./, /, ~) or a file name ending in `file_suffixes`."""
    return (bool(_HUB_ID.fullmatch(name)) and not name.startswith((".", "/", "~"))
            and not name.lower().endswith(file_suffixes))
