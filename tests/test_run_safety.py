"""What machines and clusters do to runs, on the shared loop's toy problem: a preemption signal mid-epoch (and a second
one during the save), a resume with changed flags, a second process on the run folder, a checkpoint save that fails.
The real CLIs under real signals are in test_resume_cli.py and test_two_processes.py."""
import errno
import json
import os
import re
import signal
import socket
import subprocess
import sys

import pytest
import torch
from accelerate import Accelerator

from hwtools.errors import EXIT_SAVE_FAILED, RunStopped, UserError, cli_main
from hwtools.train.checkpoint import LATEST, latest_checkpoint
from hwtools.train.lock import LOCK_FILE
from hwtools.train.tracking import read_metrics
from tests.test_loop import flat_weights, mse, run_toy, train_losses


def signalling_loss(at_call, signum=signal.SIGTERM):
    """mse, but the process sends itself `signum` during the forward of call `at_call` (mid optimizer step)."""
    calls = {"n": 0}

    def fn(model, batch):
        calls["n"] += 1
        if calls["n"] == at_call:
            os.kill(os.getpid(), signum)
        return mse(model, batch)

    return fn


def events(run_dir, name):
    return [e for e in read_metrics(run_dir) if e.get("event") == name]


# ---------------------------------------------------------------------------------------------------- preemption
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_signal_mid_epoch_saves_and_resumes_to_the_same_run(tmp_path, monkeypatch, signum):
    full, full_dir = run_toy(tmp_path / "full")  # 10 steps, 6 batches an epoch, checkpoints every 2 steps
    # what SIGINT did before the run (a shell starting a background job hands it SIG_IGN, not Python's default)
    sigint_before = signal.getsignal(signal.SIGINT)
    saves = []
    real_save = Accelerator.save_state

    def save_and_get_signalled(self, *args, **kwargs):  # a second signal (Ctrl-C) while the stop's save runs
        saves.append(1)
        if len(saves) == 3:  # steps 2 and 4 are periodic saves
            os.kill(os.getpid(), signal.SIGINT)
        return real_save(self, *args, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", save_and_get_signalled)
    with pytest.raises(RunStopped) as stop:
        run_toy(tmp_path / "cut", loss_fn=signalling_loss(5, signum))  # during step 5 (checkpoints at 2 and 4)
    monkeypatch.setattr(Accelerator, "save_state", real_save)
    assert stop.value.exit_code == 128 + signum
    ckpt = latest_checkpoint(tmp_path / "cut" / "checkpoints")
    assert ckpt.name == "step-00000005"  # the step in progress finished, then was saved (not the last periodic one)
    assert str(stop.value) == (f"stopped by {signal.Signals(signum).name} after step 5; checkpoint {ckpt}; continue "
                               f"with the same flags and --resume latest")
    assert len(saves) == 3 and not list(ckpt.parent.glob(".tmp-*"))  # the SIGINT during the save changed nothing
    state = json.loads((ckpt / "loop_state.json").read_text())
    assert state["step"] == 5 and state["batches_in_epoch"] == 5 and state["epoch"] == 0
    stopped = events(tmp_path / "cut", "stopped")
    assert stopped == [{"step": 5, "split": "event", "event": "stopped", "signal": signal.Signals(signum).name,
                        "checkpoint": str(ckpt)}]
    assert signal.getsignal(signal.SIGINT) is sigint_before  # handlers restored after the run

    resumed, cut_dir = run_toy(tmp_path / "cut", resume="latest")
    assert resumed.steps == full.steps == 10
    assert torch.equal(flat_weights(full.model), flat_weights(resumed.model))
    assert train_losses(cut_dir) == train_losses(full_dir)


def test_signal_in_the_last_step_of_an_epoch(tmp_path):
    """Stopping exactly at an epoch's end (save_every not on that step) resumes into the next epoch correctly."""
    full, _ = run_toy(tmp_path / "full", save_every=4)
    with pytest.raises(RunStopped):
        run_toy(tmp_path / "cut", loss_fn=signalling_loss(6), save_every=4)  # batch 6 of 6
    ckpt = latest_checkpoint(tmp_path / "cut" / "checkpoints")
    assert json.loads((ckpt / "loop_state.json").read_text())["step"] == 6
    resumed, _ = run_toy(tmp_path / "cut", resume="latest", save_every=4)
    assert torch.equal(flat_weights(full.model), flat_weights(resumed.model))


# ---------------------------------------------------------------------------------------------------- resume check
def test_resume_refuses_changed_data_flags_and_records_changed_cadence(tmp_path):
    with pytest.raises(RunStopped):
        run_toy(tmp_path, loss_fn=signalling_loss(5))
    with pytest.raises(UserError) as err:
        run_toy(tmp_path, resume="latest", batch_size=2, grad_accum=2, seed=4)
    msg = str(err.value)
    assert "\n" not in msg and "step-00000005 was trained with other settings" in msg
    assert "--batch-size 4 -> 2" in msg and "--grad-accum 1 -> 2" in msg and "--seed 3 -> 4" in msg
    assert "--max-steps" not in msg and not events(tmp_path, "resumed")  # refused before anything was written

    # another number of processes than the checkpoint's
    ckpt = latest_checkpoint(tmp_path / "checkpoints")
    state = json.loads((ckpt / "loop_state.json").read_text())
    (ckpt / "loop_state.json").write_text(json.dumps({**state, "num_processes": 2}))
    with pytest.raises(UserError, match="number of processes 2 -> 1"):
        run_toy(tmp_path, resume="latest")
    (ckpt / "loop_state.json").write_text(json.dumps(state))

    result, _ = run_toy(tmp_path, resume="latest", max_steps=12, save_every=3, log_every=2)
    assert result.steps == 12
    assert events(tmp_path, "resumed") == [{"step": 5, "split": "event", "event": "resumed", "checkpoint": str(ckpt),
                                            "changed": {"--log-every": [1, 2], "--max-steps": [10, 12],
                                                        "--save-every": [2, 3]}}]


# ---------------------------------------------------------------------------------------------------- lock
@pytest.fixture
def other_process():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc
    proc.kill()
    proc.wait()


@pytest.mark.parametrize("flags", [{}, {"resume": "latest"}, {"overwrite": True}])
def test_a_live_holder_is_named_and_a_stale_lock_taken_over(tmp_path, other_process, flags, capfd):
    run_toy(tmp_path, max_steps=2)
    lock = tmp_path / LOCK_FILE
    lock.write_text(json.dumps({"pid": other_process.pid, "host": socket.gethostname(), "start": None}))
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(UserError, match=f"{tmp_path} is in use by another run: pid {other_process.pid} on host "
                                        f"{socket.gethostname()}$"):
        run_toy(tmp_path, max_steps=4, **flags)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing read into or removed from the folder

    other_process.kill()
    other_process.wait()  # its pid is gone now: the lock is stale
    run_toy(tmp_path, max_steps=4, **(flags or {"overwrite": True}))
    assert f"taking over the lock of pid {other_process.pid}" in capfd.readouterr().err
    assert json.loads(lock.read_text())["pid"] == os.getpid()


def test_a_lock_from_another_host_is_refused_with_a_hint(tmp_path):
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": 1, "host": "other-node-7"}))
    with pytest.raises(UserError, match=f"pid 1 on host other-node-7 \\(if that run is over, delete "
                                        f"{tmp_path / LOCK_FILE}\\)"):
        run_toy(tmp_path)


# ---------------------------------------------------------------------------------------------------- failed save
@pytest.mark.parametrize("failure", ["enospc", "eacces", "torch"])
def test_a_failed_save_stops_with_one_line_and_keeps_latest(tmp_path, monkeypatch, capsys, failure):
    real_save = Accelerator.save_state
    calls = {"n": 0}

    def save_state(self, output_dir=None, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            if failure == "enospc":  # the disk fills in the middle of writing the second checkpoint
                real_save(self, output_dir, **kwargs)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.path.join(output_dir, "optimizer.bin"))
            if failure == "torch":  # what torch.save raised on a real full tmpfs
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 8512 vs 8406")
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), output_dir)
        return real_save(self, output_dir, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", save_state)
    code = cli_main(lambda: run_toy(tmp_path))
    with pytest.raises(SystemExit) as exit_:
        code()
    assert exit_.value.code == EXIT_SAVE_FAILED == 74
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar
    good = tmp_path / "checkpoints" / "step-00000002"
    where = tmp_path / "checkpoints" / ".tmp-step-00000004"
    cause = {"enospc": "No space left on device", "eacces": "Permission denied",
             "torch": "RuntimeError: [enforce fail at inline_container.cc:672] . unexpected pos 8512 vs 8406 ("}[failure]
    where = where / "optimizer.bin" if failure == "enospc" else where
    head, tail = err.split(cause)
    assert head == f"error: saving checkpoint step-00000004 failed: {where}: "
    assert tail.endswith(f"; latest stays {good}")
    if failure == "torch":  # its message says nothing of the disk: the free space does
        assert re.fullmatch(r"[0-9.]+ MiB free there\)", tail.split(";")[0])
    assert (tmp_path / "checkpoints" / LATEST).read_text() == "step-00000002"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [LATEST, "step-00000002"]

    monkeypatch.setattr(Accelerator, "save_state", real_save)  # space freed: the run continues from step 2
    full, _ = run_toy(tmp_path / "full")
    resumed, _ = run_toy(tmp_path, resume="latest")
    assert torch.equal(flat_weights(full.model), flat_weights(resumed.model))


def test_failing_rename_or_latest_leaves_no_checkpoint_lookalike(tmp_path, monkeypatch):
    import hwtools.train.checkpoint as ckpt_mod

    real_replace = os.replace

    def replace(src, dst):
        if str(dst).endswith(LATEST) and "step-00000004" in open(src).read():
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
        return real_replace(src, dst)

    monkeypatch.setattr(ckpt_mod.os, "replace", replace)
    with pytest.raises(RunStopped, match="latest stays .*step-00000002$"):
        run_toy(tmp_path)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [LATEST, "step-00000002"]
