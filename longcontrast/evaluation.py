"""Top-k retrieval evaluation on ChatRAG-Bench conversational sets (Doc2Dial, QuAC, QReCC).

Protocol: each item ranks the chunks of its own document; the query is the last ``num_turns``
turns written as ``user: ...`` / ``agent: ...`` lines (:func:`longcontrast.data.format_query`),
truncated from the left; similarity is the cosine of the pooled, L2-normalised embeddings. The gold
chunk is ranked by :func:`.metrics.gold_rank`: its copies are the gold, other ties are broken at
random and scored in expectation. Metrics: Recall@1/5/20, MRR@20 and NDCG@20 (one relevant chunk).
With ``passage_window`` the set is also scored with every chunk as the best of its windows (MaxP),
and with ``late_chunking`` as the best of the same windows pooled from one pass over the whole chunk;
with ``fuse_bm25`` also with the model's scores fused with BM25's (a convex combination of z-scores).
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import UserError
from .bm25 import BM25
from .batching import unique_sequences
from .inference import encode, late_chunk_embeddings
from .readers import read_json
from .records import format_query
from .tokenization import split_windows, tokenize, window_spans
from .metrics import CHATRAG_METRICS, DEGENERATE_SPREAD, gold_rank, per_item_metrics
from .search import max_per_passage, score_fusion

logger = logging.getLogger(__name__)

DATASETS = ("doc2dial", "quac", "qrecc")
# BM25's weight in the hybrid (search.score_fusion) when --fuse_bm25 names none: the best of 0.2-0.5 on
# the selection half of the Doc2Dial dev set (docs/results.md, the recipe study)
DEFAULT_BM25_WEIGHT = 0.3
METRICS = CHATRAG_METRICS


@dataclass
class Item:
    id: str
    query: str
    document: str
    gold_index: int
    answers: list[str]
    gold_start_token: int | None = None  # where the answer starts in the gold text (long-document sets)
    page: str = ""  # the page the dialogue is about (source_doc_id): what --page_split splits by


def split_pages(items: list[Item]) -> dict[str, str]:
    """Each page's half of a set split by page, for choosing on one half and reporting the other:
    pages in the order of a hash of their name, each to the half with fewer items so far, so both
    halves hold about as many items and no page is in both. Returns page -> "selection" | "report"."""
    count = Counter(item.page for item in items)
    sizes, part = {"selection": 0, "report": 0}, {}
    for page in sorted(count, key=lambda name: hashlib.blake2b(name.encode("utf-8"), digest_size=8).digest()):
        part[page] = min(sizes, key=lambda half: (sizes[half], half == "report"))
        sizes[part[page]] += count[page]
    return part


def load_chatrag(data_folder: str, dataset: str, num_turns: int = 5) -> tuple[list[Item], dict[str, list[str]]]:
    """The items of ``DATA_FOLDER/<dataset>/test.json`` and the documents they rank.

    A ``data_folder`` that holds ``test.json`` itself (and no ``<dataset>/`` folder) is read as that set.

    Every problem (missing file, an item whose document is absent, a gold index out of range, an
    empty set) raises :class:`UserError` naming the file and item.
    """
    folder = Path(data_folder) / dataset
    if not folder.is_dir() and (Path(data_folder) / "test.json").is_file():
        folder = Path(data_folder)  # a folder holding one set directly, e.g. ../shared/data/doc2dial/dev
    records, documents = (read_json(folder / name) for name in ("test.json", "documents.json"))
    if not isinstance(records, list):
        raise UserError(f"{folder / 'test.json'}: expected a list of items")
    if not isinstance(documents, dict):
        raise UserError(f"{folder / 'documents.json'}: expected an object of document id -> list of chunks")
    items = []
    for position, record in enumerate(records):
        where = f"{folder / 'test.json'}: item {position}"
        try:
            item_id = str(record.get("id", position))
            messages, document = record["messages"], str(record["document"])
            gold = record["ground_truth_ctx"]["index"]
        except (AttributeError, KeyError, TypeError) as err:
            raise UserError(f"{where}: needs 'messages', 'document' and 'ground_truth_ctx.index' ({err})") from err
        where = f"{folder / 'test.json'}: item {position} (id {item_id})"
        if document not in documents:
            raise UserError(f"{where}: document {document!r} is not in documents.json")
        chunks = documents[document]
        if not isinstance(gold, int) or not 0 <= gold < len(chunks):
            raise UserError(f"{where}: gold index {gold!r} is out of range for the {len(chunks)} chunks of {document!r}")
        if not isinstance(messages, list) or not messages:
            raise UserError(f"{where}: 'messages' must be a non-empty list of turns")
        answers = record.get("answers") or []
        start = record.get("gold_start_token")
        if start is not None and not isinstance(start, int):
            raise UserError(f"{where}: 'gold_start_token' must be an integer, got {start!r}")
        # the page (Doc2Dial's source_doc_id), else the dialogue (the id before its turn number)
        page = str(record.get("source_doc_id") or record["ground_truth_ctx"].get("page") or item_id.rsplit("_", 1)[0])
        items.append(Item(item_id, format_query(messages, num_turns), document, gold, [str(a) for a in answers], start,
                          page))
    if not items:
        raise UserError(f"{folder / 'test.json'}: the evaluation set is empty")
    return items, documents


@dataclass(kw_only=True)
class EvalConfig:
    query_max_len: int = 256
    passage_max_len: int = 1024
    batch_size: int = 64  # texts per forward pass
    max_tokens: int | None = None  # padded tokens per forward pass (None: inference.DEFAULT_MAX_TOKENS)
    num_turns: int = 5
    qrecc_answer_rule: bool = True
    autocast: torch.dtype | None = None  # encode under autocast in this dtype (None: float32)
    embedding_dtype: torch.dtype = torch.float32  # how a BEIR corpus's embeddings are kept
    query_prompt: str = ""  # prefixed to every query (a model's recorded "query" prompt)
    passage_prompt: str = ""  # prefixed to every chunk (its "document" prompt)
    split_at_token: int = 512  # items with gold_start_token are also scored apart, before and from here
    page_split: bool = False  # also score the two halves of :func:`split_pages` apart
    passage_window: int | None = None  # also score each passage as the best of its windows of this many tokens
    late_chunking: bool = False  # with passage_window: also as the best of its windows pooled from one whole pass
    fuse_bm25: tuple[float, ...] = ()  # BM25 weights: also score each hybrid of the model and BM25 (score_fusion)

    def encode(self, model, ids, side: str, *, pad_token_id: int, device, desc: str, texts: list[str],
               out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """:func:`.inference.encode` with this configuration's batching and precision."""
        return encode(model, ids, side, batch_size=self.batch_size, pad_token_id=pad_token_id, device=device,
                      max_tokens=self.max_tokens, autocast=self.autocast, out_dtype=out_dtype, desc=desc, texts=texts)


def _summary(values: dict, rows=slice(None)) -> dict:
    """Mean (percent) and per-item values (percent) of each metric, over ``rows`` of the items."""
    return {**{m: 100 * float(v[rows].mean()) for m, v in values.items()},
            "per_item": {m: (100 * v[rows]).tolist() for m, v in values.items()}}


def _score_items(items, chunk_scores, copy_of, offsets, *, split_at_token: int, page_split: bool = False,
                 gold_scores=None) -> dict:
    """Metrics (percent) and per-item values from each item's candidate scores.

    ``chunk_scores(index, item)``: the item's (C,) scores against its document's chunks;
    ``copy_of``: per chunk (global index) the id of its distinct text; ``gold_scores``: (Q,) scores
    replacing the gold's own (QReCC's answer rule). Parts: answers before / from ``split_at_token``
    (items with ``gold_start_token``) and, with ``page_split``, ``split=selection`` and
    ``split=report`` (:func:`split_pages`), each with its own answer-position parts.
    """
    ranks, degenerate = [], 0
    for index, item in enumerate(items):
        scores = chunk_scores(index, item)  # (C,)
        start = offsets[item.document]
        local = copy_of[start: start + len(scores)]  # (C,)
        copies = local == local[item.gold_index]  # (C,) the gold's own text, wherever it repeats
        gold = None if gold_scores is None else gold_scores[index]
        ranks.append(gold_rank(scores, item.gold_index, gold, copies))
        degenerate += len(scores) > 1 and float(scores.max() - scores.min()) < DEGENERATE_SPREAD
    values = per_item_metrics(ranks)
    if degenerate > len(items) / 10:
        logger.warning("MODEL COLLAPSE: for %d of %d queries every candidate scores within %g of the others; the "
                       "model cannot tell texts apart and its metrics mean nothing beyond chance",
                       degenerate, len(items), DEGENERATE_SPREAD)

    def scored(rows: list[int]) -> dict:
        result = {"num_items": len(rows), **_summary(values, rows)}
        cut = split_at_token  # long documents: is the answer found where a 512-token reader never looks?
        for name, keep in ((f"gold_start<{cut}", lambda t: t < cut), (f"gold_start>={cut}", lambda t: t >= cut)):
            part = [i for i in rows if items[i].gold_start_token is not None and keep(items[i].gold_start_token)]
            if part:
                result[name] = {"num_items": len(part), **_summary(values, part)}
        return result

    results = {**scored(list(range(len(items)))), "degenerate_queries": degenerate}
    if page_split:
        half = split_pages(items)
        for name in ("selection", "report"):
            results[f"split={name}"] = scored([i for i, item in enumerate(items) if half[item.page] == name])
    return results


def _chunks_ranked(items: list[Item], documents: dict[str, list[str]]) -> tuple[dict[str, int], list[str]]:
    """The chunks of every document some item ranks, concatenated in name order, and each
    document's offset into that list."""
    offsets, chunks = {}, []
    for name in sorted({item.document for item in items}):
        offsets[name] = len(chunks)
        chunks.extend(documents[name])
    return offsets, chunks


def evaluate_dataset(model, tokenizer, data_folder: str, dataset: str, config: EvalConfig, device) -> dict:
    """Metrics of one dataset: each chunk is encoded once, queries once, then ranked per document.

    Per-item values (percent) come under ``"per_item"`` for paired comparisons; with
    ``config.passage_window`` W the windowed scores come under ``"maxp@W"`` (and with ``config.late_chunking``
the late-chunked ones under ``"late@W"``), with a BM25 weight W in
    ``config.fuse_bm25`` the hybrid's (each item's chunks ranked by :func:`.search.score_fusion` of the
    model's cosines and :func:`bm25_scores`) under ``"+bm25@W"``; QReCC's answer rule is applied to neither.
    """
    items, documents = load_chatrag(data_folder, dataset, config.num_turns)
    offsets, chunks = _chunks_ranked(items, documents)
    chunk_ids = tokenize(tokenizer, chunks, config.passage_max_len, "right", config.passage_prompt)
    query_ids = tokenize(tokenizer, [item.query for item in items], config.query_max_len, "left", config.query_prompt)
    encoding = {"pad_token_id": tokenizer.pad_token_id, "device": device}
    late = None
    if config.passage_window and config.late_chunking:
        # one pass over the chunks gives both their whole embeddings and their late-chunked windows
        spans = window_spans(tokenizer, chunk_ids, config.passage_window, config.passage_prompt)
        *late, chunk_embeddings = late_chunk_embeddings(
            model, chunk_ids, spans, batch_size=config.batch_size, max_tokens=config.max_tokens,
            autocast=config.autocast, desc=f"{dataset} chunks", texts=chunks, **encoding)
    else:
        chunk_embeddings = config.encode(model, chunk_ids, "passage", desc=f"{dataset} chunks", texts=chunks, **encoding)
    query_embeddings = config.encode(model, query_ids, "query", desc=f"{dataset} queries",
                                     texts=[item.query for item in items], **encoding)
    gold_scores = None
    if dataset == "qrecc" and config.qrecc_answer_rule:
        # ChatRAG's QReCC gold labels come from word overlap with the answer; its evaluation appends
        # the first answer to the gold chunk before encoding, and so does this one.
        gold_texts = [
            documents[item.document][item.gold_index] + (" || " + item.answers[0] if item.answers else "")
            for item in items
        ]
        gold_ids = tokenize(tokenizer, gold_texts, config.passage_max_len, "right", config.passage_prompt)
        gold_embeddings = config.encode(model, gold_ids, "passage", desc="qrecc gold+answer", texts=gold_texts, **encoding)
        gold_scores = (gold_embeddings * query_embeddings).sum(dim=1)  # (Q,)

    def whole(index, item):
        start = offsets[item.document]
        return chunk_embeddings[start: start + len(documents[item.document])] @ query_embeddings[index]  # (C,)

    # a chunk's identity is its whole token sequence: texts that only read alike when cut are not copies
    full_ids = tokenize(tokenizer, chunks, 10**9, "right", config.passage_prompt)
    copy_of = torch.tensor(unique_sequences(full_ids)[1])  # (T,)
    splits = {"split_at_token": config.split_at_token, "page_split": config.page_split}
    results = _score_items(items, whole, copy_of, offsets, gold_scores=gold_scores, **splits)
    if config.passage_window:
        window = config.passage_window

        def best_window(embeddings, owner):
            owner = torch.tensor(owner)  # (R,) the chunk of each window
            first_row = torch.searchsorted(owner, torch.arange(len(chunks) + 1))  # (T + 1,) each chunk's first window

            def scores(index, item):
                start, count = offsets[item.document], len(documents[item.document])
                rows = slice(int(first_row[start]), int(first_row[start + count]))
                window_scores = (embeddings[rows] @ query_embeddings[index])[None]  # (1, r)
                return max_per_passage(window_scores, owner[rows] - start, count)[0]  # (C,)
            return scores

        pieces, owner = split_windows(tokenizer, full_ids, window, config.passage_prompt)
        window_embeddings = config.encode(model, pieces, "passage", desc=f"{dataset} windows",
                                          texts=[chunks[i] for i in owner], **encoding)
        results[f"maxp@{window}"] = {"windows": len(pieces), **_score_items(
            items, best_window(window_embeddings, owner), copy_of, offsets, **splits)}
        if late is not None:
            results[f"late@{window}"] = {"windows": len(late[1]), **_score_items(
                items, best_window(*late), copy_of, offsets, **splits)}
    keyword = bm25_scores(items, documents) if config.fuse_bm25 else {}
    for weight in config.fuse_bm25:
        results[f"+bm25@{weight:g}"] = _score_items(
            items, lambda index, item: score_fusion(whole(index, item)[None], keyword[index][None], weight=weight)[0],
            copy_of, offsets, **splits)  # (C,) fused scores per item
    return results


def bm25_scores(items: list[Item], documents: dict[str, list[str]]) -> dict[int, torch.Tensor]:
    """Each item's (C,) :class:`.bm25.BM25` scores (k1 0.9, b 0.4) against its document's chunks,
    the statistics taken from that document's chunks alone."""
    scores = {}
    for name in sorted({item.document for item in items}):
        mine = [index for index, item in enumerate(items) if item.document == name]
        bm25 = BM25(documents[name])
        rows = bm25.scores(bm25.query_matrix([items[i].query for i in mine]), np.arange(len(documents[name])))  # (q, C)
        scores.update(zip(mine, rows))
    return scores


def evaluate_bm25(data_folder: str, dataset: str, config: EvalConfig) -> dict:
    """The keyword baseline, ranked and split like a model: :func:`bm25_scores` over the same
    queries (QReCC's answer rule is not applied: it is a property of the dense evaluation's gold text)."""
    items, documents = load_chatrag(data_folder, dataset, config.num_turns)
    offsets, chunks = _chunks_ranked(items, documents)
    scores = bm25_scores(items, documents)
    distinct: dict[str, int] = {}
    copy_of = torch.tensor([distinct.setdefault(chunk, len(distinct)) for chunk in chunks])  # (T,) equal texts are copies
    return _score_items(items, lambda index, item: scores[index], copy_of, offsets,
                        split_at_token=config.split_at_token, page_split=config.page_split)


def average(results: dict[str, dict]) -> dict[str, float]:
    """The unweighted mean over datasets of each metric (the ChatRAG table's Average column)."""
    return {metric: sum(r[metric] for r in results.values()) / len(results) for metric in METRICS}


def parts(results: dict, prefix: str = ""):
    """(name, metrics) of every scored part of one dataset's results: the whole set first
    (name ""), then each sub-part (``gold_start>=512``, ``maxp@512``, ``maxp@512 gold_start>=512``)."""
    yield prefix.strip(), results
    for key, value in results.items():
        if isinstance(value, dict) and "num_items" in value:
            yield from parts(value, f"{prefix} {key}")


def without_per_item(value):
    """Results without their per-item lists (the JSON stays small; run files keep BEIR rankings)."""
    if isinstance(value, dict):
        return {k: without_per_item(v) for k, v in value.items() if k != "per_item"}
    return value


def format_table(rows: dict[str, dict[str, dict]]) -> str:
    """A Markdown table: one row per model; Average then each dataset; metrics in percent. A
    dataset's sub-parts add a row each (``model [doc2dial gold_start>=512, 135 items]``)."""
    split = {}
    for model, results in rows.items():
        for dataset in DATASETS:
            for part, metrics in parts(results.get(dataset) or {}):
                if part:
                    split[f"{model} [{dataset} {part}, {metrics['num_items']} items]"] = {dataset: metrics}
    rows = {**rows, **split}
    datasets = [d for d in ("average", *DATASETS) if any(d in r for r in rows.values())]
    titles = {"average": "Average", "doc2dial": "Doc2Dial", "quac": "QuAC", "qrecc": "QReCC"}
    short = ["R@1", "R@5", "R@20", "MRR@20", "NDCG@20"]
    header = "| model | " + " | ".join(f"{titles[d]} {s}" for d in datasets for s in short) + " |"
    lines = [header, "|" + "---|" * (1 + len(datasets) * len(short))]
    for model, results in rows.items():
        cells = [f"{results[d][m]:.2f}" if d in results else "-" for d in datasets for m in METRICS]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
