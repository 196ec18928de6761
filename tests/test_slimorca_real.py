"""The Persian SlimOrca as the hub ships it (`universitytehran/SlimOrca`: one parquet file, column `message` =
list<struct<content, role>>), in every form a user can hold it: the hub id from the local HF cache offline, the
`huggingface-cli download --local-dir` folder, the parquet file, jsonl/json exports; and the English
`Open-Orca/SlimOrca` ShareGPT schema. Bad rows of the real schema are skipped and counted; the good ones train."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hwtools.data_report import DataReport
from hwtools.errors import UserError
from hwtools.llm import data as D
from tests.tiny_models import save_tiny_model

ROOT = Path(__file__).resolve().parents[1]
REPO_ID = "universitytehran/SlimOrca"
PARQUET_NAME = "data/train-00000-of-00001.parquet"
# exactly the hub's schema: one column, a list of {content, role} structs, every field nullable
HUB_SCHEMA = pa.schema([("message", pa.list_(pa.struct([("content", pa.string()), ("role", pa.string())])))])
ENGLISH_SCHEMA = pa.schema([("conversations", pa.list_(pa.struct(
    [("from", pa.string()), ("value", pa.string()), ("weight", pa.float64())])))])
OPENAI_ROLES = {"system": "system", "human": "user", "gpt": "assistant"}
N_GOOD = 40


def persian_rows(n: int = N_GOOD) -> list[dict]:
    """Real Persian conversations of the shipped sample, rewritten as the hub's rows (OpenAI roles, no weight)."""
    rows = []
    for line in D.EMBEDDED_TRAIN.read_text(encoding="utf-8").splitlines()[:n]:
        turns = json.loads(line)["conversations"]
        rows.append({"message": [{"content": t["value"], "role": OPENAI_ROLES[t["from"]]} for t in turns]})
    # SlimOrca rows often carry an empty system prompt: the same as none, not a bad row
    rows[4]["message"].insert(0, {"content": "", "role": "system"})
    return rows


GOOD_TURN = {"content": "پایتخت ایران کجاست؟", "role": "user"}
ANSWER = {"content": "تهران.", "role": "assistant"}
# one bad row of each kind the parquet schema allows, and the reason it is counted under
BAD_ROWS = [
    ({"message": [GOOD_TURN, None]}, D.BAD_TURN),                                        # null struct
    ({"message": [{"content": "سلام", "role": None}, ANSWER]}, D.UNKNOWN_ROLE),          # null role field
    ({"message": [{"content": None, "role": "user"}, ANSWER]}, D.NON_STRING_VALUE),      # null content field
    ({"message": []}, D.EMPTY_CONVERSATIONS),                                             # empty list
    ({"message": None}, D.NO_CONVERSATIONS),                                              # null cell
    ({"message": [{"content": "سلام", "role": "tool"}, ANSWER]}, D.UNKNOWN_ROLE),         # a role chat models lack
]


def hub_rows() -> list[dict]:
    good = persian_rows()
    rows = good[:10] + [r for r, _ in BAD_ROWS[:3]] + good[10:25] + [r for r, _ in BAD_ROWS[3:]] + good[25:]
    return rows


def expected_report(n_good: int = N_GOOD) -> dict:
    skipped = {}
    for _, reason in BAD_ROWS:
        skipped[reason] = skipped.get(reason, 0) + 1
    return {"rows_read": n_good + len(BAD_ROWS), "rows_used": n_good, "rows_skipped": len(BAD_ROWS),
            "skipped_by_reason": dict(sorted(skipped.items()))}


def write_hub_parquet(path: Path, rows=None, schema=HUB_SCHEMA) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(hub_rows() if rows is None else rows, schema=schema), path)
    return path


CARD = "---\nlicense: mit\nlanguage:\n- fa\n---\n# SlimOrca (Persian)\nA Persian translation of SlimOrca.\n"


def local_dir_download(root: Path) -> Path:
    """What `huggingface-cli download universitytehran/SlimOrca --repo-type dataset --local-dir root` leaves."""
    write_hub_parquet(root / PARQUET_NAME)
    (root / "README.md").write_text(CARD, encoding="utf-8")
    (root / ".gitattributes").write_text("*.parquet filter=lfs diff=lfs merge=lfs -text\n")
    meta = root / ".cache" / "huggingface" / "download"
    (meta / "data").mkdir(parents=True)
    (meta / "data" / "train-00000-of-00001.parquet.metadata").write_text("0123abcd\n0123abcd\n1700000000.0\n")
    (meta / "README.md.metadata").write_text("0123abcd\n0123abcd\n1700000000.0\n")
    return root


def fake_hub_cache(hub_cache: Path, repo_id: str = REPO_ID) -> Path:
    """The HF hub cache as a download leaves it: blobs named by hash, refs/main, snapshots/<commit>/ symlinks."""
    repo = hub_cache / f"datasets--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    staging = hub_cache.parent / "staging"
    files = {PARQUET_NAME: write_hub_parquet(staging / PARQUET_NAME), "README.md": staging / "README.md"}
    files["README.md"].write_text(CARD, encoding="utf-8")
    (repo / "blobs").mkdir(parents=True)
    for rel, src in files.items():
        blob = hashlib.sha256(src.read_bytes()).hexdigest()
        (repo / "blobs" / blob).write_bytes(src.read_bytes())
        link = repo / "snapshots" / commit / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(repo / "blobs" / blob, link.parent))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return repo


def _load(source) -> tuple[list, dict]:
    report = DataReport()
    convs = D.load_conversations(str(source), report)
    return convs, report.as_dict()


# ------------------------------------------------------------------------------------------------------ loading
def test_hub_schema_bad_rows_are_skipped_and_counted_by_reason(tmp_path):
    path = write_hub_parquet(tmp_path / PARQUET_NAME)
    assert pq.read_schema(path).equals(HUB_SCHEMA)  # exactly what the hub holds
    convs, report = _load(path)
    assert report == expected_report()
    assert len(convs) == N_GOOD
    assert all(t["role"] in ("system", "user", "assistant") and t["content"].strip() for c in convs for t in c)
    assert convs[4][0]["role"] == "user"  # the empty system prompt was dropped, the row kept
    # the same conversations as the ShareGPT rows they came from
    sharegpt = [json.loads(x) for x in D.EMBEDDED_TRAIN.read_text(encoding="utf-8").splitlines()[:N_GOOD]]
    assert convs == [D.normalize_conversation(r) for r in sharegpt]


def test_every_form_of_the_download_gives_the_same_conversations(tmp_path):
    import datasets

    folder = local_dir_download(tmp_path / "SlimOrca")
    parquet = folder / PARQUET_NAME
    ds = datasets.Dataset.from_parquet(str(parquet), cache_dir=str(tmp_path / "ds-cache"))
    ds.to_json(tmp_path / "export.jsonl", force_ascii=False)          # one object per line
    ds.to_json(tmp_path / "export.json", lines=False, force_ascii=False)  # one JSON array
    with_extras = tmp_path / "extras.parquet"  # extra columns, and the turns not in the first column
    pq.write_table(pa.Table.from_pylist([{"id": i, "source": "orca", **r} for i, r in enumerate(hub_rows())]),
                   with_extras)
    expected, _ = _load(parquet)
    for source in (folder, parquet, tmp_path / "export.jsonl", tmp_path / "export.json", with_extras):
        convs, report = _load(source)
        assert convs == expected, source
        assert report == expected_report(), source  # the card and the .cache/ download state are not rows


def test_english_sharegpt_schema_still_loads(tmp_path):
    rows = [json.loads(x) for x in D.EMBEDDED_TRAIN.read_text(encoding="utf-8").splitlines()[:12]]
    rows[3]["conversations"][0]["value"] = None  # a null field in the struct column
    pq.write_table(pa.Table.from_pylist(rows, schema=ENGLISH_SCHEMA), tmp_path / "oo.parquet")
    (tmp_path / "oo.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8")
    for name in ("oo.parquet", "oo.jsonl"):
        convs, report = _load(tmp_path / name)
        assert report["rows_used"] == 11 and report["skipped_by_reason"] == {D.NON_STRING_VALUE: 1}, name
        assert convs[0] == D.normalize_conversation(rows[0])


@pytest.mark.parametrize("column", ["message", "messages", "conversations", "conversation", "dialogue"])
def test_the_column_is_found_by_what_it_holds(tmp_path, column):
    rows = [{"id": i, "lang": "fa", column: r["message"]} for i, r in enumerate(persian_rows(5))]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    convs, report = _load(tmp_path / "d.parquet")
    assert len(convs) == 5 and report["rows_skipped"] == 0


def test_no_conversation_column_names_the_columns_seen(tmp_path):
    path = tmp_path / "qa.parquet"
    pq.write_table(pa.Table.from_pylist([{"id": 1, "question": "سلام", "answer": "درود"}]), path)
    with pytest.raises(UserError) as e:
        _load(path)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg
    assert "columns seen: id, question, answer" in msg and "role/content or from/value" in msg


# ------------------------------------------------------------------------------------------------- through CLI
def test_hub_id_from_the_offline_cache_trains_through_the_cli(tmp_path):
    """`--data universitytehran/SlimOrca` with HF_HUB_OFFLINE=1 and the repo in the HF cache: the real CLI in a
    fresh process (the hub cache location is read at import), a tiny model, 2 steps."""
    from hwtools.llm.evaluate import TEST_PROMPTS

    hf_home = tmp_path / "hf"
    fake_hub_cache(hf_home / "hub")
    model = save_tiny_model("gemma2", tmp_path / "gemma2")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(TEST_PROMPTS.read_text(encoding="utf-8").splitlines(True)[0], encoding="utf-8")
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    env.pop("HF_HUB_CACHE", None)
    argv = ["--method", "lora", "--model", model, "--data", REPO_ID, "--prompts-file", prompts, "--output-dir", out,
            "--max-steps", 2, "--batch-size", 2, "--max-length", 192, "--log-every", 1, "--chrf-samples", 0,
            "--gen-max-new-tokens", 2, "--report-to", "none", "--cache-dir", tmp_path / "cache"]
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "train_llm.py"), *map(str, argv)],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["data"] == REPO_ID
    assert summary["data_report"] == expected_report()
    assert summary["train"]["steps"] == 2 and summary["params"]["trainable"] > 0
    assert (out / "final" / "adapter_model.safetensors").stat().st_size > 0
    for reason in expected_report()["skipped_by_reason"]:
        assert f"row(s): {reason} (first at" in proc.stderr  # one warning per reason, naming where
    assert f"{PARQUET_NAME}:11" in proc.stderr  # the first bad row (after 10 good ones), by file and row
