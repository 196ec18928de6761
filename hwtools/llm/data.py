"""Chat data (SlimOrca and its Persian translation): loading, validation, splits, label masking, packing, collation.

The conversation column is found by what it holds, whatever its name: cells that are lists of turns with role/content
(`universitytehran/SlimOrca`'s `message`, OpenAI-style) or from/value (`Open-Orca/SlimOrca`'s ShareGPT
`conversations`). Internal form: a conversation is a list of turns `{"role": "system"|"user"|"assistant",
"content": str}` with at most one leading system turn, then user/assistant alternating, ending with an assistant turn.
"""
from __future__ import annotations

import bisect
import hashlib
import json
from pathlib import Path

import torch

from hwtools.data_report import DataReport
from hwtools.config import EMBEDDED
from hwtools.errors import UserError
from hwtools.hub import looks_like_hub_id
from hwtools.llm.templates import render_chat

ASSETS = Path(__file__).parent / "assets"
EMBEDDED_TRAIN = ASSETS / "persian_slimorca_train.jsonl"
# fixed held-out part: its first user questions never occur in the train file (checked by the tests)
EMBEDDED_TEST = ASSETS / "persian_slimorca_test.jsonl"
DATA_SUFFIXES = (".jsonl", ".json", ".parquet")
IGNORE_INDEX = -100
_UNPARSEABLE = object()  # marks a JSON Lines line that did not parse

ROLE_ALIASES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
}

# column names tried when no column's cells look like turns yet (e.g. every row of a tiny file is malformed)
CONVERSATION_COLUMNS = ("conversations", "messages", "message", "conversation")
ROLE_KEYS, TEXT_KEYS = ("from", "role"), ("value", "content")
# files a hub download or a `datasets` export holds beside the data that are not rows
METADATA_FILES = ("dataset_info.json", "dataset_infos.json", "dataset_dict.json", "state.json")

# skip reasons, as they appear in summary.json's data_report
BAD_JSON = "line is not valid JSON"
NOT_OBJECT = "row is not a JSON object"
NO_CONVERSATIONS = "no conversations list"
EMPTY_CONVERSATIONS = "empty conversations"
BAD_TURN = "turn is not an object"
UNKNOWN_ROLE = "unknown role"
NON_STRING_VALUE = "non-string value"
EMPTY_VALUE = "empty value"
NO_ASSISTANT = "no assistant turn"
BAD_ORDER = "turn order cannot be rendered"
TEMPLATE_FAILED = "chat template cannot render it"
TOO_LONG = "too long even after truncating to the first exchange"
NO_LABEL = "no trainable assistant token"


# ----------------------------------------------------------------------------------------------------- validation
def _is_turn(value) -> bool:
    return isinstance(value, dict) and any(k in value for k in ROLE_KEYS) and any(k in value for k in TEXT_KEYS)


def _holds_turns(cell) -> bool:
    """A cell that is a list of turns (some may be null or broken: that row is then skipped by reason)."""
    return isinstance(cell, list) and any(_is_turn(t) for t in cell)


def conversation_column(rows, source: str) -> str:
    """The column whose cells hold lists of turns in the most rows (`message`, `conversations`, ...); else a column
    with a known name; else a one-line UserError naming the columns seen and what was expected."""
    votes, seen = {}, {}
    for _, row in rows:
        if isinstance(row, dict):
            for key, cell in row.items():
                seen.setdefault(key, None)
                if _holds_turns(cell):
                    votes[key] = votes.get(key, 0) + 1
    if votes:
        return max(votes, key=lambda k: (votes[k], k in CONVERSATION_COLUMNS))
    known = [k for k in CONVERSATION_COLUMNS if k in seen]
    if known:
        return known[0]
    if not seen:  # no object rows at all: let the per-row reasons say why
        return CONVERSATION_COLUMNS[0]
    raise UserError(
        f"{source}: no column holds conversations (columns seen: {', '.join(map(str, seen))}); expected a column "
        f"whose cells are lists of turns with role/content or from/value, like SlimOrca's `message` or "
        f"`conversations`")


def _turns_cell(row: dict, column: str):
    if column in row:
        return row[column]
    # rows of another file in the same folder may name the column differently
    return next((cell for cell in row.values() if _holds_turns(cell)), None)


def normalize_conversation(row, column: str | None = None) -> list[dict] | str:
    """One raw row -> turns, or the skip reason. `column` holds the turns (default: found in the row itself); turns
    are from/value (ShareGPT) or role/content (OpenAI). Empty system turns and a trailing unanswered user turn are
    dropped."""
    if not isinstance(row, dict):
        return NOT_OBJECT
    if column is None:
        column = next((k for k, c in row.items() if _holds_turns(c)), None) or \
            next((k for k in CONVERSATION_COLUMNS if k in row), None)
    raw = _turns_cell(row, column) if column else None
    if not isinstance(raw, list):
        return NO_CONVERSATIONS
    if not raw:
        return EMPTY_CONVERSATIONS
    turns = []
    for turn in raw:
        if not isinstance(turn, dict):
            return BAD_TURN
        # a struct column gives every key (null where unset): take the first key that has a value
        role = next((turn[k] for k in ROLE_KEYS if turn.get(k) is not None), None)
        value = next((turn[k] for k in TEXT_KEYS if turn.get(k) is not None), None)
        if not isinstance(role, str) or role.strip().lower() not in ROLE_ALIASES:
            return UNKNOWN_ROLE
        role = ROLE_ALIASES[role.strip().lower()]
        if not isinstance(value, str):
            return NON_STRING_VALUE
        if not value.strip():
            if role == "system":  # SlimOrca has rows with an empty system prompt: same as none
                continue
            return EMPTY_VALUE
        turns.append({"role": role, "content": value})
    if not any(t["role"] == "assistant" for t in turns):
        return NO_ASSISTANT
    body = turns[1:] if turns[0]["role"] == "system" else turns
    if any(t["role"] != ("user" if i % 2 == 0 else "assistant") for i, t in enumerate(body)):
        return BAD_ORDER
    if body[-1]["role"] == "user":
        turns = turns[:-1]
    return turns


# -------------------------------------------------------------------------------------------------------- loading
def _rows_from_jsonl(path: Path):
    """(where, row) pairs, row `_UNPARSEABLE` for a bad line; no parseable line at all: not JSON Lines."""
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise UserError(f"{path}: file is empty")
    parsed_any, first_error = False, None
    rows = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((f"{path}:{n}", json.loads(line)))
            parsed_any = True
        except json.JSONDecodeError as e:
            first_error = first_error or f"line {n}: {e.msg}"
            rows.append((f"{path}:{n}", _UNPARSEABLE))
    if not parsed_any:
        raise UserError(f"{path}: not JSON Lines ({first_error})")
    return rows


def _rows_from_json(path: Path):
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise UserError(f"{path}: file is empty")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # one object per line under a .json name (what `datasets` writes by default)
            return _rows_from_jsonl(path)
        raise UserError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None
    if isinstance(data, dict) and not any(_holds_turns(v) or k in CONVERSATION_COLUMNS for k, v in data.items()):
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise UserError(f"{path}: expected a list of rows (or an object holding one list of rows)")
        data = lists[0]
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a list of rows, got {type(data).__name__}")
    return [(f"{path}:{i + 1}", row) for i, row in enumerate(data)]


def _rows_from_parquet(path: Path):
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises ArrowInvalid/OSError for non-parquet bytes
        raise UserError(f"{path}: not a readable parquet file ({type(e).__name__})") from None
    return [(f"{path}:{i + 1}", row) for i, row in enumerate(rows)]


def _rows_from_file(path: Path):
    readers = {".jsonl": _rows_from_jsonl, ".json": _rows_from_json, ".parquet": _rows_from_parquet}
    if path.suffix.lower() not in readers:
        raise UserError(f"{path}: unsupported file type (use .jsonl, .json or .parquet)")
    return readers[path.suffix.lower()](path)


def _data_files(folder: Path) -> list[Path]:
    """Data files under a folder: not the card (README.md), not metadata, not hidden download state
    (`huggingface-cli download --local-dir` keeps `.cache/huggingface/` beside the data)."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in DATA_SUFFIXES
                  and p.name not in METADATA_FILES
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def _rows_from_folder(folder: Path, files: list[Path] | None = None):
    files = _data_files(folder) if files is None else files
    if not files:
        raise UserError(f"{folder}: folder holds no .jsonl, .json or .parquet file")
    return [r for f in files for r in _rows_from_file(f)]


def _hub_snapshot(repo_id: str) -> Path | None:
    """The data set repo's files: downloaded online, from the local HF hub cache offline; None if neither works."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, repo_type="dataset",
                                      allow_patterns=[f"*{suffix}" for suffix in DATA_SUFFIXES]))
    except Exception:  # offline and not cached, unknown id, gated: `datasets` gets the next try
        return None


def _rows_from_hub(repo_id: str):
    # The repo's own parquet/jsonl files first (hub cache or download): what `huggingface-cli download` also gives,
    # and no `datasets` cache needed offline; `datasets` for anything else (other formats, its own cache).
    snapshot = _hub_snapshot(repo_id)
    files = _data_files(snapshot) if snapshot is not None else []
    if files:
        return _rows_from_folder(snapshot, files)
    import datasets

    try:
        ds = datasets.load_dataset(repo_id)
    except Exception as e:  # offline + not cached, unknown id, gated: all one user-facing message
        raise UserError(
            f"cannot load data set '{repo_id}' from the hub ({type(e).__name__}; offline or not cached?): "
            f"download it where there is internet (hf download {repo_id} --repo-type dataset "
            f"--local-dir DIR) and pass --data path/to/file.jsonl|.parquet or that DIR"
        ) from None
    rows = []
    for split in ds:  # the Persian SlimOrca has one split, 'train'
        rows.extend((f"{repo_id}[{split}]:{i + 1}", row) for i, row in enumerate(ds[split]))
    return rows


def read_rows(data: str) -> list[tuple[str, object]]:
    """Raw rows of `data` as (where, row) pairs, where = "file:row"; unparseable JSON Lines lines included."""
    if data == EMBEDDED:
        return _rows_from_jsonl(EMBEDDED_TRAIN) + _rows_from_jsonl(EMBEDDED_TEST)
    path = Path(data).expanduser()
    if path.is_dir():
        return _rows_from_folder(path)
    if path.is_file():
        return _rows_from_file(path)
    if looks_like_hub_id(data, DATA_SUFFIXES):
        return _rows_from_hub(data)
    raise UserError(f"{data}: no such file or folder (and not a hub id like owner/name)")


def load_conversations(data: str, report: DataReport) -> list[list[dict]]:
    """`embedded`, a local .jsonl/.json/.parquet file or folder of them, or a hub id -> validated conversations.
    Bad rows are skipped and counted in `report`; no usable row at all is a UserError naming the source."""
    return conversations_from_rows(read_rows(data), report, data)


def conversations_from_rows(rows, report: DataReport, source: str) -> list[list[dict]]:
    """Validate read_rows() output into conversations (see load_conversations)."""
    column = conversation_column(rows, source)
    convs = []
    for where, row in rows:
        report.rows_read += 1
        turns = BAD_JSON if row is _UNPARSEABLE else normalize_conversation(row, column)
        if isinstance(turns, str):
            report.skip(turns, where)
        else:
            convs.append(turns)
    report.rows_used += len(convs)
    if not convs:
        reasons = ", ".join(f"{r}: {n}" for r, n in sorted(report.skipped_by_reason.items()))
        raise UserError(f"{source}: no usable conversation in {report.rows_read} row(s) ({reasons or 'no rows'})")
    return convs


# --------------------------------------------------------------------------------------------------------- splits
def _question_key(turns: list[dict]) -> str:
    return next(t["content"] for t in turns if t["role"] == "user").strip()


def _split_rank(seed: int, key: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}\x00{key}".encode()).digest()[:8], "big")


def split_conversations(convs, val_frac: float = 0.05, test_frac: float = 0.05, seed: int = 42) -> dict[str, list]:
    """Deterministic train/validation/test split (same in every process: sha256, not Python's hash).
    Conversations are grouped by their first user message, so a question never lands in two splits."""
    if val_frac < 0 or test_frac < 0 or val_frac + test_frac >= 1:
        raise UserError(f"split fractions must be >= 0 and leave room for train (val {val_frac}, test {test_frac})")
    groups: dict[str, list[int]] = {}
    for i, turns in enumerate(convs):
        groups.setdefault(_question_key(turns), []).append(i)
    order = sorted(groups, key=lambda k: _split_rank(seed, k))
    n = len(convs)
    # a non-zero fraction of a small data set still gets one conversation
    want = {s: max(1, round(f * n)) if f > 0 and n >= 3 else 0
            for s, f in (("test", test_frac), ("validation", val_frac))}
    chosen = {"train": [], "validation": [], "test": []}
    for key in order:
        split = next((s for s in ("test", "validation") if len(chosen[s]) < want[s]), "train")
        chosen[split].extend(groups[key])
    return {s: [convs[i] for i in sorted(idx)] for s, idx in chosen.items()}


def load_splits(
    data: str, report: DataReport, val_frac: float = 0.05, test_frac: float = 0.05, seed: int = 42
) -> dict[str, list]:
    """load_conversations + split_conversations; `embedded` keeps its fixed test file as the test split (test_frac
    is then unused) and carves validation out of its train file."""
    if data != "embedded":
        return split_conversations(load_conversations(data, report), val_frac, test_frac, seed)
    train = load_conversations(str(EMBEDDED_TRAIN), report)
    test = load_conversations(str(EMBEDDED_TEST), report)
    splits = split_conversations(train, val_frac=val_frac, test_frac=0.0, seed=seed)
    splits["test"] = test
    return splits


# ---------------------------------------------------------------------------------------------- masking/tokenising
def render_segments(tokenizer, turns: list[dict]) -> list[tuple[str, bool]] | str:
    """Split the rendered conversation into (text, is_assistant_reply) pieces; a reply piece runs from the end of
    the generation prompt through its end-of-turn token. Returns a skip reason if the template cannot do it."""
    segments, done = [], ""
    for i, turn in enumerate(turns):
        if turn["role"] != "assistant":
            continue
        try:
            prompt = render_chat(tokenizer, turns[:i], add_generation_prompt=True)
            # the reply piece stops at the end-of-turn token: the newline after it is prompt, not answer
            through = render_chat(tokenizer, turns[: i + 1]).rstrip()
        except UserError:
            raise
        except Exception:  # jinja TemplateError from the template's own raise_exception
            return TEMPLATE_FAILED
        # templates that rewrite earlier turns (e.g. strip reasoning) cannot be masked by prefix rendering
        if not prompt.startswith(done) or not through.startswith(prompt) or len(through) == len(prompt):
            return TEMPLATE_FAILED
        segments += [(prompt[len(done):], False), (through[len(prompt):], True)]
        done = through
    return segments


def tokenize_conversation(tokenizer, turns: list[dict], max_length: int) -> dict | str:
    """Turns -> {"input_ids", "labels"} with labels only on assistant replies and their end-of-turn token, or the
    skip reason. Too long: keep the longest run of whole exchanges that fits (at least the first one)."""
    segments = render_segments(tokenizer, turns)
    if isinstance(segments, str):
        return segments
    # each piece is tokenised on its own so the prompt ends exactly as it does at generation time
    pieces = tokenizer([text for text, _ in segments], add_special_tokens=False)["input_ids"]
    input_ids, labels, reply_ends = [], [], []
    for (_, trainable), ids in zip(segments, pieces):
        input_ids += ids
        labels += ids if trainable else [IGNORE_INDEX] * len(ids)
        if trainable:
            reply_ends.append(len(input_ids))
    if len(input_ids) > max_length:
        fitting = [end for end in reply_ends if end <= max_length]
        if not fitting:
            return TOO_LONG
        input_ids, labels = input_ids[: fitting[-1]], labels[: fitting[-1]]
    if all(label == IGNORE_INDEX for label in labels):
        return NO_LABEL
    return {"input_ids": input_ids, "labels": labels}


def tokenize_all(tokenizer, convs, max_length: int, report: DataReport) -> list[dict]:
    """Tokenise every conversation; unusable ones move from rows_used to the skipped counts of `report`."""
    out = []
    for i, turns in enumerate(convs):
        example = tokenize_conversation(tokenizer, turns, max_length)
        if isinstance(example, str):
            report.skip(example, f"conversation {i + 1}")
            report.rows_used -= 1
        else:
            out.append(example)
    if convs and not out:
        reasons = ", ".join(f"{r}: {n}" for r, n in sorted(report.skipped_by_reason.items()))
        raise UserError(f"no usable conversation after tokenising with max_length {max_length} ({reasons})")
    return out


# ------------------------------------------------------------------------------------------------ packing/batches
def pack_examples(examples: list[dict], block_size: int) -> list[dict]:
    """Best-fit-decreasing packing into blocks of at most block_size tokens; position_ids restart at 0 for every
    example, which is what lets the model keep attention inside each example (see collate_packed)."""
    too_long = [len(e["input_ids"]) for e in examples if len(e["input_ids"]) > block_size]
    if too_long:
        raise UserError(f"an example has {max(too_long)} tokens, more than block size {block_size}: raise it")
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]["input_ids"]))
    blocks: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (room left, block index)
    for i in order:
        n = len(examples[i]["input_ids"])
        at = bisect.bisect_left(free, (n, -1))
        if at < len(free):
            room, b = free.pop(at)
        else:
            room, b = block_size, len(blocks)
            blocks.append([])
        blocks[b].append(i)
        if room - n > 0:
            bisect.insort(free, (room - n, b))
    packed = []
    for members in blocks:
        block = {"input_ids": [], "labels": [], "position_ids": [], "seq_lens": []}
        for i in sorted(members):
            ex = examples[i]
            block["input_ids"] += ex["input_ids"]
            block["labels"] += ex["labels"]
            block["position_ids"] += list(range(len(ex["input_ids"])))
            block["seq_lens"].append(len(ex["input_ids"]))
        packed.append(block)
    return packed


def collate_packed(batch: list[dict], pad_id: int) -> dict:
    """Packed blocks -> input_ids, labels, position_ids (B, L), num_tokens (real tokens, an int), loss_index (see
    loss_index); no attention_mask.

    transformers 5 builds the block-diagonal causal mask itself from position ids that restart at 0 (eager, sdpa,
    flex), and keeps Gemma's sliding windows per example. That happens only when attention_mask is None and no KV
    cache exists: call the model with `use_cache=False`. Flash-attention reads packed sequences from position ids
    only in a batch of one row: with more rows its examples would attend across each other, so use
    collate_flattened there. A hand-made 4D mask
    is no substitute: eager attention adds it (a bool mask is wrong there) and it replaces Gemma's sliding window.
    Padding is one more short "example" (positions from 0, labels -100) so it never mixes with real tokens."""
    length = max(len(b["input_ids"]) for b in batch)
    ids, labels, pos = [], [], []
    for b in batch:
        pad = length - len(b["input_ids"])
        ids.append(b["input_ids"] + [pad_id] * pad)
        labels.append(b["labels"] + [IGNORE_INDEX] * pad)
        pos.append(b["position_ids"] + list(range(pad)))
    labels = torch.tensor(labels)
    return {"input_ids": torch.tensor(ids), "labels": labels, "position_ids": torch.tensor(pos),
            "num_tokens": sum(len(b["input_ids"]) for b in batch), "loss_index": loss_index(labels)}


def collate_padded(batch: list[dict], pad_id: int) -> dict:
    """Unpacked examples -> right-padded input_ids, labels (-100 on padding), 2D attention_mask, num_tokens (an int),
    loss_index."""
    length = max(len(b["input_ids"]) for b in batch)
    ids, labels, mask = [], [], []
    for b in batch:
        n, pad = len(b["input_ids"]), length - len(b["input_ids"])
        ids.append(b["input_ids"] + [pad_id] * pad)
        labels.append(b["labels"] + [IGNORE_INDEX] * pad)
        mask.append([1] * n + [0] * pad)
    labels = torch.tensor(labels)
    return {"input_ids": torch.tensor(ids), "labels": labels, "attention_mask": torch.tensor(mask),
            "num_tokens": sum(len(b["input_ids"]) for b in batch), "loss_index": loss_index(labels)}


def length_grouped_sampler(examples: list[dict], batch_size: int, seed: int):
    """Batch sampler (DataLoader(batch_sampler=...)) for the no-packing path: batches of similar lengths, in a new
    seeded order each epoch (transformers' LengthGroupedSampler order, cut into consecutive batches)."""
    from torch.utils.data import BatchSampler
    from transformers.trainer_pt_utils import LengthGroupedSampler

    generator = torch.Generator().manual_seed(seed)
    order = LengthGroupedSampler(batch_size, lengths=[len(e["input_ids"]) for e in examples], generator=generator)
    return BatchSampler(order, batch_size, drop_last=False)


def collate_flattened(batch: list[dict], pad_id: int) -> dict:
    """Packed blocks -> ONE row (1, total tokens) of input_ids, labels, position_ids restarting per example, and
    num_tokens, loss_index and the varlen kernel's cu_seq_lens_q/k, max_length_q/k; no padding, no attention_mask.
    Flash-attention's variable-length path (a batch of one row whose position ids restart) keeps every example to
    itself; pad_id is unused (the signature of collate_packed)."""
    ids = [t for b in batch for t in b["input_ids"]]
    labels = torch.tensor([[t for b in batch for t in b["labels"]]])
    positions = [t for b in batch for t in b["position_ids"]]
    # the example boundaries flash-attention's varlen kernel needs, made here on the CPU (as TRL's collator does):
    # from position ids on the device transformers would wait for the device in every layer
    bounds = [i for i, p in enumerate(positions) if p == 0] + [len(positions)]
    cu = torch.tensor(bounds, dtype=torch.int32)
    longest = max(b - a for a, b in zip(bounds, bounds[1:]))
    return {"input_ids": torch.tensor([ids]), "labels": labels, "position_ids": torch.tensor([positions]),
            "num_tokens": len(ids), "loss_index": loss_index(labels), "cu_seq_lens_q": cu, "cu_seq_lens_k": cu,
            "max_length_q": longest, "max_length_k": longest}


def loss_index(labels: torch.Tensor) -> torch.Tensor:
    """Flat indices (row * length + position) of the positions whose next token is a label, in row-major order.

    Computed by the collate function on the CPU, so the loss picks its rows on the device with no host sync (a
    boolean mask or a count of labels there would wait for the device every micro-batch)."""
    rows, pos = (labels[:, 1:] != IGNORE_INDEX).nonzero(as_tuple=True)
    return rows * labels.shape[1] + pos
