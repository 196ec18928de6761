#!/usr/bin/env bash
# Reproduce the committed reference runs under results/reference/ (CPU, embedded defaults, same budget and seed
# for every method / arch), then rebuild the comparison tables from their summary.json files.
#   bash launch/reference_runs.sh llm        # nine fine-tuning methods on the embedded Gemma-3-270M
#   bash launch/reference_runs.sh caption    # three captioning architectures on the embedded Flickr8k-layout set
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 WANDB_MODE=offline
launch() { .venv/bin/accelerate launch --config_file accelerate_config.yaml "$@"; }
what=${1:-all}
if [[ $what == llm || $what == all ]]; then
  budget=(--max-steps 48 --batch-size 2 --max-length 192 --seed 42 --eval-every 12 --log-every 1 --save-every 0
          --gen-max-new-tokens 48 --chrf-samples 8 --gen-batch-size 8)
  # every method as such (--trainable-tokens none: the default auto would add the turn markers to the LoRA family)
  for m in prompt-tuning prefix-tuning p-tuning lora dora rslora qlora partial full; do
    launch launch/train_llm.py --method "$m" --output-dir "results/reference/llm-$m" --overwrite "${budget[@]}" \
      --trainable-tokens none
  done
  # the base model never trained its turn markers: LoRA that also trains their embedding rows
  launch launch/train_llm.py --method lora --trainable-tokens chat --output-dir results/reference/llm-lora-chat-tokens \
    --overwrite "${budget[@]}"
fi
if [[ $what == caption || $what == all ]]; then
  for a in cnn-rnn attention transformer; do
    launch launch/train_caption.py --arch "$a" --output-dir "results/reference/caption-$a" --overwrite \
      --seed 42 --epochs 5 --cpu-threads 1
  done
fi
.venv/bin/python launch/compare.py results/reference/* --output-dir results
