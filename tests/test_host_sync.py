"""The training loop and the LLM loss make no host<->device sync on a micro-step that neither logs nor saves.

On the CPU nothing waits, so the test counts the operations that would: aten._local_scalar_dense (behind .item(),
int(), float(), bool() of a tensor) and ops whose output shape depends on tensor values (nonzero, masked_select,
boolean-mask indexing), seen by a TorchDispatchMode.
"""
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from hwtools.llm import data as D
from hwtools.llm.loss import causal_lm_loss
from hwtools.train.loop import train
from test_llm_loss import method_model
from test_loop import ToyData, mse, run_toy, toy_model
from tests.tiny_models import tiny_chat_batch

SYNC_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "item", "is_nonzero"}


class SyncCounter(TorchDispatchMode):
    """Counts syncing ops, attributed to the current `where` label; ops inside `paused()` are not counted."""

    def __init__(self):
        super().__init__()
        self.where, self.counts, self.paused = 0, {}, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        bool_index = name == "index" and any(t is not None and t.dtype == torch.bool for t in args[1])
        if not self.paused and (name in SYNC_OPS or bool_index):
            self.counts.setdefault(self.where, []).append(name)
        return func(*args, **kwargs)


def test_loss_with_a_collated_batch_makes_no_sync(tiny_dirs, tmp_path):  # noqa: F811
    model, tok = method_model(tiny_dirs, "gemma2", "prompt-tuning", tmp_path)  # virtual tokens shift the rows
    hand = tiny_chat_batch(tok)
    rows = [{"input_ids": ids[m.bool()].tolist(), "labels": lab[m.bool()].tolist()}
            for ids, lab, m in zip(hand["input_ids"], hand["labels"], hand["attention_mask"])]
    batch = D.collate_padded(rows, pad_id=tok.pad_token_id)
    batch.pop("num_tokens")
    with torch.no_grad():
        reference = model(**{k: batch[k] for k in ("input_ids", "labels", "attention_mask")}).loss
    counter = SyncCounter()
    with counter:
        loss, n = causal_lm_loss(model.train(), batch, chunk_size=7)
        loss.backward()
    assert counter.counts == {}
    assert n == int((batch["labels"][:, 1:] != -100).sum()) and abs(loss.item() - reference.item()) < 1e-5
    # without loss_index (a hand-made batch) the loss makes the index itself: the same value, one nonzero
    counter = SyncCounter()
    with counter, torch.no_grad():
        loss2, n2 = causal_lm_loss(model, {k: v for k, v in batch.items() if k != "loss_index"})
    assert n2 == n and abs(loss2.item() - loss.item()) < 1e-6 and counter.counts == {0: ["nonzero"]}


class CountingAdamW(torch.optim.AdamW):
    """torch's non-fused AdamW reads its step counter (a CPU tensor even on a GPU) with .item(): not the loop's."""

    counter = None

    def step(self, closure=None):
        self.counter.paused += 1
        try:
            return super().step(closure)
        finally:
            self.counter.paused -= 1


def test_loop_syncs_only_at_log_save_and_epoch_end_steps(tmp_path, monkeypatch):
    import test_loop

    counter, micro = SyncCounter(), iter(range(1, 100))

    def loss_fn(model, batch):
        counter.where = next(micro) if model.training else "eval"
        return mse(model, batch)

    def counted_train(*args, **kwargs):
        model = args[1]
        CountingAdamW.counter = counter
        with counter:
            return train(*args, **kwargs, optimizer=CountingAdamW(model.parameters(), lr=0.01))

    monkeypatch.setattr(test_loop, "train", counted_train)
    # 32 examples / batch 4 = 8 micro-steps an epoch; grad_accum 2: 4 steps an epoch; logs at steps 3 and 6
    # (micro-steps 6 and 12), an epoch end (and its save) after micro-step 8, the run's end after micro-step 12
    result, _ = run_toy(tmp_path, loss_fn=loss_fn, model=toy_model(), data=ToyData(n=32), grad_accum=2, max_steps=6,
                        log_every=3, save_every=0, max_grad_norm=1.0)
    assert result.steps == 6 and result.stopped_reason is None
    micro = {k: v for k, v in counter.counts.items() if isinstance(k, int) and k > 0}
    assert max(micro) <= 12 and {6, 12} <= set(micro)  # the log steps read the loss: the counter sees syncs
    assert set(micro) <= {6, 8, 12}, counter.counts  # no other micro-step made any


def test_non_finite_loss_found_late_is_never_saved(tmp_path):
    """Read at the next log or save step only, a non-finite loss still stops the run before any checkpoint holds it."""
    import json

    from safetensors.torch import load_file

    from hwtools.train.checkpoint import latest_checkpoint
    from test_loop import flat_weights, train_losses

    def nan_at_step_5(model, batch, calls={"n": 0}):
        calls["n"] += 1
        loss, n = mse(model, batch)
        return (loss * float("nan"), n) if calls["n"] == 5 else (loss, n)

    # logs every 4 steps, saves every 3: the flag is read before the step-6 save (after step 5's update)
    result, run_dir = run_toy(tmp_path, loss_fn=nan_at_step_5, log_every=4, save_every=3)
    assert result.stopped_reason == "non-finite loss at step 5"
    assert result.steps == 5  # step 5's update ran; step 6 stopped before its update and its save
    ckpt = latest_checkpoint(run_dir / "checkpoints")
    assert ckpt.name == "step-00000003" and json.loads((ckpt / "loop_state.json").read_text())["step"] == 3
    model = toy_model()
    model.load_state_dict(load_file(ckpt / "model.safetensors"))
    assert torch.isfinite(flat_weights(model)).all()
    assert [s for s, _ in train_losses(run_dir)] == [4]  # nothing logged after the bad step
    assert result.final_loss == train_losses(run_dir)[0][1]


def test_resume_mid_log_window_reproduces_the_logged_losses(tmp_path):
    """The loss window kept on the device is folded into the checkpoint at a save between two log steps."""
    import pytest

    from test_loop import Kill, flat_weights, killing_loss, train_losses

    full, full_dir = run_toy(tmp_path / "full", log_every=4, save_every=3)
    with pytest.raises(Kill):
        run_toy(tmp_path / "cut", loss_fn=killing_loss(8), log_every=4, save_every=3)  # dies after the step-6 save
    resumed, cut_dir = run_toy(tmp_path / "cut", resume="latest", log_every=4, save_every=3)
    assert torch.equal(flat_weights(full.model), flat_weights(resumed.model))
    assert [s for s, _ in train_losses(full_dir)] == [4, 8, 10]
    assert train_losses(cut_dir) == train_losses(full_dir) and resumed.final_loss == full.final_loss
