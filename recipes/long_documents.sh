#!/usr/bin/env bash
# Long documents read token by token (docs/late-interaction.md): all-MiniLM-L6-v2 extended to 8192 positions
# (copy init) and trained as a late-interaction model (--colbert_dim 128: a 128-d vector per token, MaxSim)
# with GradCache on the SQuALITY training stories (50 stories of about 7,000 tokens, 999 queries; each story
# read up to 2048 tokens), batch 16, 24 steps, seed 42. Chosen on the selection half of qmsum_dev among
# Doc2Dial chunks at 512 tokens, SQuALITY at 512 and SQuALITY at 2048, each read in 512- or 2048-token
# segments; distillation from the BM25-fused untrained reading and Doc2Dial chunks mixed in were measured and
# not chosen (docs/late-interaction.md, "The study"). Then the model reads every document whole, in consecutive
# 512-token segments, and is evaluated beside BM25, MiniLM's 512-token windows (MaxP) and MiniLM's own
# untrained late interaction, alone and fused with BM25 (weight 0.5), on the QMSum transcripts (development
# only: never trained on), the SQuALITY dev stories and the Doc2Dial chunk dev set.
# Measured on 2 CPU cores: about 13 minutes of training, 25 of evaluation.
#
#   bash recipes/long_documents.sh OUTPUT_DIR [extra efficient_train.py flags]
#   python evaluate.py --model_path OUTPUT_DIR bm25 --beir ANY_BEIR_FOLDER --passage_max_len 512 --fuse_bm25 0.5
#
# Writes the model to OUTPUT_DIR (PyLate's layout; AutoModel loads its encoder) and the dev metrics, per item,
# split into selection and report halves, to OUTPUT_DIR/eval_qmsum_dev.json, eval_squality_dev.json and
# eval_doc2dial_dev.json (bench/paired.py compares any two rows of them). Environment: PYTHON (default
# python), SHARED (default ../shared/data).
set -euo pipefail
if [ $# -lt 1 ]; then echo "usage: bash recipes/long_documents.sh OUTPUT_DIR [extra efficient_train.py flags]" >&2; exit 2; fi
out=$1; shift
shared=${SHARED:-../shared/data}
. "$(dirname "$0")/common.sh"
recipe_start "$out" "$shared/long/squality_train/qrels/train.tsv" "$shared/long/qmsum_dev/qrels/test.tsv" \
  "$shared/long/squality_dev/qrels/test.tsv" "$shared/doc2dial/dev/test.json"
"$python" efficient_train.py --train_data "$shared/long/squality_train" --output_dir "$out" --colbert_dim 128 \
  --max_position_embeddings 8192 --position_init copy --shift_positions false --passage_max_len 2048 \
  --mini_batch_size 4 --mini_batch_tokens 8192 --num_hard_negatives 0 --per_device_train_batch_size 16 \
  --max_steps 24 --temperature 0.05 --learning_rate 2e-5 --save_strategy no --seed 42 --logging_steps 4 "$@"
trained=$SECONDS
for set in qmsum_dev squality_dev; do
  "$python" evaluate.py --model_path bm25 default "$out" --untrained_colbert_dim 128 --beir "$shared/long/$set" \
    --passage_max_len 512 --passage_window 512 --fuse_bm25 0.5 --page_split --per_item \
    --output_file "$out/eval_$set.json"
done
"$python" evaluate.py --model_path bm25 default "$out" --data-folder "$shared/doc2dial/dev" --eval-dataset doc2dial \
  --query_turns 32 --query_max_len 512 --fuse_bm25 0.5 --page_split --per_item --output_file "$out/eval_doc2dial_dev.json"
echo "training ${trained} s, evaluation $((SECONDS - trained)) s; model in $out"
echo "paired intervals: $python bench/paired.py $out/eval_qmsum_dev.json --pairs default@colbert128 $out bm25 $out+bm25@0.5"
