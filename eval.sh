#!/usr/bin/env bash
# Retrieval evaluation on ChatRAG-Bench's Doc2Dial, QuAC and QReCC; prints one table, writes JSON.
#
#   bash eval.sh                      # the embedded default model + the latest outputs/run-* model, if any
#   bash eval.sh MODEL_FOLDER ...     # the embedded default model + these
#
# Environment: DATA_FOLDER (default data/chatrag_sample, the generated sample; use the folder made by
# data/download_chatrag.py for the real sets), EVAL_DATASET (doc2dial|quac|qrecc|all), PYTHON.
# Extra evaluate.py flags go after `--`: bash eval.sh MODEL -- --batch_size 128
set -euo pipefail
cd "$(dirname "$0")"
models=(default)
extra=()
while [ $# -gt 0 ]; do
  if [ "$1" = "--" ]; then shift; extra=("$@"); break; fi
  models+=("$1"); shift
done
if [ ${#models[@]} -eq 1 ]; then
  latest=$(ls -dt outputs/run-*/ 2>/dev/null | while read -r d; do
             if [ -f "$d/config.json" ] || [ -f "$d/adapter_config.json" ] || [ -d "$d/query_encoder" ]; then echo "${d%/}"; break; fi
           done || true)
  if [ -n "${latest:-}" ]; then echo "also evaluating the latest trained model: $latest"; models+=("$latest"); fi
fi
exec "${PYTHON:-python}" evaluate.py --data-folder "${DATA_FOLDER:-data/chatrag_sample}" \
  --eval-dataset "${EVAL_DATASET:-all}" --model_path "${models[@]}" ${extra[@]+"${extra[@]}"}
