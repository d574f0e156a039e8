#!/usr/bin/env bash
# The recommended CPU recipe (docs/recipe-study.md): all-MiniLM-L6-v2 trained on the queries and
# positives of ../shared/data/doc2dial/train_triples.jsonl, each query the whole conversation (all its
# turns, up to 512 tokens), with hard negatives re-mined by the model itself from the chunks of each
# query's own document (dev/documents.json: the corpus of every domain, used for negatives only) and
# filtered like NV-Retriever (nothing above 95% of the positive's cosine), the hardest one per query,
# two epochs; deployed fused with BM25 (0.8 z(cosine) + 0.2 z(BM25), evaluate.py --fuse_bm25 0.2); then
# evaluated on the Doc2Dial dev set split by page.
# Measured (docs/recipe-study.md; chosen on the selection half, 3 seeds): on the report half, the row
# OUTPUT_DIR+bm25@0.2 R@1 69.96, R@5 89.92 against BM25's 60.80 / 83.02 (R@1 +9.16 [+4.84, +13.68]);
# the model alone (row OUTPUT_DIR) R@1 65.53, +4.73 [-0.31, +9.98] over BM25.
#
#   bash recipes/doc2dial.sh OUTPUT_DIR
#
# Writes the model to OUTPUT_DIR (AutoModel / SentenceTransformer folder), the mined training file
# and its summary to OUTPUT_DIR/mined/, and the dev metrics (BM25, the untrained model, the trained one, each model
# also fused with BM25; split by page; paired differences to BM25) to OUTPUT_DIR/eval_doc2dial_dev.json.
# Environment: PYTHON (default python), SHARED (default ../shared/data/doc2dial), and any extra
# efficient_train.py flags after OUTPUT_DIR.
set -euo pipefail
if [ $# -lt 1 ]; then echo "usage: bash recipes/doc2dial.sh OUTPUT_DIR [extra efficient_train.py flags]" >&2; exit 2; fi
out=$1; shift
shared=${SHARED:-../shared/data/doc2dial}
. "$(dirname "$0")/common.sh"
query=(--query_turns 32 --query_max_len 512)  # the whole conversation (no Doc2Dial dialogue has more than 17 turns)
recipe_start "$out" "$shared/train_triples.jsonl" "$shared/dev/documents.json" "$shared/dev/test.json"
"$python" data/mine_hard_negatives.py --input "$shared/train_triples.jsonl" --corpus "$shared/dev/documents.json" \
  --per_document --model_name_or_path default --max_score_ratio 0.95 --num_negatives 7 --passage_max_len 512 \
  "${query[@]}" --output "$work/train_mined.jsonl"
mined=$SECONDS
"$python" efficient_train.py --train_data "$work/train_mined.jsonl" --output_dir "$out" \
  --num_hard_negatives 1 --per_device_train_batch_size 16 --num_train_epochs 2 --temperature 0.05 \
  --learning_rate 2e-5 --save_strategy no --logging_steps 10 "${query[@]}" "$@"
trained=$((SECONDS - mined))
mkdir -p "$out/mined"
mv "$work/train_mined.jsonl" "$work/train_mined.jsonl.json" "$out/mined/"
"$python" evaluate.py --model_path bm25 default "$out" --fuse_bm25 0.2 --data-folder "$shared/dev" --eval-dataset doc2dial \
  --page_split "${query[@]}" --output_file "$out/eval_doc2dial_dev.json"
echo "mining ${mined} s, training ${trained} s, evaluation $((SECONDS - mined - trained)) s; model in $out"
