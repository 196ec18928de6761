"""Resume through the CLI after a real SIGKILL, for both recipes: a run killed between checkpoints, or killed while a
checkpoint is being written, and then continued with `--resume latest`, ends with the same weights and the same
logged losses as a run that was never interrupted."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from hwtools.train.checkpoint import LATEST, SLOW_SAVE_ENV, latest_checkpoint
from tests.tiny_models import write_llm_cli_inputs

ROOT = Path(__file__).resolve().parents[1]
LLM_DATA_ROWS = 60  # real rows of the shipped Persian set; enough for two epochs of packed blocks at --max-length 96
# weights and losses of a resumed run vs an uninterrupted one: the same ops on the same CPU, so in practice bit-equal
TOL = 1e-6


def cli_env(**extra) -> dict:
    # one thread per run: the runs being compared then use the same kernels, and they share the CI's 2 cores
    return {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
            "WANDB_MODE": "disabled", **extra}


def start(script: str, args: list, log: Path, **env) -> subprocess.Popen:
    """The recipe in its own process (as a user starts it), output to a log file so no pipe ever fills."""
    with open(log, "w") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen([sys.executable, str(ROOT / "launch" / script), *map(str, args)], cwd=ROOT,
                                stdout=out, stderr=subprocess.STDOUT, env=cli_env(**env))


def finish(proc: subprocess.Popen, log: Path) -> None:
    rc = proc.wait(timeout=600)
    assert rc == 0, f"exited {rc}:\n{log.read_text()[-3000:]}"


def run(script: str, args: list, log: Path, **env) -> None:
    finish(start(script, args, log, **env), log)


class Background:
    """A reference run started at fixture setup, so it overlaps with the test's own runs; `.dir` waits for it."""

    def __init__(self, script: str, args: list, out: Path):
        self.out, self.log = out, out.parent / "log.txt"
        self.proc = start(script, args, self.log)

    @property
    def dir(self) -> Path:
        finish(self.proc, self.log)
        return self.out


def kill_when(proc: subprocess.Popen, ready, log: Path, timeout: float = 300) -> None:
    """SIGKILL `proc` as soon as ready() holds (polled every 10 ms); fail if it finished or never got there."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"the run ended before it could be killed:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, "timed out waiting to kill the run"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL


def latest_step(run_dir: Path) -> int:
    ckpt = latest_checkpoint(run_dir / "checkpoints")
    return -1 if ckpt is None else json.loads((ckpt / "loop_state.json").read_text())["step"]


def logged(run_dir: Path, split: str) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    events = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
    return [e for e in events if e.get("split") == split]


def max_logged_step(run_dir: Path) -> int:
    try:
        return max((e["step"] for e in logged(run_dir, "train")), default=-1)
    except json.JSONDecodeError:  # a line being written right now
        return -1


def assert_same_run(resumed: Path, reference: Path, weights_file: str, trained_keys=None) -> None:
    """Same final weights (within TOL), same logged train/eval losses and learning rates, step by step."""
    a, b = load_file(str(resumed / "final" / weights_file)), load_file(str(reference / "final" / weights_file))
    assert a.keys() == b.keys() and a
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst <= TOL, f"final weights differ by {worst}"
    for split in ("train", "eval"):
        got, want = logged(resumed, split), logged(reference, split)
        assert [e["step"] for e in got] == [e["step"] for e in want], split  # each step logged once, none lost
        for g, w in zip(got, want):
            assert g["loss"] == pytest.approx(w["loss"], abs=TOL), (split, g["step"])
            assert g.get("lr") == pytest.approx(w.get("lr"), abs=1e-12), (split, g["step"])
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (resumed, reference))
    assert sa["train"]["steps"] == sb["train"]["steps"]
    assert sa["train"]["final_loss"] == pytest.approx(sb["train"]["final_loss"], abs=TOL)
    assert sa["eval"]["loss"] == pytest.approx(sb["eval"]["loss"], abs=TOL)


# ---------------------------------------------------------------------------------------------------------- LLM
LLM_STEPS = 24


@pytest.fixture(scope="module")
def llm_inputs(tmp_path_factory):
    return write_llm_cli_inputs(tmp_path_factory.mktemp("llm-inputs"), LLM_DATA_ROWS)


def llm_args(inputs, out: Path) -> list:
    # lr 1e-2 so that every step moves the weights far more than TOL; LoRA dropout stays on (0.05): resume must
    # also restore the dropout RNG stream; 24 steps cross the epoch boundary (about 13 batches per epoch)
    return ["--method", "lora", "--model", inputs["model"], "--data", inputs["data"], "--prompts-file",
            inputs["prompts"], "--output-dir", out, "--max-steps", LLM_STEPS, "--batch-size", 2, "--max-length", 96,
            "--lr", "1e-2", "--warmup-steps", 2, "--save-every", 4, "--log-every", 1, "--chrf-samples", 0,
            "--gen-max-new-tokens", 2, "--report-to", "none"]


@pytest.fixture(scope="module")
def llm_reference(llm_inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("llm-reference") / "run"
    reference = Background("train_llm.py", llm_args(llm_inputs, out), out)
    yield reference
    if reference.proc.poll() is None:  # a test failed before it needed the reference
        reference.proc.kill()
        reference.proc.wait()


@pytest.mark.integration
def test_llm_killed_between_checkpoints_resumes_to_the_same_run(llm_inputs, llm_reference, tmp_path):
    out = tmp_path / "run"
    proc = start("train_llm.py", llm_args(llm_inputs, out), tmp_path / "killed.txt")
    # killed after a checkpoint AND after a later step was logged, so the resume must also drop those log lines
    kill_when(proc, lambda: 0 < latest_step(out) < max_logged_step(out), tmp_path / "killed.txt")
    killed_at = latest_step(out)
    assert 0 < killed_at < LLM_STEPS and not (out / "final").exists() and not (out / "summary.json").exists()
    assert max_logged_step(out) > killed_at

    run("train_llm.py", [*llm_args(llm_inputs, out), "--resume", "latest"], tmp_path / "resumed.txt")
    assert f"resumed from {out / 'checkpoints'}" in (tmp_path / "resumed.txt").read_text()
    assert_same_run(out, llm_reference.dir, "adapter_model.safetensors")
    lora = load_file(str(out / "final" / "adapter_model.safetensors"))
    lora_b = [v for k, v in lora.items() if "lora_B" in k]  # LoRA B starts at zero: its size is what training did
    assert lora_b and max(v.abs().max().item() for v in lora_b) > 1e-3


@pytest.mark.integration
def test_llm_killed_while_saving_keeps_latest_complete(llm_inputs, llm_reference, tmp_path):
    out = tmp_path / "run"
    log = tmp_path / "killed.txt"
    proc = start("train_llm.py", llm_args(llm_inputs, out), log, **{SLOW_SAVE_ENV: "2"})
    ckpts = out / "checkpoints"
    # the second save: everything written to the temp dir, the process asleep before the rename
    kill_when(proc, lambda: (ckpts / LATEST).exists() and any((p / "loop_state.json").exists()
                                                               for p in ckpts.glob(".tmp-step-*")), log)
    partial = sorted(ckpts.glob(".tmp-step-*"))
    assert len(partial) == 1
    latest = latest_checkpoint(ckpts)
    assert (ckpts / LATEST).read_text().strip() == latest.name != partial[0].name
    assert latest.name < partial[0].name.removeprefix(".tmp-")  # the older, complete one
    assert {"model.safetensors", "optimizer.bin", "loop_state.json"} <= {p.name for p in latest.iterdir()}

    run("train_llm.py", [*llm_args(llm_inputs, out), "--resume", "latest"], tmp_path / "resumed.txt")
    assert not list(ckpts.glob(".tmp-step-*"))  # the stale temp dir is cleaned up by the next save
    assert_same_run(out, llm_reference.dir, "adapter_model.safetensors")


# ------------------------------------------------------------------------------------------------------ caption
def caption_args(cache: Path, out: Path) -> list:
    # attention arch with its default dropout 0.5 (the resume must restore the dropout RNG too); tiny decoder;
    # 16 images x 5 captions / batch 8 = 10 steps per epoch, 3 epochs: checkpoints mid-epoch and at epoch ends
    return ["--arch", "attention", "--cache-dir", cache, "--output-dir", out, "--max-train-images", 16,
            "--max-eval-images", 4, "--epochs", 3, "--batch-size", 8, "--eval-batch-size", 8, "--lr", "3e-3",
            "--embed-dim", 16, "--hidden-dim", 32, "--attention-dim", 16, "--num-layers", 1, "--beam-size", 1,
            "--save-every", 4, "--log-every", 1, "--report-to", "none"]


@pytest.fixture(scope="module")
def caption_reference(caption_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("caption-reference") / "run"
    reference = Background("train_caption.py", caption_args(caption_cache, out), out)
    yield reference
    if reference.proc.poll() is None:
        reference.proc.kill()
        reference.proc.wait()


@pytest.mark.integration
def test_caption_killed_between_checkpoints_resumes_to_the_same_run(caption_cache, caption_reference, tmp_path):
    out = tmp_path / "run"
    log = tmp_path / "killed.txt"
    proc = start("train_caption.py", caption_args(caption_cache, out), log)
    # past the first epoch end, so the resumed run must also restore the epoch counter and the seeded order
    kill_when(proc, lambda: 10 < latest_step(out) < max_logged_step(out), log)
    killed_at = latest_step(out)
    assert 10 < killed_at < 30 and not (out / "final").exists() and not (out / "summary.json").exists()

    run("train_caption.py", [*caption_args(caption_cache, out), "--resume", "latest"], tmp_path / "resumed.txt")
    assert f"resumed from {out / 'checkpoints'}" in (tmp_path / "resumed.txt").read_text()
    reference = caption_reference.dir
    assert_same_run(out, reference, "decoder.safetensors")
    # the fixed validation image captioned at each epoch end: the same words at the same steps
    assert logged(out, "sample") == logged(reference, "sample") and len(logged(out, "sample")) == 3


# ------------------------------------------------------------------------------------------------- preemption
def wait_for(cond, proc: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert proc.poll() is None, f"the run ended first:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def refused(args: list, log: Path) -> str:
    proc = start("train_llm.py", args, log)
    assert proc.wait(timeout=300) == 2, log.read_text()[-3000:]
    lines = [x for x in log.read_text().splitlines() if x.startswith("error: ")]
    assert len(lines) == 1, log.read_text()[-3000:]
    return lines[0]


@pytest.mark.integration
def test_llm_sigterm_mid_epoch_stops_cleanly_and_resumes_to_the_same_run(llm_inputs, llm_reference, tmp_path):
    """SIGTERM mid-epoch, Ctrl-C while the stop's checkpoint is written; meanwhile a second process on the folder
    (with --resume, --overwrite) is refused; a resume with another batch size or method is refused, one with another
    save cadence is recorded; the resumed run ends as the uninterrupted one."""
    out, log = tmp_path / "run", tmp_path / "stopped.txt"
    ckpts = out / "checkpoints"
    args = llm_args(llm_inputs, out)
    proc = start("train_llm.py", args, log, **{SLOW_SAVE_ENV: "1"})  # each save holds 1 s before its rename
    wait_for(lambda: latest_step(out) == 4, proc, log)
    proc.send_signal(signal.SIGSTOP)  # frozen but alive: it still holds the folder
    try:
        for extra in (["--resume", "latest"], ["--overwrite"]):
            line = refused([*args, *extra], tmp_path / "second.txt")
            assert line.startswith(f"error: {out} is in use by another run: pid {proc.pid} on host "), line
        assert latest_step(out) == 4 and (out / "config.json").exists()  # --overwrite removed nothing
    finally:
        proc.send_signal(signal.SIGCONT)
    # past step 4 first: a SIGTERM landing before step 5 ends stops at step 4, whose checkpoint already exists,
    # so no stop checkpoint would be written for the second signal to hit
    wait_for(lambda: max_logged_step(out) >= 5, proc, log)
    proc.send_signal(signal.SIGTERM)
    # the stop's own checkpoint (not a periodic one) being written: a second signal must not break it
    wait_for(lambda: any((p / "loop_state.json").exists() for p in ckpts.glob(".tmp-step-*")), proc, log)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 143, log.read_text()[-3000:]
    stopped_at = latest_step(out)
    assert 4 < stopped_at < LLM_STEPS and stopped_at % 4, stopped_at  # mid-epoch, off the save cadence
    ckpt = latest_checkpoint(ckpts)
    assert log.read_text().splitlines()[-1] == (f"stopped by SIGTERM after step {stopped_at}; checkpoint {ckpt}; "
                                                f"continue with the same flags and --resume latest")
    assert not list(ckpts.glob(".tmp-*")) and not (out / "final").exists()
    assert max_logged_step(out) == stopped_at  # nothing logged past the checkpoint

    line = refused([*args, "--resume", "latest", "--batch-size", 4, "--method", "dora"], tmp_path / "changed.txt")
    assert '--batch-size 2 -> 4' in line and '--method "lora" -> "dora"' in line and "--lr" not in line, line

    resumed_args = [*args, "--resume", "latest"]
    resumed_args[resumed_args.index("--save-every") + 1] = 5
    run("train_llm.py", resumed_args, tmp_path / "resumed.txt")
    assert_same_run(out, llm_reference.dir, "adapter_model.safetensors")
    notes = [e for e in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if e["split"] == "event"]
    assert [(e["event"], e["step"]) for e in notes] == [("stopped", stopped_at), ("resumed", stopped_at)]
    assert notes[0]["signal"] == "SIGTERM" and notes[1]["changed"] == {"--save-every": [4, 5]}
    assert not (out / "run.lock").exists()
