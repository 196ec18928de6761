"""train_llm.py end to end: every method through the CLI on a tiny saved model, bad input, the embedded default."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hwtools.llm.methods import METHODS
from hwtools.train.accelerate_state import reset_accelerate
from tests.tiny_models import build_tiny_tokenizer, one_torch_thread  # noqa: F401
from tests.wandb_runs import wandb_inspect

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--max-steps", "2", "--batch-size", "2", "--max-length", "96", "--max-train-examples", "24",
        "--chrf-samples", "2", "--gen-max-new-tokens", "4", "--save-every", "1", "--log-every", "1"]


def run_main(argv):
    """Run the recipe in this process (imports are already paid for); accelerate's singletons are reset first."""
    reset_accelerate()
    sys.path.insert(0, str(ROOT / "launch"))
    try:
        import train_llm
    finally:
        sys.path.pop(0)
    train_llm.main(argv)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_runs_from_the_cli(method, tiny_gemma2, tmp_path):
    out = tmp_path / method
    run_main(["--method", method, "--model", str(tiny_gemma2), "--output-dir", str(out), *FAST])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"] == "llm" and summary["method"] == method and summary["train"]["steps"] == 2
    p = summary["params"]
    assert 0 < p["trainable"] <= p["total"]
    assert (p["trainable"] == p["total"]) == (method == "full")
    assert summary["resources"]["throughput_unit"] == "tokens/s" and summary["resources"]["throughput"] > 0
    phases = summary["resources"]["phases"]
    assert list(phases) == ["load", "base_eval", "train", "final_eval", "save"] and all(v >= 0 for v in phases.values())
    assert phases["train"] >= summary["resources"]["train_time_s"] - 0.5  # the loop's clock runs inside the phase
    test = summary["test"]
    assert test["loss"] > 0 and test["perplexity"] > 1 and test["base_loss"] > 0 and test["chrf"] is not None
    assert summary["data_report"]["rows_read"] == 827
    gens = json.loads((out / "generations.json").read_text())
    assert len(gens) >= 12 and all(g["before"] is not None and g["after"] is not None for g in gens)
    assert "| id | skill | prompt | reference | before | after |" in (out / "generations.md").read_text()
    assert (out / "loss.png").stat().st_size > 5000
    assert (out / "final" / "finetune.json").is_file()
    events = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["split"] == "train"] == [1, 2]
    config = json.loads((out / "config.json").read_text())
    assert config["method"] == method and config["packing_used"] == (method not in
                                                                      ("prompt-tuning", "prefix-tuning", "p-tuning"))


def test_finetuned_run_reloads_for_generation(tiny_gemma2, tmp_path):
    from hwtools.llm.generate import generate_answers
    from hwtools.llm.methods import load_finetuned

    out = tmp_path / "lora"
    run_main(["--method", "lora", "--model", str(tiny_gemma2), "--output-dir", str(out), *FAST])
    model, tok = load_finetuned(out, cache_dir=str(tmp_path / "cache"))
    answers = generate_answers(model, tok, [[{"role": "user", "content": "پایتخت ایران کجاست؟"}]],
                               max_new_tokens=4, batch_size=1)
    after = json.loads((out / "generations.json").read_text())
    assert answers[0] == after[0]["after"]  # the same prompt, same greedy decoding, same weights


def cli(*args, env_extra=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, str(ROOT / "launch/train_llm.py"), *args], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=600)


def test_default_run_reports_the_comparison_row_to_wandb(tiny_gemma2, tmp_path):
    """W&B is on by default (offline without a key): the run's W&B summary holds summary.json's comparison columns,
    its config every flag, its name the method; every phase shows a progress bar and the run ends with their times."""
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_MODE", "WANDB_API_KEY")}
    proc = subprocess.run([sys.executable, str(ROOT / "launch/train_llm.py"), "--method", "lora", "--model",
                           str(tiny_gemma2), "--output-dir", str(out), "--lora-r", "4", *FAST], capture_output=True,
                          text=True, cwd=ROOT, env={**env, "HOME": str(tmp_path), "WANDB_SILENT": "true"}, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    run = wandb_inspect(out)
    assert run["state"] == "finished" and run["name"] == "lora"
    columns = run["summary"]
    expected = {"method": "lora", "model": str(tiny_gemma2), "params.trainable": summary["params"]["trainable"],
                "params.total": summary["params"]["total"], "test.perplexity": summary["test"]["perplexity"],
                "resources.peak_memory_mb": summary["resources"]["peak_memory_mb"],
                "resources.train_time_s": summary["resources"]["train_time_s"]}
    for key, value in expected.items():
        assert columns[key] == (pytest.approx(value) if isinstance(value, float) else value), key
    for key in ("params.trainable_pct", "resources.throughput", "test.loss", "test.chrf", "test.base_chrf",
                "resources.phases.base_eval", "train.steps", "data_report.rows_used"):
        assert key in columns, key
    assert columns["train/loss"] > 0  # the loss curve went up too
    assert run["config"]["lora_r"] == 4 and run["config"]["method"] == "lora" and run["config"]["report_to"] == "wandb"
    assert run["config"]["gen_max_new_tokens"] == 4 and run["config"]["task"] == "llm"

    n_prompts = len(json.loads((out / "generations.json").read_text()))
    for bar in ("base answers: 100%", "answers: 100%", "base chrF answers: 100%", "chrF answers: 100%",
                "base test loss: 100%", "test loss: 100%"):
        assert bar in proc.stderr, bar
    assert f"{n_prompts}/{n_prompts}" in proc.stderr
    assert "phases (s): load" in proc.stdout and "final_eval" in proc.stdout
    assert "wandb leet" in proc.stdout  # the offline notice says how to look at the run


def test_method_typo_is_one_line_exit_2(tmp_path):
    proc = cli("--method", "lorra", "--output-dir", str(tmp_path / "x"))
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "lorra" in proc.stderr and "Traceback" not in proc.stderr


def test_offline_hub_id_is_one_line_exit_2(tmp_path):
    proc = cli("--method", "lora", "--model", "google/gemma-2-2b-it", "--output-dir", str(tmp_path / "x"),
               "--cache-dir", str(tmp_path / "cache"))
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "--model" in last and "Traceback" not in proc.stderr


@pytest.mark.integration
def test_lora_on_the_embedded_model_end_to_end(tmp_path):
    """The README's main job, shortened: accelerate launch, embedded Gemma-3-270M and embedded Persian data."""
    out = tmp_path / "run"
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file", "accelerate_config.yaml",
         "--num_cpu_threads_per_process", str(torch.get_num_threads()), "launch/train_llm.py", "--method", "lora",
         "--output-dir", str(out), "--max-steps", "2", "--batch-size", "1", "--max-length", "128",
         "--max-train-examples", "16", "--chrf-samples", "2", "--gen-max-new-tokens", "8", "--val-frac", "0.01"],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"] == "embedded" and summary["method"] == "lora"
    # r=8 on q,k,v,o of 18 Gemma-3-270M layers, plus the two turn markers' rows that auto picks (640 each): the base
    # checkpoint never trained <end_of_turn>
    assert summary["trainable_tokens"] == "<start_of_turn>,<end_of_turn>"
    assert "never trained <end_of_turn>" in summary["trainable_tokens_reason"]
    assert summary["params"]["trainable"] == 737_280 + 2 * 640
    assert summary["params"]["total"] == 268_098_176 + 737_280 + 2 * 640
    assert summary["train"]["steps"] == 2 and summary["train"]["final_loss"] > 0
    assert 1 < summary["test"]["perplexity"] < 1000 and summary["test"]["base_perplexity"] > 1
    assert (out / "final" / "adapter_model.safetensors").is_file()
