"""LoopState is loop_state.json, byte for byte as checkpoints were written before it existed; the paused meter."""
import json
from types import SimpleNamespace

import torch

from hwtools.train import meters
from hwtools.train.checkpoint import LoopState


def test_loop_state_reads_and_writes_the_checkpoint_format():
    # what train() wrote into every checkpoint before LoopState: these keys, this order, indent 1
    saved = {"step": 6, "epoch": 1, "batches_in_epoch": 0, "window": {"loss_sum": 0.25, "steps": 2},
             "last_logged": 0.5, "num_processes": 2}
    text = json.dumps(saved, indent=1)
    state = LoopState.from_json(text)
    assert state == LoopState(step=6, epoch=1, batches_in_epoch=0, window={"loss_sum": 0.25, "steps": 2},
                              last_logged=0.5, num_processes=2)
    assert state.to_json() == text


def test_an_older_loop_state_without_the_newer_keys_loads():
    state = LoopState.from_json('{"step": 4, "epoch": 0, "batches_in_epoch": 4, "window": {"loss_sum": 1.5, '
                                '"steps": 1}}')
    assert (state.step, state.batches_in_epoch, state.window["loss_sum"]) == (4, 4, 1.5)
    assert state.last_logged is None and state.num_processes == 1


def test_a_paused_meter_leaves_out_the_block_and_restarts_only_a_running_clock(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(meters, "time", SimpleNamespace(perf_counter=lambda: now[0]))
    meter = meters.ResourceMeter(torch.device("cpu"))
    meter.start()
    now[0] = 2.0
    with meter.paused():
        now[0] = 5.0
    now[0] = 6.0
    meter.stop()
    assert meter.elapsed == 3.0  # 0-2 and 5-6
    with meter.paused():  # stopped before: stays stopped
        now[0] = 9.0
    now[0] = 10.0
    meter.stop()
    assert meter.elapsed == 3.0
