"""Caption text: cleaning and the word-level vocabulary (`vocab.json`) that every caption architecture shares.

Special tokens have fixed ids so models, decoders and saved checkpoints agree without reading the file:
`<pad>` (0) fills captions up to --max-len and is masked out of the loss and attention; `<start>` (1) is the first
decoder input, the token generation begins from; `<end>` (2) is the last target, so the model learns where to stop;
`<unk>` (3) stands for words seen fewer than --min-freq times in the training split (or never).
"""
from __future__ import annotations

import json
import re
import unicodedata
from collections import Counter
from pathlib import Path
from typing import Iterable, Sequence

from hwtools.errors import UserError

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
PAD_ID, START_ID, END_ID, UNK_ID = 0, 1, 2, 3
SPECIALS = (PAD, START, END, UNK)
VOCAB_FILE = "vocab.json"

# Apostrophes and hyphens join their word ("girl's" -> "girls", "t-shirt" -> "tshirt"); other punctuation and
# symbols separate words; a token with a digit in it ("3", "2nd", "10:30") is dropped whole.
_JOINERS = re.compile(r"['’`\-]")
_SEPARATORS = re.compile(r"[^a-z0-9]+")


def clean_caption(text: str) -> list[str]:
    """Lower-case words of a caption, without punctuation, symbols, digits or stray one-letter tokens (except 'a')."""
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii").lower()
    words = _SEPARATORS.sub(" ", _JOINERS.sub("", text)).split()
    # One-letter leftovers are debris of tokenised contractions ("girl 's" -> "s").
    return [w for w in words if w.isalpha() and (len(w) > 1 or w == "a")]


def word_counts(captions: Iterable[str]) -> Counter:
    """Counts of cleaned words over captions."""
    counts = Counter()
    for c in captions:
        counts.update(clean_caption(c))
    return counts


def coverage(counts: Counter, min_freq: int) -> dict:
    """How much of the text a vocabulary cut at min_freq keeps: word types kept and share of tokens covered."""
    kept = {w: n for w, n in counts.items() if n >= min_freq}
    total = sum(counts.values())
    return {"types": len(counts), "types_kept": len(kept),
            "token_coverage": sum(kept.values()) / total if total else 0.0}


class Vocab:
    """Word <-> id mapping with the four specials first; encodes to fixed-length ids plus a padding mask."""

    def __init__(self, itos: Sequence[str], min_freq: int = 1):
        if tuple(itos[: len(SPECIALS)]) != SPECIALS:
            raise ValueError(f"vocabulary must start with {SPECIALS}, got {tuple(itos[:4])}")
        self.itos = list(itos)
        self.stoi = {w: i for i, w in enumerate(self.itos)}
        self.min_freq = min_freq

    @classmethod
    def build(cls, captions: Iterable[str], min_freq: int = 1) -> "Vocab":
        """Vocabulary of cleaned words seen at least min_freq times, most frequent first (ties alphabetical)."""
        if min_freq < 1:
            raise UserError(f"--min-freq must be >= 1, got {min_freq}")
        counts = word_counts(captions)
        words = sorted((w for w, n in counts.items() if n >= min_freq), key=lambda w: (-counts[w], w))
        return cls(list(SPECIALS) + words, min_freq=min_freq)

    def __len__(self) -> int:
        return len(self.itos)

    def __eq__(self, other) -> bool:
        return isinstance(other, Vocab) and self.itos == other.itos

    def save(self, path) -> Path:
        """Write vocab.json (path may be the file or its folder)."""
        path = Path(path)
        if path.suffix != ".json":
            path = path / VOCAB_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"min_freq": self.min_freq, "specials": list(SPECIALS), "itos": self.itos},
                                   ensure_ascii=False, indent=0), encoding="utf-8")
        return path

    @classmethod
    def load(cls, path) -> "Vocab":
        """Read a vocab.json written by save (path may be the file or its folder)."""
        path = Path(path)
        if path.is_dir():
            path = path / VOCAB_FILE
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return cls(data["itos"], min_freq=int(data.get("min_freq", 1)))
        except FileNotFoundError:
            raise UserError(f"{path}: vocabulary file not found") from None
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"{path}: not a hwtools vocab.json ({str(e).splitlines()[0]})") from None

    def encode(self, text: str, max_len: int) -> tuple[list[int], list[bool]]:
        """<start> words <end>, padded with <pad> to max_len; mask is True on real tokens (specials included).

        A caption longer than max_len is cut, but its last position still holds <end>, so the model keeps learning to
        stop instead of being taught that captions never end.
        """
        if max_len < 2:
            raise UserError(f"--max-len must be >= 2 to hold <start> and <end>, got {max_len}")
        ids = [START_ID] + [self.stoi.get(w, UNK_ID) for w in clean_caption(text)]
        ids = ids[: max_len - 1] + [END_ID]
        n = len(ids)
        return ids + [PAD_ID] * (max_len - n), [True] * n + [False] * (max_len - n)

    def decode(self, ids: Iterable, keep_unk: bool = False) -> str:
        """Words of ids up to the first <end>; specials dropped (<unk> kept as '<unk>' only when keep_unk)."""
        words = []
        for i in ids:
            i = int(i)
            if not 0 <= i < len(self.itos):  # a model with a larger output layer than this vocabulary
                i = UNK_ID
            if i == END_ID:
                break
            if i in (PAD_ID, START_ID) or (i == UNK_ID and not keep_unk):
                continue
            words.append(self.itos[i])
        return " ".join(words)
