#!/usr/bin/env bash
# Everything that only a GPU can show, in one prepared run (about 5-7 minutes on one H200; each section has its own
# time limit, and the whole run stops starting sections after BUDGET_S seconds, default 420):
#   cli-*        train_llm.py for a few steps on a small random Gemma-2 through `accelerate launch` with the shipped
#                accelerate_config.yaml (use_cpu: false): LoRA with bf16 weights under bf16 mixed precision, full
#                fine-tuning (fp32 trained weights), partial with fp16 weights under fp16 mixed precision (grad
#                scaler), and full fine-tuning under FSDP2 (final/, summary.json, answers and plots written)
#   real-size    bench_llm.py --real-size: Gemma-2-2B's architecture with random weights, per method peak memory
#   bench-*      bench_llm.py, bench_generate.py, bench_caption.py on CUDA (results named *_cuda / llm_real_size_cuda)
# Needs torch with CUDA, transformers, accelerate, peft, timm, sacrebleu, matplotlib; nothing is downloaded (random
# weights from known configs, the packaged data). Without bitsandbytes QLoRA is left out of the real-size section;
# without `datasets` the Trainer variants are left out of bench-llm, without `trl` (pip install 'hwtools[bench]')
# the SFTTrainer one.
#   bash launch/bench_gpu.sh OUTPUT_DIR     # PYTHON=... picks the interpreter (default .venv/bin/python, else python3)
#   SECTIONS="env tiny-model cli-fsdp" bash launch/bench_gpu.sh OUTPUT_DIR    # only these sections (BUDGET_S: seconds)
# OUTPUT_DIR receives three files: bench_gpu.log (every section's output), gpu_report.md (pass/fail per section, the
# checks' findings and every benchmark table) and bench_cuda.tar.gz (the *_cuda.md|json results for results/bench/,
# and the CLI runs' summary.json, config.json, metrics.jsonl, generations.md). Exit status: 0 only if every section
# passed.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: bash launch/bench_gpu.sh OUTPUT_DIR}
py=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
budget=${BUDGET_S:-420}
"$py" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else
  'error: bench_gpu.sh needs a CUDA device (torch.cuda.is_available() is False); the CPU benchmarks are launch/bench_*.py')" \
  || exit 1
mkdir -p "$out"
out=$(cd "$out" && pwd)
work=$(mktemp -d "${TMPDIR:-/tmp}/hwtools-gpu-XXXXXX")
export PY=$py WORK=$work HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled \
    PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HWTOOLS_CACHE="$work/cache" PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$work/logs" "$work/bench" "$work/runs"
log="$out/bench_gpu.log"
: >"$log"


results=()
failed=0
section() {  # section NAME LIMIT_S FUNCTION: run it under a time limit; a failure is recorded and the next one runs
  local name=$1 limit=$2 fn=$3 left=$((budget - SECONDS)) start=$SECONDS rc
  if [[ -n ${SECTIONS:-} && " $SECTIONS " != *" $name "* ]]; then
    results+=("| $name | not selected | SECTIONS=\"$SECTIONS\" |"); return
  fi
  if ((left < 30)); then
    results+=("| $name | not run | time budget of ${budget} s spent |"); failed=1
    echo "== $name: not run (budget spent)" | tee -a "$log"; return
  fi
  ((limit > left)) && limit=$left
  echo "== $name (limit ${limit} s)" | tee -a "$log"
  timeout --kill-after=15 "$limit" bash -c "$fn" >"$work/logs/$name.log" 2>&1
  rc=$?
  cat "$work/logs/$name.log" >>"$log"
  if ((rc == 0)); then
    results+=("| $name | ok | $((SECONDS - start)) s |")
    echo "   ok in $((SECONDS - start)) s" | tee -a "$log"
  else
    local why="exit $rc"; ((rc == 124 || rc == 137)) && why="timed out after ${limit} s"
    results+=("| $name | FAILED | $why, $((SECONDS - start)) s |"); failed=1
    echo "   FAILED ($why); last lines:" | tee -a "$log"; tail -n 20 "$work/logs/$name.log"
  fi
}

env_info() {
  "$PY" - <<'EOF'
import importlib.util, torch
from hwtools.device import bf16_supported
d = torch.device("cuda")
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), {torch.cuda.get_device_name(d)}, capability "
      f"{torch.cuda.get_device_capability(d)}, native bf16: {bf16_supported(d)}")
for name in ("transformers", "accelerate", "peft", "timm", "bitsandbytes", "datasets", "flash_attn"):
    spec = importlib.util.find_spec(name)
    print(f"{name}: {__import__(name).__version__ if spec else 'not installed'}")
EOF
}
export -f env_info

tiny_model() {  # a small random Gemma-2 (soft-capping, sliding windows, tied head) with a BPE tokenizer, saved
  "$PY" - "$WORK/tiny-gemma2" <<'EOF'
import json, sys
import torch
from transformers import AutoModelForCausalLM
from hwtools.llm.data import EMBEDDED_TRAIN
from hwtools.llm.tiny import tiny_config, train_bpe_tokenizer
texts = [t["value"] for line in EMBEDDED_TRAIN.read_text(encoding="utf-8").splitlines()
         for t in json.loads(line)["conversations"]]
tok = train_bpe_tokenizer(texts, 4096)
torch.manual_seed(0)
config = tiny_config("gemma2", 4096, hidden_size=256, num_layers=4, head_dim=64, sliding_window=4096,
                     max_position_embeddings=8192)
config._attn_implementation = "eager"  # soft-capping needs it
model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
model.save_pretrained(sys.argv[1]); tok.save_pretrained(sys.argv[1])
print(f"saved {sys.argv[1]}: {sum(p.numel() for p in model.parameters()):,} parameters, vocab {len(tok)}")
EOF
}
export -f tiny_model

check_run() {  # check_run RUN_DIR MIXED_PRECISION LOADED_DTYPE FINAL_DTYPE|-: on CUDA as asked, finite, final/ written
  "$PY" - "$@" <<'EOF'
import json, math, sys
from pathlib import Path
run, mixed, loaded, want = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
s = json.loads((run / "summary.json").read_text())
r, t = s["resources"], s["test"]
assert r["device"].startswith("cuda"), f"trained on {r['device']}, not on the GPU"
assert s["train"]["stopped_reason"] is None and math.isfinite(s["train"]["final_loss"]), s["train"]
assert math.isfinite(t["loss"]) and math.isfinite(t["base_loss"]), t
assert (run / "final" / "finetune.json").is_file() and (run / "generations.md").is_file()
assert (run / "loss.png").is_file()
if want != "-":
    from safetensors import safe_open
    with safe_open(str(run / "final" / "model.safetensors"), "pt") as f:
        dtypes = {str(f.get_slice(k).get_dtype()) for k in f.keys()}
    assert dtypes == {want}, f"final weights {dtypes}, expected {want}"
cfg = json.loads((run / "config.json").read_text())
if loaded == "auto":  # what --dtype auto picks for the method on this GPU
    import torch
    from hwtools.llm.models import weights_dtype
    loaded = str(weights_dtype("auto", torch.device("cuda"), cfg["method"])).replace("torch.", "")
assert (cfg["mixed_precision_used"], cfg["weights_dtype"]) == (mixed, loaded), (cfg["mixed_precision_used"],
                                                                                 cfg["weights_dtype"])
print(f"CHECK {run.name}: ok on {r['device']} ({loaded} weights, mixed precision {mixed}, "
      f"{cfg['attn_implementation_used']} attention): "
      f"test loss {t['base_loss']:.3f} -> {t['loss']:.3f}, {r['throughput']:.0f} {r['throughput_unit']}, peak "
      f"{r['peak_memory_mb']:.0f} MiB allocated / {r.get('peak_memory_reserved_mb')} MiB reserved "
      f"({r.get('peak_memory_scope')})")
EOF
}
export -f check_run

# the recipe as a user starts it: accelerate launch with the shipped config; few steps, short answers
recipe() {  # recipe RUN_NAME [accelerate launch flags] -- [train_llm flags]
  local name=$1; shift
  local launch_flags=()
  while (($#)) && [[ $1 != -- ]]; do launch_flags+=("$1"); shift; done
  shift
  "$PY" -m accelerate.commands.launch "${launch_flags[@]}" launch/train_llm.py --model "$WORK/tiny-gemma2" \
    --output-dir "$WORK/runs/$name" --max-steps 6 --batch-size 4 --max-length 256 --max-train-examples 64 \
    --chrf-samples 4 --gen-max-new-tokens 16 --gen-batch-size 8 --log-every 2 --report-to none "$@"
}
export -f recipe

cli_lora_bf16() {  # crash points 1, 2, 4 (placement), 9: bf16 weights (--dtype auto) under bf16 mixed precision
  recipe lora-bf16 --config_file accelerate_config.yaml --mixed_precision bf16 -- --method lora \
    && check_run "$WORK/runs/lora-bf16" bf16 auto -
}
cli_full() {  # point 6: --dtype auto keeps full fine-tuning's weights in fp32, computing in bf16
  recipe full-auto --config_file accelerate_config.yaml --mixed_precision bf16 -- --method full \
    && check_run "$WORK/runs/full-auto" bf16 auto F32
}
cli_partial_fp16() {  # point 3: fp16 weights, trained layers in fp32, fp16 grad scaler
  recipe partial-fp16 --config_file accelerate_config.yaml -- --method partial --dtype fp16 --mixed-precision fp16 \
    && check_run "$WORK/runs/partial-fp16" fp16 float16 -
}
cli_fsdp() {  # point 5: FSDP2 (one process) gathers a full state dict for final/ and writes the whole run contract
  cat >"$WORK/fsdp.yaml" <<'EOF'
compute_environment: LOCAL_MACHINE
distributed_type: FSDP
mixed_precision: bf16
num_machines: 1
num_processes: 1
machine_rank: 0
use_cpu: false
fsdp_config:
  fsdp_version: 2
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_transformer_layer_cls_to_wrap: Gemma2DecoderLayer
  fsdp_reshard_after_forward: true
  fsdp_state_dict_type: SHARDED_STATE_DICT
  fsdp_cpu_ram_efficient_loading: false
  fsdp_offload_params: false
  fsdp_activation_checkpointing: false
EOF
  recipe fsdp-full --config_file "$WORK/fsdp.yaml" -- --method full --dtype fp32 && check_run "$WORK/runs/fsdp-full" bf16 float32 F32
}
export -f cli_lora_bf16 cli_full cli_partial_fp16 cli_fsdp

real_size() {  # point 7: Gemma-2-2B with random weights, the recipe's weights dtype, each method's model freed
  local methods=(lora prefix-tuning partial)
  "$PY" -c "import bitsandbytes" 2>/dev/null && methods=(lora qlora prefix-tuning partial)
  "$PY" launch/bench_llm.py --real-size --device cuda --real-size-methods "${methods[@]}" --output-dir "$WORK/bench"
}
bench_llm() {
  local variants=(loop-packed loop-padded bare-packed)
  "$PY" -c "import datasets" 2>/dev/null && variants+=(trainer-padded trainer-grouped)
  "$PY" -c "import datasets, trl" 2>/dev/null && variants+=(trl-packed)  # the optional hwtools[bench] extra
  "$PY" launch/bench_llm.py --device cuda --no-memory --variants "${variants[@]}" --output-dir "$WORK/bench"
}
bench_generate() { "$PY" launch/bench_generate.py --device cuda --repeats 2 --output-dir "$WORK/bench"; }
bench_caption() {  # random-weight encoder of the embedded one's architecture (its weights package may be missing)
  "$PY" launch/bench_caption.py --device cuda --encoder tf_efficientnet_lite0 --num-workers 4 \
    --output-dir "$WORK/bench"
}
export -f real_size bench_llm bench_generate bench_caption

section env 60 env_info
section tiny-model 90 tiny_model
section cli-lora-bf16 100 cli_lora_bf16
section cli-full 90 cli_full
section cli-partial-fp16 90 cli_partial_fp16
section cli-fsdp 100 cli_fsdp
section real-size 200 real_size
section bench-llm 150 bench_llm
section bench-generate 120 bench_generate
section bench-caption 180 bench_caption

{
  echo "# GPU check: launch/bench_gpu.sh"
  echo
  echo "$(date -u '+%Y-%m-%d %H:%M:%S UTC'), $SECONDS s in all; interpreter $py."
  echo
  grep -h -E '^(torch|transformers|accelerate|peft|timm|bitsandbytes|datasets|flash_attn)' "$work/logs/env.log" \
    2>/dev/null | sed 's/^/- /'
  echo
  echo "| section | result | time |"
  echo "|---|---|---|"
  printf '%s\n' "${results[@]}"
  echo
  grep -h '^CHECK ' "$work"/logs/*.log 2>/dev/null | sed 's/^CHECK /- /'
  for md in "$work"/bench/*.md; do [ -f "$md" ] && { echo; cat "$md"; }; done
} >"$out/gpu_report.md"
(cd "$work" && find bench runs -maxdepth 2 -type f \( -name '*.md' -o -name '*.json' -o -name '*.jsonl' \) -print0 \
  | tar -czf "$out/bench_cuda.tar.gz" --null -T -)
echo "wrote $out/gpu_report.md, $out/bench_cuda.tar.gz and $log ($SECONDS s)"
[ -n "${KEEP_WORK:-}" ] && echo "work dir kept: $work" || rm -rf "$work"
exit $failed
