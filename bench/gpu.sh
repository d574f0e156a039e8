#!/usr/bin/env bash
# One-call GPU benchmark (one H100/H200, a few minutes, nothing downloaded): a BGE-large-shaped
# encoder built from a BertConfig, bf16, every text 8192 tokens, contrastive batches of 8 to 256
# texts (B queries + B positives), GradCache mini-batches of 4; origin only where it fits.
# Prints tokens/s, achieved TFLOP/s and the share of the card's measured bf16 matmul throughput,
# and peak memory; writes bench/results/gpu.json (+ .png). Commit the table it prints.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
python bench/train_speed.py --model bge-large-shape --data equal --lengths 8192 --hard_negatives 0 \
  --methods efficient --batch_sizes 4 8 32 128 --mini_batch_size 4 --bf16 --dropout 0 --steps 1 \
  --output bench/results/gpu.json "$@"
python bench/train_speed.py --model bge-large-shape --data equal --lengths 8192 --hard_negatives 0 \
  --methods origin --batch_sizes 4 --mini_batch_size 4 --bf16 --dropout 0 --steps 1 \
  --output bench/results/gpu_origin.json "$@"
python bench/train_speed.py --report bench/results/gpu.json
