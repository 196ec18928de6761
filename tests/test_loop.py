"""The shared accelerate loop on a learnable toy problem: learning, accumulation, resume, NaN stop, outputs."""
import dataclasses
import json
import os

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from hwtools.config import LoopConfig, parse_config
from hwtools.errors import UserError
from hwtools.train.accelerate_state import reset_accelerate
from hwtools.train.checkpoint import latest_checkpoint
from hwtools.train.loop import make_accelerator, train
from hwtools.train.tracking import Tracker, prepare_run_dir, read_metrics, write_json, write_summary


class ToyData(Dataset):
    """y = x @ w_true + noise: learnable, deterministic."""

    def __init__(self, n=24, d=6, seed=0):
        w_true = torch.randn(d, 1, generator=torch.Generator().manual_seed(100))  # same task for every split
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, d, generator=g)
        self.y = self.x @ w_true + 0.01 * torch.randn(n, 1, generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.y[i]}


def toy_model(dropout=0.1):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Dropout(dropout), nn.Linear(16, 1))


def mse(model, batch):
    return nn.functional.mse_loss(model(batch["x"]), batch["y"]), batch["x"].shape[0]


def run_toy(tmp_path, loss_fn=mse, model=None, data=None, shuffle=True, **overrides):
    reset_accelerate()
    fields = dict(output_dir=str(tmp_path), batch_size=4, lr=0.05, max_steps=10, log_every=1, save_every=2,
                  warmup_steps=1, seed=3)
    fields.update(overrides)
    cfg = LoopConfig(**fields)
    acc = make_accelerator(cfg)
    run_dir = prepare_run_dir(cfg, "toy", "mlp", acc)
    write_json(run_dir / "config.json", {"task": "toy", **dataclasses.asdict(cfg)})  # as the recipes do
    tracker = Tracker(acc, run_dir, cfg, dataclasses.asdict(cfg))
    model = model if model is not None else toy_model()
    data = data or ToyData()
    loader = DataLoader(data, batch_size=cfg.batch_size, shuffle=shuffle)
    eval_loader = DataLoader(ToyData(n=8, seed=1), batch_size=4)
    result = train(acc, model, loader, loss_fn, cfg, run_dir, tracker, eval_loader=eval_loader)
    tracker.finish()
    return result, run_dir


def flat_weights(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def train_losses(run_dir):
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir) if r.get("split") == "train" and "loss" in r]


def test_loss_goes_down(tmp_path):
    result, run_dir = run_toy(tmp_path, max_steps=40, lr=0.02, warmup_steps=0)
    losses = [loss for _, loss in train_losses(run_dir)]
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < 0.3 * sum(losses[:5]) / 5
    assert result.eval_loss is not None and result.eval_loss < losses[0]
    assert result.steps == 40


def test_grad_accumulation_matches_big_batch(tmp_path):
    common = dict(max_steps=1, lr=0.1, warmup_steps=0, lr_schedule="constant", max_grad_norm=0.0, shuffle=False)
    data = ToyData(n=4)
    big, _ = run_toy(tmp_path / "big", model=toy_model(0.0), data=data, batch_size=4, grad_accum=1, **common)
    acc, _ = run_toy(tmp_path / "acc", model=toy_model(0.0), data=data, batch_size=2, grad_accum=2, **common)
    start = flat_weights(toy_model(0.0))
    assert not torch.allclose(flat_weights(big.model), start)  # the step did something
    assert torch.allclose(flat_weights(big.model), flat_weights(acc.model), atol=1e-6)


class Kill(Exception):
    pass


def killing_loss(at_call):
    calls = {"n": 0}

    def fn(model, batch):
        calls["n"] += 1
        if calls["n"] == at_call:
            raise Kill()
        return mse(model, batch)

    return fn


@pytest.mark.parametrize("kill_at_batch", [5, 9])  # mid first epoch; second epoch (6 batches per epoch)
def test_resume_reproduces_uninterrupted_run(tmp_path, kill_at_batch):
    full, full_dir = run_toy(tmp_path / "full")
    with pytest.raises(Kill):
        run_toy(tmp_path / "cut", loss_fn=killing_loss(kill_at_batch))
    assert latest_checkpoint(tmp_path / "cut" / "checkpoints") is not None
    resumed, cut_dir = run_toy(tmp_path / "cut", resume="latest")
    assert resumed.steps == full.steps == 10
    assert torch.equal(flat_weights(full.model), flat_weights(resumed.model))
    assert train_losses(cut_dir) == train_losses(full_dir)
    assert resumed.final_loss == full.final_loss


def frozen_first_layer_model():
    model = toy_model()
    model[0].requires_grad_(False)  # a frozen "base" under a trained head, as in LoRA or partial tuning
    return model


def test_checkpoints_hold_trained_tensors_only_and_resume_exactly(tmp_path):
    from safetensors import safe_open

    full, _ = run_toy(tmp_path / "full", model=frozen_first_layer_model())
    with pytest.raises(Kill):
        run_toy(tmp_path / "cut", model=frozen_first_layer_model(), loss_fn=killing_loss(7))
    ckpt = latest_checkpoint(tmp_path / "cut" / "checkpoints")
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        assert sorted(f.keys()) == ["3.bias", "3.weight"]  # the frozen layer is not copied into every checkpoint
    resumed, _ = run_toy(tmp_path / "cut", model=frozen_first_layer_model(), resume="latest")
    assert torch.equal(flat_weights(full.model), flat_weights(resumed.model))
    # resuming into a model that trains tensors the checkpoint lacks is refused, not silently started fresh
    with pytest.raises(UserError, match="lacks 2 trained tensor"):
        run_toy(tmp_path / "cut", model=toy_model(), resume="latest")


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    def nan_at_step_5(model, batch, calls={"n": 0}):
        calls["n"] += 1
        loss, n = mse(model, batch)
        return (loss * float("nan"), n) if calls["n"] == 5 else (loss, n)

    result, run_dir = run_toy(tmp_path, loss_fn=nan_at_step_5)
    assert result.stopped_reason == "non-finite loss at step 5"
    assert result.steps == 4
    ckpt = latest_checkpoint(run_dir / "checkpoints")
    assert ckpt.name == "step-00000004"
    # the checkpoint's weights load into a fresh model, are finite, and equal the stopped model's
    from safetensors.torch import load_file

    state = json.loads((ckpt / "loop_state.json").read_text())
    assert state["step"] == 4
    model = toy_model()
    model.load_state_dict(load_file(ckpt / "model.safetensors"))
    assert torch.isfinite(flat_weights(model)).all()
    assert torch.equal(flat_weights(model), flat_weights(result.model))


def test_outputs_hold_the_contract(tmp_path):
    result, run_dir = run_toy(tmp_path, max_steps=6, save_every=0, eval_every=3)
    records = read_metrics(run_dir)
    train_recs = [r for r in records if r["split"] == "train"]
    eval_recs = [r for r in records if r["split"] == "eval"]
    assert [r["step"] for r in train_recs] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in eval_recs] == [3, 6]
    for r in train_recs:
        assert set(r) >= {"step", "epoch", "split", "loss", "lr"} and r["loss"] > 0 and 0 <= r["lr"] <= 0.05
    assert train_recs[0]["lr"] == 0.0 and max(r["lr"] for r in train_recs) == pytest.approx(0.05)  # warmup 1
    res = result.resources
    assert res["memory_kind"] == "rss" and res["peak_memory_mb"] > 50
    assert res["throughput"] > 0 and res["train_time_s"] > 0 and res["num_processes"] == 1
    summary = write_summary(run_dir, task="toy", model="mlp", resources=res,
                            train={"steps": result.steps, "final_loss": result.final_loss})
    on_disk = json.loads((run_dir / "summary.json").read_text())
    assert on_disk == summary and on_disk["train"]["steps"] == 6 and on_disk["method"] is None
    assert (run_dir / "checkpoints" / "latest").read_text() == "step-00000006"


def test_refuses_to_clobber_a_run_and_resume_without_checkpoint(tmp_path):
    write_json(tmp_path / "config.json", {"task": "caption"})
    reset_accelerate()
    acc = make_accelerator(LoopConfig())
    with pytest.raises(UserError, match="holds a 'caption' run"):
        prepare_run_dir(LoopConfig(output_dir=str(tmp_path)), "llm", "lora", acc)
    write_json(tmp_path / "config.json", {"task": "llm"})
    with pytest.raises(UserError, match="already holds a run"):
        prepare_run_dir(LoopConfig(output_dir=str(tmp_path)), "llm", "lora", acc)
    with pytest.raises(UserError, match="no checkpoint"):
        run_toy(tmp_path / "empty", resume="latest")


def test_wandb_offline_writes_a_run_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_toy(tmp_path / "run", max_steps=2, report_to="wandb")
    assert os.environ["WANDB_MODE"] == "offline"
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].rglob("*.wandb"))


def test_config_file_and_flags(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("lr: 0.5\nbatch_size: 3\nreport-to: none\n")
    cfg = parse_config(LoopConfig, ["--config", str(cfg_file), "--batch-size", "7"])
    assert cfg.lr == 0.5 and cfg.batch_size == 7
    with pytest.raises(UserError, match="unknown field"):
        cfg_file.write_text("lrr: 1\n")
        parse_config(LoopConfig, ["--config", str(cfg_file)])
    with pytest.raises(UserError, match="unrecognised"):
        parse_config(LoopConfig, ["--bogus", "1"])
