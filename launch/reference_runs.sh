#!/usr/bin/env bash
# Reproduce the committed reference runs under results/reference/ (CPU, embedded defaults, same budget and seed
# for every method / arch), then rebuild the comparison tables and results/REPORT.md from them.
#   bash launch/reference_runs.sh llm        # nine fine-tuning methods on the embedded Gemma-3-270M
#   bash launch/reference_runs.sh caption    # three captioning architectures on the embedded Flickr8k-layout set
#   bash launch/reference_runs.sh explore    # the committed explore outputs under results/explore/ (a minute)
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 WANDB_MODE=offline
launch() { .venv/bin/accelerate launch --config_file accelerate_config.yaml "$@"; }
what=${1:-all}
if [[ $what == explore || $what == all ]]; then
  .venv/bin/python launch/explore_llm_data.py --data embedded --output-dir results/explore/llm
  .venv/bin/python launch/explore_llm_model.py --model gemma-2-2b --output-dir results/explore/llm
  .venv/bin/python launch/explore_caption_data.py --data embedded --min-freq 5 --output-dir results/explore/caption
  .venv/bin/python launch/explore_caption_model.py --output-dir results/explore/caption
fi
if [[ $what == llm || $what == all ]]; then
  # Budget: whole epochs of the embedded training split at the recipe's default batch (8) and --max-length (256),
  # with no --max-steps. Packing keeps every example whole, so an epoch holds the same training tokens whether a
  # method packs them (LoRA family, partial, full: ~4 examples per 256-token row) or pads one example per row (the
  # soft prompts, whose virtual tokens belong to one example): every method sees exactly the same tokens, the soft
  # prompts in 3.3x more, smaller steps: 708 examples, 53,408 tokens, 211 packed rows = 27 packed or 89 padded
  # steps per epoch (results/explore/llm/stats.json -> train_epoch; each run's steps land in its summary.json).
  # A fixed --max-steps instead gave the soft prompts 40% of the others' tokens. LLM_EPOCHS (default 1: about 13 min
  # of LoRA training per method on 2 CPU cores) sets the length; evaluation runs about 7 times an epoch: every 4
  # packed steps, every 12 padded ones.
  epochs=${LLM_EPOCHS:-1}
  # the recipe's own defaults otherwise (batch 8, --max-length 256, 96 new tokens per answer, chrF on 8 test
  # conversations), so the reference runs are what the README's first command does, for longer;
  # --report-to none: no W&B folder inside the committed run folders
  budget=(--epochs "$epochs" --seed 42 --log-every 1 --report-to none)
  # Turn tokens (--trainable-tokens; the embedded base never trained <end_of_turn>, so it cannot learn to stop):
  #   soft prompts, partial: the embedding is frozen, no --trainable-tokens choice changes that (auto picks none;
  #     naming tokens is refused), so they cannot learn the end-of-turn row; partial trains layers 0-1 and 16-17 only.
  #   full: trains every embedding row anyway (auto picks none: the rows are already trainable).
  #   LoRA family: auto = chat here (+2 rows x 640 = 1,280 parameters), none = adapters only. Every method runs
  #     as such (none), and one extra LoRA run trains the turn markers (chat) to show what they add.
  #   An instruct checkpoint (gemma-2-2b-it) has trained turn markers: auto picks none there for every method.
  # LLM_METHODS picks a subset (each run is about 15 min on 2 CPU cores; lora-chat-tokens is the extra LoRA run)
  for m in ${LLM_METHODS:-prompt-tuning prefix-tuning p-tuning lora dora rslora qlora partial full lora-chat-tokens}; do
    case $m in prompt-tuning|prefix-tuning|p-tuning) every=12 ;; *) every=4 ;; esac
    case $m in lora-chat-tokens) run=(--method lora --trainable-tokens chat) ;; *) run=(--method "$m" --trainable-tokens none) ;; esac
    launch launch/train_llm.py "${run[@]}" --output-dir "results/reference/llm-$m" --overwrite "${budget[@]}" \
      --eval-every "$every"
  done
fi
if [[ $what == caption || $what == all ]]; then
  for a in cnn-rnn attention transformer; do
    launch launch/train_caption.py --arch "$a" --output-dir "results/reference/caption-$a" --overwrite \
      --seed 42 --epochs 5 --report-to none --cpu-threads 1
  done
fi
# the comparison tables, plots and results/REPORT.md from whatever the runs left there
.venv/bin/python launch/report.py
