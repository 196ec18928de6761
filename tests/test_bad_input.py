"""Bad input as a new user meets it, through both recipes: malformed rows and images are skipped and counted in
summary.json, user mistakes end with exit status 2 and one `error:` line (no traceback), an existing run is never
touched without --overwrite, and over-long conversations / captions never become rows without a trainable label."""
import hashlib
import importlib.util
import io
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from hwtools.llm import data as D
from hwtools.train.accelerate_state import reset_accelerate
from tests.tiny_models import build_tiny_tokenizer, one_torch_thread, save_tiny_model  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
GOOD_ROWS = 60  # real rows of the shipped Persian set; the longest is 141 tiny-tokenizer tokens, under --max-length
MAX_LENGTH = 192


# ------------------------------------------------------------------------------------------------------ helpers
def recipe(name: str):
    """launch/<name>.py as a module, imported once (the imports are paid for once per test session)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "launch" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses resolve string annotations through the module
        spec.loader.exec_module(module)
    return sys.modules[name]


def run_recipe(name: str, argv: list) -> int:
    """Run a recipe's main() in this process as its CLI would; return the exit status."""
    reset_accelerate()
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    # log to this test's captured stderr, as the CLI logs to its stderr (main()'s own basicConfig is then a no-op)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root.handlers, root.level = [handler], logging.INFO
    try:
        recipe(name).main([str(a) for a in argv])
    except SystemExit as e:
        return e.code
    finally:
        root.handlers, root.level = saved
    return 0


def assert_user_error(code: int, err: str, fragment: str, only_line: bool = False) -> str:
    """Exit 2 and exactly one `error:` line, the last thing on stderr, containing `fragment`; no traceback.
    only_line: the error came before any other output, so stderr is that one line."""
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert code == 2, err[-2000:]
    assert len(errors) == 1 and lines[-1] == errors[0], lines[-5:]
    assert fragment in errors[0], errors[0]
    assert "Traceback" not in err
    if only_line:
        assert lines == errors, lines
    return errors[0]


def snapshot(root: Path) -> dict:
    """Every path under root with, for files, mtime and content hash: equal snapshots = nothing touched."""
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            if p.is_file() else "dir" for p in root.rglob("*")}


def _h(v):
    return {"from": "human", "value": v, "weight": 0.0}


def _g(v):
    return {"from": "gpt", "value": v, "weight": 1.0}


def _sys(v):
    return {"from": "system", "value": v, "weight": None}


# Persian conversations longer than --max-length (192 tiny-tokenizer tokens), by where the length is
LONG_QUESTION = {"conversations": [_h("لطفاً این متن را بخوان و خلاصه کن: " + "کتاب خواندن ذهن را روشن می‌کند. " * 40),
                                   _g("خلاصه: کتاب خوب است.")]}
LONG_SYSTEM = {"conversations": [_sys("به پرسش‌های کاربر به زبان فارسی، دقیق و کامل پاسخ بده. " * 30),
                                 _h("سلام!"), _g("سلام! چطور می‌توانم کمکت کنم؟")]}
LONG_ANSWER = {"conversations": [_h("از یک تا صد بشمار."), _g("یک، دو، سه، چهار، پنج، شش، هفت، هشت، نه، ده. " * 30)]}
# the first exchange fits: kept, cut after it (the long second answer is dropped whole, never cut mid-answer)
LONG_SECOND_EXCHANGE = {"conversations": [_h("پایتخت ایران کجاست؟"), _g("تهران."),
                                          _h("از یک تا صد بشمار."), _g("یک، دو، سه، چهار، پنج. " * 60)]}


def malformed_lines() -> list[str]:
    """One row of every malformed kind the SlimOrca loader knows, in Persian where it has text."""
    dumps = lambda row: json.dumps(row, ensure_ascii=False)  # noqa: E731
    return [
        '{"conversations": [{"from": "human", "value": "سلام',                              # cut-off JSON line
        "[1, 2, 3]",                                                                         # not an object
        dumps({"id": 7, "text": "بدون گفتگو"}),                                              # no conversations
        dumps({"conversations": []}),                                                        # empty
        dumps({"conversations": ["سلام", "درود"]}),                                          # turn not an object
        dumps({"conversations": [{"from": "bot", "value": "سلام"}, _g("درود")]}),            # unknown role
        dumps({"conversations": [_h(42), _g("چهل و دو")]}),                                  # non-string value
        dumps({"conversations": [_h("   "), _g("چیزی نپرسیدی.")]}),                          # empty value
        dumps({"conversations": [_sys("فارسی"), _h("سلام؟")]}),                              # no assistant turn
        dumps({"conversations": [_h("سلام"), _h("سلام دوباره"), _g("درود")]}),               # two user turns
    ]


EXPECTED_LLM_SKIPS = {D.BAD_JSON: 1, D.NOT_OBJECT: 1, D.NO_CONVERSATIONS: 1, D.EMPTY_CONVERSATIONS: 1, D.BAD_TURN: 1,
                      D.UNKNOWN_ROLE: 1, D.NON_STRING_VALUE: 1, D.EMPTY_VALUE: 1, D.NO_ASSISTANT: 1, D.BAD_ORDER: 1,
                      D.TOO_LONG: 3}


# ---------------------------------------------------------------------------------------------------------- LLM
@pytest.fixture(scope="module")
def llm_inputs(tmp_path_factory):
    from hwtools.llm.evaluate import TEST_PROMPTS

    base = tmp_path_factory.mktemp("llm-inputs")
    good = D.EMBEDDED_TRAIN.read_text(encoding="utf-8").splitlines()[:GOOD_ROWS]
    messy = base / "persian_messy.jsonl"
    long_rows = [json.dumps(r, ensure_ascii=False)
                 for r in (LONG_QUESTION, LONG_SYSTEM, LONG_ANSWER, LONG_SECOND_EXCHANGE)]
    lines = good[:30] + malformed_lines() + [""] + long_rows + good[30:]  # a blank line is not a row
    messy.write_text("\n".join(lines) + "\n", encoding="utf-8")
    prompts = base / "prompts.jsonl"
    prompts.write_text(TEST_PROMPTS.read_text(encoding="utf-8").splitlines(True)[0], encoding="utf-8")
    return {"model": save_tiny_model("gemma2", base / "gemma2"), "messy": messy, "prompts": prompts, "base": base}


def llm_argv(inputs, out, *extra, data=None) -> list:
    return ["--method", "lora", "--model", inputs["model"], "--data", data or inputs["messy"], "--prompts-file",
            inputs["prompts"], "--output-dir", out, "--max-steps", 2, "--batch-size", 2, "--max-length", MAX_LENGTH,
            "--save-every", 1, "--log-every", 1, "--chrf-samples", 0, "--gen-max-new-tokens", 2, "--report-to",
            "none", *extra]


@pytest.fixture(scope="module")
def llm_run(llm_inputs):
    """A finished LLM run on the messy file, with its stderr: what the tests below inspect and must not touch."""
    out = llm_inputs["base"] / "run"
    err = io.StringIO()
    stderr, sys.stderr = sys.stderr, err
    try:
        code = run_recipe("train_llm", llm_argv(llm_inputs, out))
    finally:
        sys.stderr = stderr
    assert code == 0, err.getvalue()[-3000:]
    return out, err.getvalue()


def test_llm_every_malformed_row_kind_is_skipped_and_counted(llm_run):
    out, err = llm_run
    summary = json.loads((out / "summary.json").read_text())
    n_rows = GOOD_ROWS + len(malformed_lines()) + 4
    assert summary["data_report"] == {"rows_read": n_rows, "rows_used": GOOD_ROWS + 1,
                                      "rows_skipped": n_rows - GOOD_ROWS - 1,
                                      "skipped_by_reason": dict(sorted(EXPECTED_LLM_SKIPS.items()))}
    assert summary["train"]["steps"] == 2 and (out / "final" / "adapter_model.safetensors").is_file()
    warnings = [line for line in err.splitlines() if "skipped" in line and "row(s):" in line]
    assert len(warnings) == len(EXPECTED_LLM_SKIPS)  # one warning line per reason, naming where it first occurred
    assert f"skipped 1 row(s): {D.BAD_JSON} (first at {out.parent / 'persian_messy.jsonl'}:31)" in err


@pytest.mark.parametrize("case", ["not-json-lines", "not-json", "empty", "no-usable-row", "missing-file"])
def test_llm_unusable_data_file_is_one_line_exit_2(case, llm_inputs, tmp_path, capfd):
    files = {"not-json-lines": ("data.jsonl", "id,question,answer\n1,سلام,درود\n", "not JSON Lines"),
             "not-json": ("data.json", "<html>سلام</html>", "not valid JSON"),
             "empty": ("data.jsonl", "", "file is empty"),
             "no-usable-row": ("data.jsonl", "\n".join(malformed_lines()), "no usable conversation in 10 row(s)"),
             "missing-file": ("absent.jsonl", None, "no such file or folder")}
    name, content, message = files[case]
    data = tmp_path / name
    if content is not None:
        data.write_text(content, encoding="utf-8")
    code = run_recipe("train_llm", llm_argv(llm_inputs, tmp_path / "out", data=data))
    line = assert_user_error(code, capfd.readouterr().err, message)
    assert str(data) in line  # names the file
    assert not (tmp_path / "out" / "summary.json").exists()


@pytest.mark.parametrize("case", ["method-typo", "hub-id-offline", "resume-nothing", "resume-needs-output-dir",
                                  "resume-not-a-checkpoint"])
def test_llm_user_mistakes_are_one_line_exit_2(case, llm_inputs, tmp_path, capfd):
    out = tmp_path / "out"
    argv = llm_argv(llm_inputs, out)
    cases = {
        "method-typo": (["--method", "lorra"], "--method lorra: unknown method"),
        "hub-id-offline": (["--model", "google/gemma-2-2b-it", "--cache-dir", tmp_path / "cache"],
                           "--model google/gemma-2-2b-it: not in the local Hugging Face cache and the hub is offline"),
        "resume-nothing": (["--resume", "latest"], f"--resume latest: no checkpoint in {out / 'checkpoints'}"),
        "resume-not-a-checkpoint": (["--resume", tmp_path], "not a checkpoint directory"),
    }
    if case == "resume-needs-output-dir":
        i = argv.index("--output-dir")
        argv, (extra, message) = argv[:i] + argv[i + 2:], (["--resume", "latest"], "needs --output-dir")
    else:
        extra, message = cases[case]
    code = run_recipe("train_llm", argv + extra)
    early = case != "hub-id-offline"  # the model is loaded after the run dir is made
    assert_user_error(code, capfd.readouterr().err, message, only_line=early)
    if early:
        assert not out.exists()  # refused before anything was written
    else:
        assert list(out.iterdir()) == []  # an empty dir is left, no run in it: a corrected rerun just works


def test_llm_run_is_never_touched_without_overwrite(llm_run, llm_inputs, capfd):
    out, _ = llm_run
    before = snapshot(out)
    attempts = [
        (llm_argv(llm_inputs, out), "already holds a run; pass --resume latest to continue it or --overwrite"),
        (llm_argv(llm_inputs, out, "--method", "dora "), "--method dora : unknown method"),
        (llm_argv(llm_inputs, out, "--resume", out / "final"), "not a checkpoint directory"),
    ]
    for argv, message in attempts:
        assert_user_error(run_recipe("train_llm", argv), capfd.readouterr().err, message, only_line=True)
    assert snapshot(out) == before


def test_llm_resume_of_a_run_killed_before_its_first_checkpoint(llm_run, llm_inputs, tmp_path, capfd):
    out = tmp_path / "run"
    shutil.copytree(llm_run[0], out)
    shutil.rmtree(out / "checkpoints")
    before = snapshot(out)
    code = run_recipe("train_llm", llm_argv(llm_inputs, out, "--resume", "latest"))
    assert_user_error(code, capfd.readouterr().err, "--resume latest: no checkpoint", only_line=True)
    assert snapshot(out) == before


def test_llm_overwrite_replaces_the_whole_run(llm_run, llm_inputs, tmp_path):
    """--overwrite: the new run's files only, and its checkpoints survive rotation (an old run's higher-numbered
    checkpoints used to be kept and made the new run's own ones the oldest, so they were pruned at once)."""
    from hwtools.train.checkpoint import latest_checkpoint

    out = tmp_path / "run"
    shutil.copytree(llm_run[0], out)
    for step in (7, 8):  # as if the old run had gone further than the new one will
        shutil.copytree(out / "checkpoints" / "step-00000002", out / "checkpoints" / f"step-{step:08d}")
    assert run_recipe("train_llm", llm_argv(llm_inputs, out, "--overwrite", "--max-steps", 1)) == 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step-00000001"]
    assert latest_checkpoint(out / "checkpoints").name == "step-00000001"
    assert [e["step"] for e in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if e["split"] == "train"] == [1]
    assert json.loads((out / "summary.json").read_text())["train"]["steps"] == 1


@pytest.mark.integration
def test_llm_cli_refusal_is_exactly_one_stderr_line(llm_run, llm_inputs):
    """The same refusal through a real process: exit status 2, stderr is one line, nothing else on it."""
    out, _ = llm_run
    before = snapshot(out)
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "train_llm.py"),
                           *map(str, llm_argv(llm_inputs, out))], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
                          timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [f"error: {out} already holds a run; pass --resume latest to continue it or "
                                        f"--overwrite"]
    assert snapshot(out) == before


# ------------------------------------------------------------------------------------------------------ caption
CAPTION_COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "black", "white"]


def _jpeg(colour: str, box: str) -> bytes:
    img = Image.new("RGB", (96, 96), "gray")
    img.paste(Image.new("RGB", (40, 40), colour), (8, 8) if box == "left" else (48, 48))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def kaggle_folder(root: Path, first_line: str | None = None) -> dict:
    """A Kaggle-layout Flickr8k folder (captions.txt + Images/) with 8 good images x 5 captions and every kind of
    bad line or image; captions.txt WITHOUT its `image,caption` header (read as data, with a warning)."""
    images = root / "Images"
    images.mkdir(parents=True)
    lines = [first_line] if first_line else []
    for i, colour in enumerate(CAPTION_COLOURS):
        name = f"{1000 + i}_{colour}.jpg"
        (images / name).write_bytes(_jpeg(colour, "left" if i % 2 else "right"))
        side = "left" if i % 2 else "right"
        lines += [f"{name},A {colour} square on a gray background .",
                  f"{name},a {colour} box sits at the {side} .",
                  f'{name},"A gray picture with a {colour} square, on the {side} side ."',
                  f"{name},{colour} square",
                  f"{name},The {colour} block is in the {side} corner ."]
    good = _jpeg("red", "left")
    (images / "2000_truncated.jpg").write_bytes(good[: len(good) // 3])
    (images / "2001_notes.jpg").write_text("not an image, a text file with a .jpg name", encoding="utf-8")
    for name in ("2000_truncated.jpg", "2001_notes.jpg"):
        lines += [f"{name},a picture that cannot be read ."] * 5
    lines += ["3000_missing.jpg,a picture that is not there .",  # image file missing
              "a line without any comma",                          # malformed
              f"1000_{CAPTION_COLOURS[0]}.jpg,   "]                # empty caption
    (root / "captions.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {"rows": len(lines) - (1 if first_line else 0), "used": 40,
            "skipped": {"empty caption": 1, "image file missing": 1, "image unreadable": 10,
                        "malformed caption line": 1}}


def caption_argv(data, out, cache, *extra) -> list:
    return ["--arch", "attention", "--data", data, "--cache-dir", cache, "--output-dir", out, "--epochs", 1,
            "--batch-size", 8, "--eval-batch-size", 4, "--max-len", 12, "--min-freq", 1, "--embed-dim", 16,
            "--hidden-dim", 32, "--attention-dim", 16, "--beam-size", 1, "--log-every", 1, "--report-to", "none",
            *extra]


@pytest.fixture(scope="module")
def caption_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("caption")
    expected = kaggle_folder(base / "flickr")
    out = base / "run"
    err = io.StringIO()
    stderr, sys.stderr = sys.stderr, err
    try:
        code = run_recipe("train_caption", caption_argv(base / "flickr", out, base / "cache"))
    finally:
        sys.stderr = stderr
    assert code == 0, err.getvalue()[-3000:]
    return out, err.getvalue(), expected, base


def test_caption_bad_images_and_lines_are_skipped_and_counted(caption_run):
    out, err, expected, base = caption_run
    summary = json.loads((out / "summary.json").read_text())
    assert summary["data_report"] == {"rows_read": expected["rows"], "rows_used": expected["used"],
                                      "rows_skipped": expected["rows"] - expected["used"],
                                      "skipped_by_reason": expected["skipped"]}
    assert summary["train"]["steps"] > 0 and (out / "final" / "decoder.safetensors").is_file()
    assert "no `image,caption` header; reading line 1 as data" in err  # the missing header: said, not fatal
    for reason, n in expected["skipped"].items():
        assert f"skipped {n} row(s): {reason}" in err


def test_caption_user_mistakes_are_one_line_exit_2(caption_run, tmp_path, capfd):
    _, _, _, base = caption_run
    bad_header = tmp_path / "bad-header"
    kaggle_folder(bad_header, first_line="filename;caption text")
    not_a_set = tmp_path / "photos"
    not_a_set.mkdir()
    (not_a_set / "holiday.jpg").write_bytes(_jpeg("red", "left"))
    out = tmp_path / "out"
    cases = [
        (caption_argv(base / "flickr", out, base / "cache", "--arch", "attentoin"),
         "error: --arch attentoin: choose one of cnn-rnn, attention, transformer", True),
        (caption_argv(bad_header, out, base / "cache"),
         f"error: {bad_header / 'captions.txt'}:1: expected the header `image,caption`", False),
        (caption_argv(not_a_set, out, base / "cache"), f"error: {not_a_set}: not a captioning data set", False),
        (caption_argv(base / "flickr", out, base / "cache", "--encoder", "resnet18", "--pretrained"),
         "error: --encoder resnet18 --pretrained: cannot fetch its weights from the hub", False),
        (caption_argv(base / "flickr", out, base / "cache", "--resume", "latest"),
         f"error: --resume latest: no checkpoint in {out / 'checkpoints'}", True),
    ]
    for argv, message, only_line in cases:
        assert_user_error(run_recipe("train_caption", argv), capfd.readouterr().err, message, only_line)
        assert not (out / "config.json").exists()


def test_another_tasks_run_is_refused_even_with_overwrite(llm_run, caption_run, llm_inputs, capfd):
    llm_out, caption_out = llm_run[0], caption_run[0]
    base = caption_run[3]
    before = snapshot(llm_out), snapshot(caption_out)
    code = run_recipe("train_caption", caption_argv(base / "flickr", llm_out, base / "cache", "--overwrite"))
    assert_user_error(code, capfd.readouterr().err, f"{llm_out} holds a 'llm' run, not a 'caption' run", True)
    code = run_recipe("train_llm", llm_argv(llm_inputs, caption_out, "--overwrite"))
    assert_user_error(code, capfd.readouterr().err, f"{caption_out} holds a 'caption' run, not a 'llm' run", True)
    assert (snapshot(llm_out), snapshot(caption_out)) == before


# ------------------------------------------------------------------------------------------ long-input safety
def _label_spans(labels: list[int]) -> list[list[int]]:
    spans, cur = [], []
    for t in labels + [D.IGNORE_INDEX]:
        if t != D.IGNORE_INDEX:
            cur.append(t)
        elif cur:
            spans, cur = spans + [cur], []
    return spans


def test_long_persian_conversations_are_cut_to_whole_exchanges_or_skipped():
    from hwtools.data_report import DataReport

    tok = build_tiny_tokenizer()
    convs = [D.normalize_conversation(r) for r in (LONG_QUESTION, LONG_SYSTEM, LONG_ANSWER, LONG_SECOND_EXCHANGE)]
    three = [{"role": r, "content": c} for r, c in (("user", "سلام!"), ("assistant", "سلام! چطور می‌توانم کمکت کنم؟"),
                                                      ("user", "پایتخت ایران کجاست؟"), ("assistant", "تهران."),
                                                      ("user", "از یک تا صد بشمار."),
                                                      ("assistant", "یک، دو، سه، چهار، پنج. " * 40))]
    convs.append(three)
    full = {i: D.tokenize_conversation(tok, c, 100_000) for i, c in enumerate(convs)}
    assert all(len(full[i]["input_ids"]) > MAX_LENGTH for i in full)  # every one is longer than the limit

    report = DataReport(rows_used=len(convs))
    examples = D.tokenize_all(tok, convs, MAX_LENGTH, report)
    assert report.skipped_by_reason == {D.TOO_LONG: 3} and report.rows_used == 2
    # the kept ones: cut after the last whole exchange that fits, i.e. exactly the shorter conversation's tokens
    assert examples[0] == D.tokenize_conversation(tok, convs[3][:2], MAX_LENGTH)
    assert examples[1] == D.tokenize_conversation(tok, three[:4], MAX_LENGTH)
    for ex, turns in zip(examples, (convs[3][:2], three[:4])):
        assert len(ex["input_ids"]) == len(ex["labels"]) <= MAX_LENGTH
        answers = [t["content"] for t in turns if t["role"] == "assistant"]
        spans = [tok.decode(s) for s in _label_spans(ex["labels"])]
        assert spans == [f"{a}<end_of_turn>" for a in answers]  # whole answers, each with its end of turn


@pytest.mark.parametrize("packing", [True, False])
def test_every_llm_training_row_has_trainable_labels(packing):
    """Through the recipe's own loaders, with the long conversations mixed into real rows."""
    from hwtools.data_report import DataReport
    from hwtools.llm.pipeline import build_loaders

    tok = build_tiny_tokenizer()
    report = DataReport()
    rows = [json.loads(x) for x in D.EMBEDDED_TRAIN.read_text(encoding="utf-8").splitlines()[:40]]
    rows += [LONG_QUESTION, LONG_SYSTEM, LONG_ANSWER, LONG_SECOND_EXCHANGE]
    convs = D.conversations_from_rows([(f"row {i}", r) for i, r in enumerate(rows)], report, "test")
    loaders = build_loaders(tok, {"train": convs}, report, max_length=64, batch_size=3, seed=42, packing=packing)
    assert report.skipped_by_reason[D.TOO_LONG] >= 3
    n_rows = 0
    for batch in loaders["train"]:
        assert batch["input_ids"].shape[1] <= 64
        assert ((batch["labels"] != D.IGNORE_INDEX).sum(dim=1) > 0).all()
        n_rows += len(batch["input_ids"])
    assert n_rows == len(loaders["train"].dataset) > 0
    if packing:  # inside a packed block, every example (not only the block) has a trainable token
        for block in loaders["train"].dataset:
            at = 0
            for n in block["seq_lens"]:
                assert any(t != D.IGNORE_INDEX for t in block["labels"][at:at + n])
                at += n


def test_long_captions_are_cut_but_keep_their_end():
    from hwtools.caption import pipeline as cap_run
    from hwtools.caption.data import collate_captions
    from hwtools.caption.vocab import END_ID, PAD_ID, START_ID, Vocab

    long = "a dog runs " * 20 + "across the green grass in the park ."
    items = {"a.jpg": [long, "a dog ."], "b.jpg": ["two dogs play on the grass together near a park bench ."]}
    vocab = Vocab.build([c for caps in items.values() for c in caps])
    inputs = cap_run.ImageInputs({p: torch.zeros(3) for p in items}, None, None, "stub")
    max_len = 8
    batch = collate_captions(list(cap_run.make_dataset(items, vocab, max_len, inputs, train=True)))
    ids, mask = batch["caption_ids"], batch["caption_mask"]
    assert ids.shape == (3, max_len)
    for row, m in zip(ids.tolist(), mask.tolist()):
        n = sum(m)
        assert row[0] == START_ID and row[n - 1] == END_ID and all(t == PAD_ID for t in row[n:])
        assert sum(m[1:]) >= 1  # at least one target token (what caption_loss trains on)
    assert ids[0].tolist() == [START_ID] + [vocab.stoi[w] for w in "a dog runs a dog runs".split()] + [END_ID]
    assert mask[0].all() and mask[2].all()  # the two long ones fill max_len, ending in <end>
    with pytest.raises(Exception, match="--max-len must be >= 2"):
        vocab.encode("a dog .", 1)


def test_caption_without_words_is_skipped(tmp_path):
    from hwtools.caption.data import load_captions
    from hwtools.data_report import DataReport

    folder = tmp_path / "flickr"
    (folder / "Images").mkdir(parents=True)
    (folder / "Images" / "1.jpg").write_bytes(_jpeg("red", "left"))
    (folder / "captions.txt").write_text("image,caption\n1.jpg,a red square .\n1.jpg,123 !!!\n")
    report = DataReport()
    load_captions(str(folder), report, tmp_path / "cache")
    assert report.skipped_by_reason == {"empty caption": 1}


def test_caption_warns_once_per_skip_reason(caption_run):
    _, err, expected, _ = caption_run
    for reason in expected["skipped"]:
        assert sum(f"row(s): {reason} (first at" in line for line in err.splitlines()) == 1, reason
