#!/usr/bin/env python
"""Training records for the mixed long-context objective: each dialogue asks for its whole gold page
AND for the gold chunk inside it, as two records of one query. The two positives mask each other
out of the query's negatives (one query, several positives), so the loss asks the page vector to
keep the chunk's evidence visible: a page must win where its best window would.

Joins ../shared/data/doc2dial/pages/train_pages.jsonl (whole pages, BM25-mined page negatives) with
../shared/data/doc2dial/train_triples.jsonl (the same dialogues' gold chunks, BM25-mined chunk
negatives) on the dialogue turns. Nothing from the dev sets is read.

    python bench/mixed_page_chunks.py --output outputs/mixed_pages.jsonl
    bash bench/long_context_recipe.sh OUTPUT_DIR --train_data outputs/mixed_pages.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import sys

SHARED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data", "doc2dial")


def mixed_records(pages: list[dict], chunks: list[dict]) -> list[dict]:
    """Two records per dialogue found in both files: the page one, then the chunk one."""
    by_turns = {json.dumps(r["messages"], sort_keys=True): r for r in chunks}
    out = []
    for page in pages:
        chunk = by_turns.get(json.dumps(page["messages"], sort_keys=True))
        if chunk is None:
            continue
        for record in (page, chunk):
            out.append({"messages": record["messages"], "document": record["document"],
                        "positive": record["positive"], "hard_negatives": record["hard_negatives"]})
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pages", default=os.path.join(SHARED, "pages", "train_pages.jsonl"))
    parser.add_argument("--chunks", default=os.path.join(SHARED, "train_triples.jsonl"))
    parser.add_argument("--output", required=True)
    args = parser.parse_args(argv)
    for path in (args.pages, args.chunks):
        if not os.path.isfile(path):
            print(f"error: {path} not found", file=sys.stderr)
            return 2
    read = lambda path: [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]  # noqa: E731
    records = mixed_records(read(args.pages), read(args.chunks))
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as handle:
        handle.writelines(json.dumps(r) + "\n" for r in records)
    print(f"{len(records)} records ({len(records) // 2} dialogues, page and chunk each) written to {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
