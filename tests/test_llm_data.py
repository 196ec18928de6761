"""Chat data: loading and validation (with a data_report), splits, the embedded Persian set, packing, collation."""
from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from hwtools.data_report import DataReport
from hwtools.errors import UserError
from hwtools.llm import data as D

REPO = Path(__file__).resolve().parents[1]


def _sys(v):
    return {"from": "system", "value": v, "weight": None}


def _h(v):
    return {"from": "human", "value": v, "weight": 0.0}


def _g(v):
    return {"from": "gpt", "value": v, "weight": 1.0}


GOOD = {"conversations": [_sys("You are helpful."), _h("سلام؟"), _g("سلام!")]}


def _write_malformed(path: Path) -> None:
    """One row of every kind the loader must handle, in the order of the expected counts below."""
    lines = [
        json.dumps(GOOD, ensure_ascii=False),                                               # 1 ok
        json.dumps({"messages": [{"role": "user", "content": "a?"},
                                 {"role": "assistant", "content": "b"}]}),                  # 2 ok (role/content)
        json.dumps({"conversations": [_sys(""), _h("q"), _g("a")]}),                        # 3 ok (empty system)
        json.dumps({"conversations": [{"from": "user", "value": "q"},
                                      {"from": "model", "value": "a"}]}),                   # 4 ok (aliases)
        json.dumps({"conversations": [_h("q"), _g("a"), _h("unanswered")]}),                # 5 ok (trailing user)
        '{"conversations": [ {"from": "human", "value": "cut off',                          # 6 bad JSON
        "[1, 2, 3]",                                                                        # 7 not an object
        json.dumps({"id": 7, "text": "no conversations"}),                                  # 8 no conversations
        json.dumps({"conversations": []}),                                                  # 9 empty
        json.dumps({"conversations": ["hello", "hi"]}),                                     # 10 turn not object
        json.dumps({"conversations": [{"from": "bot", "value": "q"}, _g("a")]}),            # 11 unknown role
        json.dumps({"conversations": [_h(42), _g("a")]}),                                   # 12 non-string
        json.dumps({"conversations": [_h("   "), _g("a")]}),                                # 13 empty value
        json.dumps({"conversations": [_sys("s"), _h("q")]}),                                # 14 no assistant
        json.dumps({"conversations": [_g("a"), _h("q"), _g("b")]}),                         # 15 assistant first
        json.dumps({"conversations": [_h("q"), _h("q2"), _g("a")]}),                        # 16 two user turns
        json.dumps({"conversations": [_h("q"), _sys("late system"), _g("a")]}),             # 17 system mid-way
        "",                                                                                 # blank: not a row
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


EXPECTED_SKIPS = {
    D.BAD_JSON: 1, D.NOT_OBJECT: 1, D.NO_CONVERSATIONS: 1, D.EMPTY_CONVERSATIONS: 1, D.BAD_TURN: 1,
    D.UNKNOWN_ROLE: 1, D.NON_STRING_VALUE: 1, D.EMPTY_VALUE: 1, D.NO_ASSISTANT: 1, D.BAD_ORDER: 3,
}


# ---------------------------------------------------------------------------------------------------- loading
def test_malformed_rows_are_counted_by_reason(tmp_path):
    path = tmp_path / "bad.jsonl"
    _write_malformed(path)
    report = DataReport()
    convs = D.load_conversations(str(path), report)
    assert report.as_dict() == {"rows_read": 17, "rows_used": 5, "rows_skipped": 12,
                                "skipped_by_reason": dict(sorted(EXPECTED_SKIPS.items()))}
    assert report.first_seen[D.BAD_JSON] == f"{path}:6"
    assert report.first_seen[D.BAD_ORDER] == f"{path}:15"
    assert convs[0] == [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "سلام؟"},
                        {"role": "assistant", "content": "سلام!"}]
    assert convs[1] == [{"role": "user", "content": "a?"}, {"role": "assistant", "content": "b"}]
    assert convs[2] == convs[3] == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert convs[4] == convs[2]  # the unanswered trailing user turn is dropped


def test_tokenisation_skips_join_the_same_report(tmp_path):
    """The whole path of a run: load, split, tokenise; rows too long move from used to skipped."""
    from hwtools.llm.templates import GEMMA_CHAT_TEMPLATE

    path = tmp_path / "bad.jsonl"
    _write_malformed(path)
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps({"conversations": [_h("long " * 200), _g("a")]}) + "\n")
    report = DataReport()
    convs = D.load_conversations(str(path), report)
    examples = D.tokenize_all(_char_tokenizer(GEMMA_CHAT_TEMPLATE), convs, max_length=300, report=report)
    assert len(examples) == 5
    assert report.rows_read == 18 and report.rows_used == 5 and report.rows_skipped == 13
    assert report.skipped_by_reason[D.TOO_LONG] == 1


def test_no_usable_row_names_the_file(tmp_path):
    path = tmp_path / "useless.jsonl"
    path.write_text(json.dumps({"conversations": []}) + "\n" + json.dumps({"conversations": [_h("q")]}) + "\n")
    with pytest.raises(UserError, match=r"useless\.jsonl: no usable conversation in 2 row\(s\)") as e:
        D.load_conversations(str(path), DataReport())
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name,content,message", [
    ("empty.jsonl", "", "file is empty"),
    ("table.jsonl", "a,b,c\n1,2,3\n", "not JSON Lines"),
    ("broken.json", '{"conversations": [', "not valid JSON"),
    ("notparquet.parquet", "PAR1 not really", "not a readable parquet file"),
    ("data.csv", "a,b\n", "unsupported file type"),
])
def test_unreadable_files_are_one_line_user_errors(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(UserError, match=message) as e:
        D.load_conversations(str(path), DataReport())
    assert name in str(e.value) and "\n" not in str(e.value)


def test_json_parquet_and_folder_loading(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [GOOD, {"conversations": [_h("دو به علاوه‌ی دو؟"), _g("۴"), _h("و سه؟"), _g("۵")]}]
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.json").write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    # parquet as the hub stores SlimOrca: a list of structs with a nullable float weight
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d" / "b.parquet")
    (tmp_path / "d" / "sub").mkdir()
    (tmp_path / "d" / "sub" / "c.jsonl").write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    (tmp_path / "d" / "notes.txt").write_text("ignored")
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"data": rows}), encoding="utf-8")

    expected = [D.normalize_conversation(r) for r in rows]
    for source in ("d/a.json", "d/b.parquet", "d/sub/c.jsonl", "wrapped.json"):
        report = DataReport()
        assert D.load_conversations(str(tmp_path / source), report) == expected, source
        assert report.rows_used == 2
    report = DataReport()
    assert D.load_conversations(str(tmp_path / "d"), report) == expected * 3
    assert report.as_dict()["rows_read"] == 6
    assert len(expected[1]) == 4  # a multi-turn row keeps all its turns


def test_missing_path_and_offline_hub_id_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        D.load_conversations(str(tmp_path / "nope.jsonl"), DataReport())
    with pytest.raises(UserError, match=r"cannot load data set 'nobody/persian-slimorca'.*--data path/to/file"):
        D.load_conversations("nobody/persian-slimorca", DataReport())


def test_role_aliases():
    row = {"messages": [{"role": "SYSTEM", "content": "s"}, {"role": "Human", "content": "q"},
                        {"role": "gpt", "content": "a"}, {"role": "user", "content": "q2"},
                        {"role": "model", "content": "a2"}, {"role": "human", "content": "q3"},
                        {"role": "assistant", "content": "a3"}]}
    assert [t["role"] for t in D.normalize_conversation(row)] == ["system"] + ["user", "assistant"] * 3


# ---------------------------------------------------------------------------------------------------- splits
def _convs(n):
    return [[{"role": "user", "content": f"question {i % (n - 7)}"}, {"role": "assistant", "content": f"a{i}"}]
            for i in range(n)]


def _keys(convs):
    """First user questions (what the split groups by)."""
    return {next(t["content"] for t in c if t["role"] == "user") for c in convs}


def test_splits_are_deterministic_disjoint_and_sized():
    convs = _convs(400)  # seven questions occur twice
    s1, s2 = D.split_conversations(convs), D.split_conversations(list(convs))
    assert s1 == s2
    assert sum(len(v) for v in s1.values()) == 400
    assert 19 <= len(s1["validation"]) <= 21 and 19 <= len(s1["test"]) <= 21
    assert not (_keys(s1["train"]) & _keys(s1["test"])) and not (_keys(s1["train"]) & _keys(s1["validation"]))
    assert not (_keys(s1["validation"]) & _keys(s1["test"]))
    other = D.split_conversations(convs, seed=7)
    assert other["test"] != s1["test"]
    sizes = D.split_conversations(convs, val_frac=0.2, test_frac=0.1)
    assert 79 <= len(sizes["validation"]) <= 81 and 39 <= len(sizes["test"]) <= 41
    with pytest.raises(UserError):
        D.split_conversations(convs, val_frac=0.6, test_frac=0.5)


def test_splits_identical_in_another_process():
    """Another interpreter (its own PYTHONHASHSEED) must carve the same split."""
    code = ("import json,hashlib,sys; sys.path.insert(0, %r); from hwtools.llm import data as D; "
            "from tests.test_llm_data import _convs; "
            "print(hashlib.sha256(json.dumps(D.split_conversations(_convs(400))).encode()).hexdigest())") % str(REPO)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "12345", "PATH": "/usr/bin:/bin"}, cwd=REPO)
    here = hashlib.sha256(json.dumps(D.split_conversations(_convs(400))).encode()).hexdigest()
    assert out.stdout.strip() == here


# ------------------------------------------------------------------------------------------------- embedded
def _jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_embedded_set_is_slimorca_schema_and_big_enough():
    rows = _jsonl(D.EMBEDDED_TRAIN) + _jsonl(D.EMBEDDED_TEST)
    assert len(rows) >= 600 and len(_jsonl(D.EMBEDDED_TEST)) >= 50
    assert D.EMBEDDED_TRAIN.stat().st_size + D.EMBEDDED_TEST.stat().st_size < 2_000_000
    for row in rows:
        assert list(row) == ["conversations"]
        for turn in row["conversations"]:
            assert list(turn) == ["from", "value", "weight"]
            assert turn["from"] in ("system", "human", "gpt")
            assert (turn["weight"] is None) == (turn["from"] == "system")
    report = DataReport()
    assert len(D.load_conversations("embedded", report)) == len(rows)
    assert report.rows_skipped == 0
    multi = sum(sum(t["from"] == "gpt" for t in r["conversations"]) > 1 for r in rows)
    no_system = sum(r["conversations"][0]["from"] != "system" for r in rows)
    empty_system = sum(r["conversations"][0] == _sys("") for r in rows)
    english = sum(bool(re.search(r"[A-Za-z]{4}", r["conversations"][-1]["value"])) for r in rows)
    steps = sum("گام" in r["conversations"][0]["value"] for r in rows if r["conversations"][0]["from"] == "system")
    assert multi >= 30 and no_system >= 30 and empty_system >= 30 and english >= 50 and steps >= 50
    text = D.EMBEDDED_TRAIN.read_text(encoding="utf-8")
    assert "\u064a" not in text and "\u0643" not in text  # Persian ی and ک, not the Arabic letters
    assert text.count("؟") > 300 and text.count("،") > 100 and text.count("\u200c") > 1000


def test_embedded_test_questions_never_occur_in_train():
    asked = lambda rows: {t["value"] for r in rows for t in r["conversations"] if t["from"] == "human"}  # noqa: E731
    assert not asked(_jsonl(D.EMBEDDED_TRAIN)) & asked(_jsonl(D.EMBEDDED_TEST))
    splits = D.load_splits("embedded", DataReport())
    assert splits["test"] == D.load_conversations(str(D.EMBEDDED_TEST), DataReport())
    user = lambda convs: {t["content"] for c in convs for t in c if t["role"] == "user"}  # noqa: E731
    assert not user(splits["test"]) & (user(splits["train"]) | user(splits["validation"]))
    assert not _keys(splits["train"]) & _keys(splits["validation"])
    assert len(splits["train"]) + len(splits["validation"]) == len(_jsonl(D.EMBEDDED_TRAIN))


def test_embedded_set_regenerates_identically(tmp_path):
    from hwtools.llm import embedded_data

    embedded_data.write(tmp_path / "train.jsonl", tmp_path / "test.jsonl")
    assert (tmp_path / "train.jsonl").read_bytes() == D.EMBEDDED_TRAIN.read_bytes()
    assert (tmp_path / "test.jsonl").read_bytes() == D.EMBEDDED_TEST.read_bytes()


_FA = str.maketrans("۰۱۲۳۴۵۶۷۸۹−×÷", "0123456789-*/")
_ARITH = set("۰۱۲۳۴۵۶۷۸۹٬+−×÷() ")


def _value(expr: str):
    expr = expr.strip()
    if expr.count("(") > expr.count(")"):
        expr = expr[expr.rfind("(") + 1:]
    if expr.count(")") > expr.count("("):
        expr = expr[: expr.find(")")]
    expr = expr.replace("٬", "").translate(_FA).strip()
    if not re.fullmatch(r"[\d+\-*/() ]*\d[\d+\-*/() ]*", expr):
        return None
    try:
        return eval(expr, {"__builtins__": {}})  # digits and operators only (checked above)
    except SyntaxError:
        return None


def test_embedded_arithmetic_is_correct():
    """Every `left = right` between Persian-digit expressions in an answer holds."""
    checked = 0
    for row in _jsonl(D.EMBEDDED_TRAIN) + _jsonl(D.EMBEDDED_TEST):
        for turn in row["conversations"]:
            if turn["from"] != "gpt":
                continue
            for line in turn["value"].split("\n"):
                parts = line.split(" = ")
                for left, right in zip(parts, parts[1:]):
                    i = len(left)
                    while i > 0 and left[i - 1] in _ARITH:
                        i -= 1
                    j = 0
                    while j < len(right) and right[j] in _ARITH:
                        j += 1
                    a, b = _value(left[i:]), _value(right[:j])
                    if a is not None and b is not None:
                        assert abs(a - b) < 1e-9, f"{line!r}"
                        checked += 1
    assert checked > 500


# --------------------------------------------------------------------------------------------------- packing
def _examples(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(5, 120, (n,), generator=g).tolist()
        prompt = max(1, n // 3)  # the first third is prompt: no labels, as tokenize_conversation makes them
        out.append({"input_ids": ids, "labels": [D.IGNORE_INDEX] * prompt + ids[prompt:]})
    return out


def test_pack_examples_fills_blocks_and_restarts_positions():
    examples = _examples([30, 5, 17, 12, 9, 31, 3, 20, 8])
    blocks = D.pack_examples(examples, block_size=32)
    assert sum(len(b["seq_lens"]) for b in blocks) == len(examples)
    assert all(len(b["input_ids"]) <= 32 for b in blocks)
    assert len(blocks) == 5  # 135 tokens: 5 blocks of 32 is the minimum
    for b in blocks:
        assert len(b["input_ids"]) == len(b["labels"]) == len(b["position_ids"]) == sum(b["seq_lens"])
        assert b["position_ids"] == [p for n in b["seq_lens"] for p in range(n)]
    seen = sorted(tuple(b["input_ids"][s:s + n]) for b in blocks for s, n in zip(
        [sum(b["seq_lens"][:k]) for k in range(len(b["seq_lens"]))], b["seq_lens"]))
    assert seen == sorted(tuple(e["input_ids"]) for e in examples)
    with pytest.raises(UserError, match="more than block size"):
        D.pack_examples(examples, block_size=16)


def test_collators_pad_and_mask():
    blocks = D.pack_examples(_examples([6, 4, 9]), block_size=10)
    batch = D.collate_packed(blocks, pad_id=0)
    assert set(batch) == {"input_ids", "labels", "position_ids", "num_tokens", "loss_index"}
    assert batch["input_ids"].shape == batch["position_ids"].shape == (2, 10)
    assert batch["num_tokens"] == 19 and isinstance(batch["num_tokens"], int)  # an int: no device sync to count
    # loss_index: the flat positions whose next token is a label, as a boolean mask of the shifted labels finds them
    keep = batch["labels"][:, 1:] != D.IGNORE_INDEX
    assert batch["loss_index"].tolist() == [r * 10 + p for r in range(2) for p in range(9) if keep[r, p]]
    assert 0 < len(batch["loss_index"]) < 18
    short = min(range(2), key=lambda r: len(blocks[r]["input_ids"]))
    pad = 10 - len(blocks[short]["input_ids"])
    assert batch["labels"][short, -pad:].eq(D.IGNORE_INDEX).all()
    assert batch["position_ids"][short, -pad:].tolist() == list(range(pad))  # padding is its own "example"
    padded = D.collate_padded(_examples([6, 4, 9]), pad_id=0)
    assert padded["attention_mask"].tolist()[1] == [1] * 4 + [0] * 5
    assert padded["labels"][1, 4:].eq(D.IGNORE_INDEX).all() and int(padded["num_tokens"]) == 19


def _tiny(kind):
    import transformers as T

    common = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, max_position_embeddings=256, attn_implementation="eager")
    torch.manual_seed(0)
    if kind == "llama":
        config = T.LlamaConfig(**common)
    elif kind == "gemma2":
        config = T.Gemma2Config(**common, sliding_window=8)
    else:
        config = T.Gemma3TextConfig(**common, sliding_window=8)
    return T.AutoModelForCausalLM.from_config(config).eval()


def _per_example_losses(logits, labels, spans):
    out = []
    for row, start, n in spans:
        lg, lb = logits[row, start:start + n - 1], labels[row, start + 1:start + n]
        out.append(F.cross_entropy(lg, lb, ignore_index=D.IGNORE_INDEX).item())
    return out


@pytest.mark.parametrize("kind", ["gemma2", "llama", "gemma3"])
def test_packed_and_unpacked_batches_give_the_same_loss(kind):
    model = _tiny(kind)
    examples = _examples([21, 7, 30, 12, 16, 9, 25, 5])
    with torch.no_grad():
        padded = D.collate_padded(examples, pad_id=0)
        ref = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"], use_cache=False).logits
        ref_loss = _per_example_losses(ref, padded["labels"], [(i, 0, len(e["input_ids"]))
                                                               for i, e in enumerate(examples)])
        blocks = D.pack_examples(examples, block_size=40)
        assert any(len(b["seq_lens"]) > 1 for b in blocks)
        batch = D.collate_packed(blocks, pad_id=0)
        # what the training loop passes: no attention_mask, position ids restarting per example, no KV cache
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        spans, order = [], []
        for r, b in enumerate(blocks):
            start = 0
            for n in b["seq_lens"]:
                spans.append((r, start, n))
                order.append(next(i for i, e in enumerate(examples) if e["input_ids"] == b["input_ids"][start:start + n]))
                start += n
        packed_loss = _per_example_losses(logits, batch["labels"], spans)
        for i, loss in zip(order, packed_loss):
            assert loss == pytest.approx(ref_loss[i], abs=1e-5)
        # the same blocks with attention crossing example boundaries give other losses: the test can fail
        leaky = model(input_ids=batch["input_ids"], use_cache=False).logits
        leaky_loss = _per_example_losses(leaky, batch["labels"], spans)
        assert max(abs(a - b) for a, b in zip(leaky_loss, packed_loss)) > 1e-3


def test_length_grouped_batches_are_seeded_and_group_lengths():
    from torch.utils.data import DataLoader

    n = 330  # transformers groups within mega-batches of up to 50 batches, at least 4 of them
    examples = _examples([5 + (i * 37) % 90 for i in range(n)])
    sampler = D.length_grouped_sampler(examples, batch_size=8, seed=3)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 42 and sorted(i for b in batches for i in b) == list(range(n))
    assert batches == list(D.length_grouped_sampler(examples, batch_size=8, seed=3))
    assert batches != list(D.length_grouped_sampler(examples, batch_size=8, seed=4))
    assert list(sampler) != batches  # the next epoch gets a new order
    lengths = [len(e["input_ids"]) for e in examples]

    def padding(batch_list):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batch_list)

    assert padding(batches) < padding([list(range(k, min(k + 8, n))) for k in range(0, n, 8)]) / 3
    loader = DataLoader(examples, batch_sampler=sampler, collate_fn=lambda b: D.collate_padded(b, pad_id=0))
    assert sum(int(b["num_tokens"]) for b in loader) == sum(lengths)


# ----------------------------------------------------------------------------------------------- explore CLI
def _char_tokenizer(template):
    """A tiny byte-level BPE with Gemma's turn tokens (enough to count and mask tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"])
    tok.train_from_iterator(D.EMBEDDED_TEST.read_text(encoding="utf-8").splitlines(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   extra_special_tokens=["<start_of_turn>", "<end_of_turn>"])
    fast.chat_template = template
    return fast


def _explore_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("explore_llm_data", REPO / "launch" / "explore_llm_data.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(mod)
    return mod


def test_explore_with_a_tokenizer_writes_histogram_and_stats(tmp_path, capsys):
    from hwtools.llm.templates import GEMMA_CHAT_TEMPLATE

    _char_tokenizer(GEMMA_CHAT_TEMPLATE).save_pretrained(tmp_path / "tok")
    explore = _explore_module()
    explore.main(["--data", "embedded", "--tokenizer", str(tmp_path / "tok"), "--output-dir", str(tmp_path / "out"),
                  "--max-length", "128"])
    printed = capsys.readouterr().out
    assert "schema:" in printed and "tokens per conversation" in printed and printed.count("--- sample") == 3
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    n = len(_jsonl(D.EMBEDDED_TRAIN)) + len(_jsonl(D.EMBEDDED_TEST))
    assert stats["data_report"]["rows_used"] == n
    turns = sum(len(r["conversations"]) for r in _jsonl(D.EMBEDDED_TRAIN) + _jsonl(D.EMBEDDED_TEST))
    assert stats["schema"]["turn_keys"] == {"from": turns, "value": turns, "weight": turns}
    assert stats["schema"]["roles"]["human"] == stats["schema"]["roles"]["gpt"]
    assert stats["splits"]["test"] == len(_jsonl(D.EMBEDDED_TEST))
    assert stats["tokens"]["template_failures"] == 0
    assert 0.1 < stats["tokens"]["label_token_share"] < 0.9
    assert stats["tokens"]["tokens"]["p50"] <= stats["tokens"]["tokens"]["p100"]
    assert (tmp_path / "out" / "token_lengths.png").stat().st_size > 5000
    # what the report quotes: samples, the rendered template with its trained text marked, one epoch's shape
    assert len(stats["samples"]) == 3 and stats["rendered_sample"].count("⟦") >= 1
    epoch = stats["train_epoch"]
    assert 0 < epoch["examples"] <= stats["splits"]["train"] and epoch["batch_size"] == 8
    assert epoch["packed_steps"] == -(-epoch["packed_blocks"] // 8) < epoch["padded_steps"] == -(-epoch["examples"] // 8)
    assert epoch["label_tokens"] < epoch["tokens"] <= epoch["packed_blocks"] * 128


def test_explore_without_tokenizer_and_on_bad_data(tmp_path, capsys):
    explore = _explore_module()
    explore.main(["--tokenizer", "none", "--output-dir", str(tmp_path / "out")])
    assert "token statistics need a tokenizer" in capsys.readouterr().out
    assert (tmp_path / "out" / "char_lengths.png").is_file()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"conversations": []}) + "\n")
    with pytest.raises(SystemExit) as e:
        explore.main(["--data", str(bad), "--tokenizer", "none", "--output-dir", str(tmp_path / "o2")])
    assert e.value.code == 2
    assert "bad.jsonl: no usable conversation" in capsys.readouterr().err
