#!/usr/bin/env python
"""Training records for the mixed long-context objective: each dialogue asks for its whole gold page
AND for the gold chunk inside it, as two records of one query. The two positives mask each other
out of the query's negatives (one query, several positives), so the loss asks the page vector to
keep the chunk's evidence visible: a page must win where its best window would.

Joins ../shared/data/doc2dial/pages/train_pages.jsonl (whole pages, BM25-mined page negatives) with
../shared/data/doc2dial/train_triples.jsonl (the same dialogues' gold chunks, BM25-mined chunk
negatives) on the dialogue turns. Nothing from the dev sets is read.

--chunks_in_page: the chunk record's positive becomes its page (cut to start where the chunk still
ends within --passage_max_len tokens) with the chunk's characters as ``positive_span``: the chunk is
read in the context of its page and its vector pools the chunk's tokens only, as late chunking reads
windows at evaluation (span pooling in training, Günther et al. 2024). Its hard negative stays the
mined chunk, read alone; --negatives_in_page reads the first (the one the recipe reads) inside the
training page that holds it (``negative_spans``), so positives and negatives are read the same way.

    python data/mixed_page_chunks.py --output outputs/mixed_pages.jsonl
    bash recipes/long_context.sh OUTPUT_DIR --train_data outputs/mixed_pages.jsonl
    python data/mixed_page_chunks.py --chunks_in_page --output outputs/mixed_spans.jsonl
    python data/mixed_page_chunks.py --chunks_in_page --negatives_in_page --output outputs/mixed_spans_neg.jsonl
    bash recipes/long_context.sh OUTPUT_DIR --train_data outputs/mixed_spans.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import re
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


def locate(page: str, chunk: str) -> tuple[int, int] | None:
    """The characters of ``page`` holding ``chunk``, whitespace runs counted as one (the chunk files
    and the page files space paragraphs differently); None when the chunk is not in the page."""
    starts, ends, words = [], [], []
    for match in re.finditer(r"\S+", page):
        starts.append(match.start())
        ends.append(match.end())
        words.append(match.group())
    wanted = chunk.split()
    if not wanted:
        return None
    joined, target = " ".join(words), " ".join(wanted)
    at = joined.find(target)
    # a match must start and end on word boundaries: count the words before it
    after = at + len(target)
    if at < 0 or (at > 0 and joined[at - 1] != " ") or (after < len(joined) and joined[after] != " "):
        return None
    first = joined[:at].count(" ")
    return starts[first], ends[first + len(wanted) - 1]


def chunk_in_page(page: str, span: tuple[int, int], tokenizer, max_tokens: int, margin: int = 8) -> tuple[str, list[int]]:
    """``page`` and ``span``, the page cut at a token start so that the span ends within the first
    ``max_tokens`` tokens (special tokens and ``margin`` kept free); the page whole where it already does."""
    offsets = tokenizer(page, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    last = max(i for i, (a, b) in enumerate(offsets) if a < span[1])  # the span's last token
    room = max_tokens - 2 - margin
    if last < room:
        return page, list(span)
    cut = offsets[last - room + 1][0]
    while cut > 0 and not page[cut - 1].isspace():  # start on a word, as a page would
        cut += 1
    return page[cut:], [span[0] - cut, span[1] - cut]


def in_page(chunk: str, pages: list[str], tokenizer, max_tokens: int) -> tuple[str, list[int]] | None:
    """The first of ``pages`` holding ``chunk``, cut by :func:`chunk_in_page`, and the chunk's span;
    None when no page holds it (or it is longer than the window)."""
    for page in pages:
        span = locate(page, chunk)
        if span is not None:
            text, cut_span = chunk_in_page(page, span, tokenizer, max_tokens)
            return (text, cut_span) if cut_span[0] >= 0 else None
    return None


def with_spans(records: list[dict], tokenizer, max_tokens: int, negatives_in_page: bool = False) -> tuple[list[dict], int, int]:
    """The chunk records (every second) as their page with the chunk's span; a chunk not found in its
    page stays read alone. ``negatives_in_page``: each chunk record's first hard negative too, inside
    whichever training page (a gold or a mined one) holds it. Returns the records and how many
    positives and negatives became spans."""
    pages = list(dict.fromkeys(t for r in records[::2] for t in [r["positive"], *r["hard_negatives"]]))
    out, spanned, negatives = [], 0, 0
    for page_record, chunk_record in zip(records[::2], records[1::2]):
        found = in_page(chunk_record["positive"], [page_record["positive"]], tokenizer, max_tokens)
        if found is not None:
            chunk_record = {**chunk_record, "positive": found[0], "positive_span": found[1]}
            spanned += 1
            if negatives_in_page and chunk_record["hard_negatives"]:
                negative = in_page(chunk_record["hard_negatives"][0], pages, tokenizer, max_tokens)
                if negative is not None:  # the first (the one the recipe reads); the others stay read alone
                    rest = chunk_record["hard_negatives"][1:]
                    chunk_record["hard_negatives"] = [negative[0], *rest]
                    chunk_record["negative_spans"] = [negative[1], *[None] * len(rest)]
                    negatives += 1
        out += [page_record, chunk_record]
    return out, spanned, negatives


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pages", default=os.path.join(SHARED, "pages", "train_pages.jsonl"))
    parser.add_argument("--chunks", default=os.path.join(SHARED, "train_triples.jsonl"))
    parser.add_argument("--output", required=True)
    parser.add_argument("--chunks_in_page", action="store_true",
                        help="each chunk read inside its page and pooled over its own tokens (positive_span)")
    parser.add_argument("--negatives_in_page", action="store_true",
                        help="with --chunks_in_page: each chunk's hard negative read inside the training page holding it")
    parser.add_argument("--passage_max_len", type=int, default=1024,
                        help="with --chunks_in_page: the training's --passage_max_len, within which each chunk must end")
    parser.add_argument("--model", default=None, help="whose tokenizer counts the tokens (default: the embedded MiniLM)")
    args = parser.parse_args(argv)
    if args.negatives_in_page and not args.chunks_in_page:
        print("error: --negatives_in_page reads the chunk records' negatives inside pages; it needs --chunks_in_page",
              file=sys.stderr)
        return 2
    for path in (args.pages, args.chunks):
        if not os.path.isfile(path):
            print(f"error: {path} not found", file=sys.stderr)
            return 2
    read = lambda path: [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]  # noqa: E731
    records = mixed_records(read(args.pages), read(args.chunks))
    note = ""
    if args.chunks_in_page:
        from longcontrast.modeling import default_model_path, load_tokenizer

        records, spanned, negatives = with_spans(records, load_tokenizer(args.model or default_model_path()),
                                                 args.passage_max_len, args.negatives_in_page)
        note = f"; {spanned} chunks read inside their page" + (f", {negatives} negatives inside theirs" if negatives else "")
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as handle:
        handle.writelines(json.dumps(r) + "\n" for r in records)
    print(f"{len(records)} records ({len(records) // 2} dialogues, page and chunk each{note}) written to {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
