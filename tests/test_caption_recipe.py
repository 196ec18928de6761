"""train_caption.py and eval_caption.py end to end on the embedded data: every arch for a few steps through the CLI
(one run under `accelerate launch`), the run contract, figures, error analysis, re-evaluation and user errors."""
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hwtools.caption import synthetic
from hwtools.caption.vocab import Vocab
from hwtools.config import parse_config

ROOT = Path(__file__).resolve().parents[1]
ARCHS = ("cnn-rnn", "attention", "transformer")
EPOCHS = 2
# 16 train images x 5 captions / batch 16 = 5 steps per epoch; tiny decoders so a step is milliseconds
SMALL = ["--max-train-images", "16", "--max-eval-images", "6", "--epochs", str(EPOCHS), "--batch-size", "16",
         "--eval-batch-size", "8", "--log-every", "1", "--lr", "3e-3", "--embed-dim", "16",
         "--hidden-dim", "32", "--attention-dim", "16", "--d-model", "32", "--heads", "2", "--ff-dim", "64",
         "--num-layers", "1", "--report-to", "none"]
TEST_KEYS = ("bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rouge_l", "cider")


def load_script(name):
    """A launch/ script as a module, to call its main(argv) in this process (no second interpreter start)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "launch" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve string annotations through the module
    spec.loader.exec_module(module)
    return module


# tiny models: one thread each is faster than two threads fighting the other processes for two cores
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def runs(caption_cache, tmp_path_factory):
    """{arch: run dir} after a short training run of each arch, all three at once; the transformer goes through
    `accelerate launch`. Only the attention run decodes with beam search too (METEOR's Java start is slow)."""
    accelerate = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file",
                  str(ROOT / "accelerate_config.yaml")]
    logs = tmp_path_factory.mktemp("logs")
    out, procs = {}, {}
    for arch in ARCHS:
        out[arch] = tmp_path_factory.mktemp(f"run-{arch}")
        cmd = (accelerate if arch == "transformer" else [sys.executable]) + [
            "launch/train_caption.py", "--arch", arch, "--cache-dir", str(caption_cache), "--output-dir",
            str(out[arch]), "--overwrite", *SMALL, "--beam-size", "2" if arch == "attention" else "1",
            "--cpu-threads", "1"]
        if arch == "attention":  # this one reports to W&B (offline), as runs do by default
            cmd[cmd.index("--report-to") + 1] = "wandb"
        with open(logs / f"{arch}.log", "w") as log:  # a file, not a pipe: a full pipe would stall the run
            procs[arch] = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=log, stderr=subprocess.STDOUT)
    for arch, proc in procs.items():
        assert proc.wait(timeout=400) == 0, f"{arch} run failed:\n{(logs / f'{arch}.log').read_text()[-3000:]}"
    return out


@pytest.fixture
def one_thread():
    """Decode in this process with the runs' single thread, so sums happen in the same order as in training."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_wandb_summary_holds_the_caption_comparison_columns(runs):
    from tests.wandb_runs import wandb_inspect

    s = json.loads((runs["attention"] / "summary.json").read_text())
    run = wandb_inspect(runs["attention"])
    assert run["name"] == "attention" and run["config"]["arch"] == "attention" and run["config"]["lr"] == 3e-3
    columns = run["summary"]
    assert columns["arch"] == "attention" and columns["params.trainable"] == s["params"]["trainable"]
    for key in TEST_KEYS:
        assert columns[f"test.{key}"] == pytest.approx(s["test"][key]), key
    assert "resources.peak_memory_mb" in columns and "resources.phases.train" in columns


def test_config_resolves_per_arch_defaults():
    recipe = load_script("train_caption")
    cfgs = {a: parse_config(recipe.CaptionTrainConfig, ["--arch", a]) for a in ARCHS}
    assert (cfgs["cnn-rnn"].lr, cfgs["cnn-rnn"].dropout, cfgs["cnn-rnn"].num_layers) == (1e-3, 0.5, 1)
    assert (cfgs["transformer"].lr, cfgs["transformer"].dropout, cfgs["transformer"].num_layers) == (1e-3, 0.1, 2)
    assert cfgs["attention"].num_layers is None  # one LSTM cell
    assert parse_config(recipe.CaptionTrainConfig, ["--arch", "cnn-rnn", "--dropout", "0.2"]).dropout == 0.2
    assert len({c.epochs for c in cfgs.values()}) == 1  # comparable runs
    assert parse_config(recipe.CaptionTrainConfig, ["--arch", "transformer", "--lr", "0.01"]).lr == 0.01
    assert parse_config(recipe.CaptionTrainConfig, []).arch == "attention"


def test_unknown_arch_exits_2_with_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_script("train_caption").main(["--arch", "lstm"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: --arch lstm: choose one of cnn-rnn, attention, transformer"]


@pytest.mark.parametrize("arch", ARCHS)
def test_summary_follows_the_run_contract(runs, arch):
    s = json.loads((runs[arch] / "summary.json").read_text())
    assert (s["task"], s["arch"], s["model"], s["data"], s["method"]) == ("caption", arch, "embedded", "embedded", None)
    params = s["params"]
    # the frozen tf_efficientnet_lite0 backbone (3.37M) counts in the total, not in the trainable part
    assert params["total"] - params["trainable"] > 3_000_000 and params["trainable"] > 1000
    assert params["trainable_pct"] == pytest.approx(100 * params["trainable"] / params["total"])
    assert s["resources"]["throughput_unit"] == "images/s" and s["resources"]["throughput"] > 0
    assert list(s["resources"]["phases"]) == ["load", "train", "final_eval", "save"]
    assert s["train"]["steps"] == 5 * EPOCHS and math.isfinite(s["train"]["final_loss"])
    assert math.isfinite(s["eval"]["loss"]) and math.isfinite(s["test"]["loss"])
    test = s["test"]
    assert test["images"] == 6
    for key in TEST_KEYS:
        if test[key] is None:  # only METEOR may be missing, when Java is
            assert key == "meteor" and test["unavailable"] == ["meteor"]
            continue
        assert 0.0 <= test[key] <= (10.0 if key == "cider" else 1.0)
        if arch == "attention":
            assert test["beam_size"] == 2 and isinstance(test[f"beam_{key}"], float)
        else:
            assert f"beam_{key}" not in test
    assert set(test["failures"]) >= {"consensus_word_missing", "wrong_colour", "repeated_words"}
    assert s["data_report"]["rows_read"] == 10000 and s["data_report"]["rows_skipped"] == 0
    assert s["encoder"]["image_inputs"] == "cached features"


@pytest.mark.parametrize("arch", ARCHS)
def test_figures_errors_and_final_model(runs, arch):
    run = runs[arch]
    for name in ("loss.png", "samples.png"):
        assert (run / name).stat().st_size > 10_000, name
    heat = list(run.glob("attention_*.png"))
    assert len(heat) == (1 if arch == "attention" else 0)
    errors = (run / "errors.md").read_text()
    assert "## Typical failures" in errors and "### 1." in errors and "- references:" in errors
    assert "Scene facts checked for 6 image(s)." in errors
    final = run / "final"
    spec = json.loads((final / "caption_model.json").read_text())
    assert spec["arch"] == arch and spec["encoder"] == "embedded" and spec["knobs"]
    assert (final / "decoder.safetensors").stat().st_size > 1000
    assert Vocab.load(final) == Vocab.load(run)
    assert len(Vocab.load(run)) > 40  # built on the train split: shapes, colours, positions
    assert (run / "checkpoints").is_dir()


@pytest.mark.parametrize("arch", ARCHS)
def test_training_logs_losses_and_a_fixed_validation_caption_each_epoch(runs, arch):
    events = [json.loads(line) for line in (runs[arch] / "metrics.jsonl").read_text().splitlines()]
    train = [e["loss"] for e in events if e["split"] == "train"]
    assert len(train) == 5 * EPOCHS and train[-1] < train[0]
    assert len([e for e in events if e["split"] == "eval"]) == EPOCHS
    samples = [e for e in events if e["split"] == "sample"]
    assert [e["epoch"] for e in samples] == list(range(1, EPOCHS + 1))
    assert len({e["image"] for e in samples}) == 1 and all(isinstance(e["caption"], str) for e in samples)


def test_eval_caption_reproduces_the_test_scores(runs, tmp_path, capsys, one_thread):
    run = runs["attention"]
    # the same batch size and thread count as training's test pass, so every matrix product is the same
    load_script("eval_caption").main(["--run", str(run), "--output-dir", str(tmp_path), "--batch-size", "8",
                                      "--beam-size", "1"])
    again = json.loads((tmp_path / "eval.json").read_text())["test"]
    trained = json.loads((run / "summary.json").read_text())["test"]
    for key in TEST_KEYS:
        assert again[key] == trained[key], key
    assert "beam_bleu4" not in again
    assert (tmp_path / "errors.md").read_text() == (run / "errors.md").read_text().replace(
        "attention on embedded (embedded encoder)", "attention on embedded (embedded encoder), re-evaluated")
    assert (tmp_path / "samples.png").is_file() and list(tmp_path.glob("attention_*.png"))
    assert "wrote" in capsys.readouterr().out


def test_eval_caption_captions_image_files(runs, caption_cache, tmp_path, capsys):
    evaluator = load_script("eval_caption")
    images = sorted((synthetic.ensure_embedded(caption_cache) / synthetic.IMAGES_DIR).iterdir())[:2]
    evaluator.main(["--run", str(runs["attention"]), "--output-dir", str(tmp_path), "--beam-size", "1",
                    "--image", *map(str, images)])
    lines = [line for line in capsys.readouterr().out.splitlines() if "\t" in line]
    assert [line.split("\t")[0] for line in lines] == list(map(str, images))
    vocab = Vocab.load(runs["attention"])
    for line in lines:
        assert set(line.split("\t")[1].split()) <= set(vocab.itos)
    assert sorted(p.name for p in tmp_path.glob("attention_*.png")) == sorted(f"attention_{p.stem}.png"
                                                                               for p in images)
    with pytest.raises(SystemExit) as exit_info:
        evaluator.main(["--run", str(runs["cnn-rnn"]), "--image", str(tmp_path / "no.jpg")])
    assert exit_info.value.code == 2 and "no.jpg: image file missing" in capsys.readouterr().err
