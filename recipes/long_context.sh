#!/usr/bin/env bash
# The CPU long-context recipe (docs/results.md, "Long context"): all-MiniLM-L6-v2 extended to 8192 positions
# (copy init) and trained with GradCache on the mixed objective (data/mixed_page_chunks.py): each
# training dialogue of the shared Doc2Dial set asks for its WHOLE gold page (pages/train_pages.jsonl,
# one BM25-mined page of the same domain as hard negative, pages read up to 1024 tokens) and for its
# gold chunk (train_triples.jsonl, one BM25-mined chunk as hard negative), batch 16, one epoch.
# Positions are not shifted: chosen on the selection half of the page dev set over --shift_positions (PoSE),
# which read whole pages no better (docs/results.md, "Long context"). Nothing generated like the benchmark's passkey or
# needle documents is trained on. Then the chunk-level and the page-level dev sets are evaluated.
# Measured on 2 CPU cores: 19-20 minutes of training alone (36 with another run beside it), 4 of evaluation
# (the late-chunked windows come from the same pass that embeds the whole pages).
#
#   bash recipes/long_context.sh OUTPUT_DIR [extra efficient_train.py flags]
#   python bench/long_context.py --models "MiniLM 512=default" "recipe=OUTPUT_DIR"   # the long-context benchmark
#
# Writes the model to OUTPUT_DIR (AutoModel / SentenceTransformer folder) and the dev metrics to
# OUTPUT_DIR/eval_doc2dial_dev.json (chunks) and OUTPUT_DIR/eval_doc2dial_pages.json (whole pages beside
# the 512-position MiniLM, each also as MaxP over 512-token windows and late-chunked into the same windows,
# split by answer position and by page into selection and report halves, with paired intervals). Extra flags override the recipe's (e.g. the 512-position control:
# --max_position_embeddings 512 --passage_max_len 512; the shift ablation: --shift_positions). Environment: PYTHON (default python), SHARED
# (default ../shared/data/doc2dial).
set -euo pipefail
if [ $# -lt 1 ]; then echo "usage: bash recipes/long_context.sh OUTPUT_DIR [extra efficient_train.py flags]" >&2; exit 2; fi
out=$1; shift
shared=${SHARED:-../shared/data/doc2dial}
. "$(dirname "$0")/common.sh"
recipe_start "$out" "$shared/train_triples.jsonl" "$shared/pages/train_pages.jsonl" "$shared/dev/test.json" \
  "$shared/pages/dev/test.json"
"$python" data/mixed_page_chunks.py --pages "$shared/pages/train_pages.jsonl" --chunks "$shared/train_triples.jsonl" \
  --output "$work/mixed_pages.jsonl"
"$python" efficient_train.py --train_data "$work/mixed_pages.jsonl" \
  --output_dir "$out" --max_position_embeddings 8192 --position_init copy --shift_positions false \
  --passage_max_len 1024 --mini_batch_size 8 --mini_batch_tokens 8192 --num_hard_negatives 1 \
  --per_device_train_batch_size 16 --num_train_epochs 1 --temperature 0.05 --learning_rate 2e-5 \
  --save_strategy no --logging_steps 10 "$@"
trained=$SECONDS
"$python" evaluate.py --model_path "$out" --data-folder "$shared/dev" --eval-dataset doc2dial \
  --output_file "$out/eval_doc2dial_dev.json"
"$python" evaluate.py --model_path default "$out" --data-folder "$shared/pages/dev" --eval-dataset doc2dial \
  --passage_max_len 8192 --passage_window 512 --late_chunking --page_split --per_item \
  --output_file "$out/eval_doc2dial_pages.json"
echo "training ${trained} s, evaluation $((SECONDS - trained)) s; model in $out"
echo "long-context benchmark: $python bench/long_context.py --models \"MiniLM 512=default\" \"recipe=$out\""
