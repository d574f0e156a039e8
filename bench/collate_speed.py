#!/usr/bin/env python
"""What the token ids cached with the training data save: milliseconds to fetch and make one contrastive
batch from text rows (the collator tokenises) against rows with cached ids (it only picks them), and
the one-time seconds of tokenising the whole set into the cache, on real training sets.

    python bench/collate_speed.py            # Doc2Dial triples at 512 tokens, SQuALITY stories at 2048
"""

import os
import statistics
import tempfile
import time

from common import DOC2DIAL, RESULTS, SHARED, arguments, run, write_json

SETS = {  # name -> (path, passage tokens, hard negatives)
    "doc2dial_triples": (os.path.join(DOC2DIAL, "train_triples.jsonl"), 512, 1),
    "squality_train": (os.path.join(SHARED, "long", "squality_train"), 2048, 0),
}


def measure(path: str, length: int, negatives: int, batch: int, batches: int, tokenizer) -> dict:
    from longcontrast.collator import ContrastiveCollator
    from longcontrast.token_ids import with_token_ids
    from longcontrast.training_set import training_set

    with tempfile.TemporaryDirectory() as cache:
        data = training_set([path], num_turns=32, scores=False, cache_dir=cache)
        texts = data.rows
        started = time.perf_counter()
        with_token_ids(data, tokenizer, query_max_len=512, passage_max_len=length, query_prompts=("",),
                       passage_prompt="")
        build = time.perf_counter() - started
        collate = ContrastiveCollator(tokenizer, 512, length, negatives, max_positives=data.max_known_positives)
        result = {"rows": len(data), "tokenise_all_s": round(build, 2)}
        for name, rows in (("text", texts), ("cached_ids", data.rows)):
            times = []
            for start in range(0, batch * batches, batch):
                indices = [i % len(rows) for i in range(start, start + batch)]
                began = time.perf_counter()
                collate(rows.__getitems__(indices))  # as the DataLoader fetches a batch
                times.append(1000 * (time.perf_counter() - began))
            result[f"{name}_ms"] = round(statistics.median(times), 1)
        return result


def main(argv=None) -> int:
    parser = arguments(__doc__)
    parser.add_argument("--batch", type=int, default=16, help="rows per batch (default 16, the recipes')")
    parser.add_argument("--batches", type=int, default=20, help="batches timed per set; the median is reported")
    parser.add_argument("--output", default=os.path.join(RESULTS, "collate_speed.json"))
    args = parser.parse_args(argv)
    from transformers import AutoTokenizer

    from longcontrast.modeling import default_model_path

    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    results = {name: measure(path, length, negatives, args.batch, args.batches, tokenizer)
               for name, (path, length, negatives) in SETS.items()}
    print("| set | rows | passage tokens | batch from text, ms | batch from cached ids, ms | tokenising the set once, s |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['rows']} | {SETS[name][1]} | {r['text_ms']} | {r['cached_ids_ms']} | {r['tokenise_all_s']} |")
    write_json(args.output, {"batch": args.batch, "batches": args.batches, "results": results})
    return 0


if __name__ == "__main__":
    run(main)
