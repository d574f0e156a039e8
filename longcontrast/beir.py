"""Retrieval evaluation on a corpus in the BEIR layout: every query ranks the whole corpus.

A BEIR folder holds ``corpus.jsonl`` (``_id``, ``title``, ``text``), ``queries.jsonl`` (``_id``,
``text``) and ``qrels/<split>.tsv`` (``query-id corpus-id score``, a header line; graded
relevance, several relevant documents per query, score 0 = judged non-relevant). A passage is its
title and text joined by a space, as BEIR's and sentence-transformers' evaluators do (the text alone
when the title is empty). A query's own id among its results is dropped (BEIR's
``ignore_identical_ids``, for sets such as ArguAna and Quora whose queries are also documents).
Queries with no relevant document in the split are left out (nothing to find), and counted.

Metrics are BEIR's and MTEB's, by ``pytrec_eval``: nDCG@10, Recall@1/5/10/20/100, MRR@10,
MAP@100, in percent. Ties: the corpus is searched in a seeded random order, so equal scores fall
in an order that knows nothing of relevance (:mod:`.metrics`).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import UserError
from .bm25 import BM25
from .readers import BeirSet, load_beir  # noqa: F401
from .tokenization import split_windows, tokenize
from .metrics import BEIR_METRICS, DEGENERATE_SPREAD, beir_metrics
from .search import faiss_top_k, top_k

logger = logging.getLogger(__name__)

DEPTH = 100  # documents ranked per query: the deepest cutoff reported
TIE_SEED = 0  # the random corpus order that breaks ties


@dataclass
class BeirSet:
    doc_ids: list[str]
    passages: list[str]  # title + " " + text
    query_ids: list[str]
    queries: list[str]
    qrels: dict[str, dict[str, int]]  # {query id: {doc id: grade}}, queries with a relevant document only
    corpus_file: str


def _jsonl(path: Path, fields: tuple[str, ...]):
    """(line number, record) of a JSON-lines file whose records need ``fields``; problems raise
    :class:`UserError` naming ``file:line``."""
    if not path.is_file():
        raise UserError(f"{path}: not found")
    try:
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise UserError(f"{path}:{number}: malformed JSON line ({err.msg})") from err
                if not isinstance(record, dict) or any(f not in record for f in fields):
                    raise UserError(f"{path}:{number}: a record needs {', '.join(repr(f) for f in fields)}")
                yield number, record
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 ({err})") from err


def load_beir(folder: str, split: str = "test") -> BeirSet:
    """Read a BEIR folder; every problem raises :class:`UserError` naming the file."""
    root = Path(folder)
    if not root.is_dir():
        raise UserError(f"BEIR folder not found: {folder}")
    doc_ids, passages, seen = [], [], set()
    for number, record in _jsonl(root / "corpus.jsonl", ("_id", "text")):
        doc_id = str(record["_id"])
        if doc_id in seen:
            raise UserError(f"{root / 'corpus.jsonl'}:{number}: document id {doc_id!r} repeats")
        seen.add(doc_id)
        doc_ids.append(doc_id)
        passages.append(join_title(record.get("title"), record["text"]))
    if not doc_ids:
        raise UserError(f"{root / 'corpus.jsonl'}: the corpus is empty")
    query_text = {str(r["_id"]): str(r["text"]) for _, r in _jsonl(root / "queries.jsonl", ("_id", "text"))}
    qrels_file = root / "qrels" / f"{split}.tsv"
    if not qrels_file.is_file():
        present = sorted(p.stem for p in (root / "qrels").glob("*.tsv")) if (root / "qrels").is_dir() else []
        raise UserError(f"{qrels_file}: not found (splits here: {', '.join(present) or 'none'}); choose one with --split")
    qrels: dict[str, dict[str, int]] = {}
    with open(qrels_file, encoding="utf-8", newline="") as handle:
        for number, row in enumerate(csv.reader(handle, delimiter="\t"), 1):
            if not row or (number == 1 and not row[-1].lstrip("-").isdigit()):
                continue  # the header line (query-id corpus-id score)
            if len(row) != 3:
                raise UserError(f"{qrels_file}:{number}: expected 'query-id<TAB>corpus-id<TAB>score', got {row!r}")
            query, doc, score = row
            try:
                grade = int(score)
            except ValueError as err:
                raise UserError(f"{qrels_file}:{number}: score {score!r} is not an integer") from err
            if query not in query_text:
                raise UserError(f"{qrels_file}:{number}: query {query!r} is not in queries.jsonl")
            if doc not in seen:
                raise UserError(f"{qrels_file}:{number}: document {doc!r} is not in corpus.jsonl")
            judged = qrels.setdefault(query, {})
            if judged.get(doc, grade) != grade:
                raise UserError(f"{qrels_file}:{number}: query {query!r} and document {doc!r} are judged twice, "
                                f"{judged[doc]} and {grade}")
            judged[doc] = grade
    judged_queries = len(qrels)
    qrels = {q: docs for q, docs in qrels.items() if any(g > 0 for g in docs.values())}
    if judged_queries > len(qrels):
        logger.warning("%s: %d of %d judged queries have no relevant document and are left out", qrels_file,
                       judged_queries - len(qrels), judged_queries)
    if not qrels:
        raise UserError(f"{qrels_file}: no query has a relevant document (score > 0)")
    query_ids = list(qrels)
    return BeirSet(doc_ids, passages, query_ids, [query_text[q] for q in query_ids], qrels, str(root / "corpus.jsonl"))


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def model_fingerprint(folder: str) -> dict:
    """What identifies a model folder's weights without reading them: each weight file's name,
    size and modification time."""
    files = sorted(p for p in Path(folder).rglob("*") if p.suffix in (".safetensors", ".bin", ".pt", ".json")
                   and p.is_file())
    return {"folder": str(Path(folder).resolve()),
            "files": [[str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns] for p in files]}


def corpus_embeddings(model, tokenizer, data: BeirSet, config, device, cache: str | None):
    """The corpus encoded once, in a seeded random order of its passages (the tie order).

    Returns ``(embeddings, position, order)``: (R, D) passage (or window) embeddings in
    ``config.embedding_dtype``, the (R,) shuffled passage of each row (non-decreasing) and the (N,)
    corpus index of each shuffled passage. With ``cache``: read from there when model, corpus and
    settings match (refused, naming what differs, when they do not), else written there.
    """
    fingerprint = {
        "model": model_fingerprint(model.paths["passage"]), "pooling": model.pooling,
        "corpus_sha256": _sha256(data.corpus_file), "passage_max_len": config.passage_max_len,
        "passage_prompt": config.passage_prompt, "window": config.passage_window, "autocast": str(config.autocast),
        "dtype": str(config.embedding_dtype), "tie_seed": TIE_SEED,
        "weights": str(next(model.parameters()).dtype),
    }
    if cache and os.path.isfile(cache):
        try:
            saved = torch.load(cache, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any unreadable file is the user's to replace
            raise UserError(f"--corpus_embeddings {cache}: cannot read ({err})") from err
        if not isinstance(saved, dict) or "fingerprint" not in saved:
            raise UserError(f"--corpus_embeddings {cache}: not a corpus embedding file of this tool")
        differ = [key for key in fingerprint if saved["fingerprint"].get(key) != fingerprint[key]]
        if differ:
            raise UserError(f"--corpus_embeddings {cache} was computed with another {', '.join(differ)}; "
                            "delete it or give another path")
        logger.info("corpus embeddings read from %s", cache)
        return saved["embeddings"], saved["position"], saved["order"]
    order = tie_order(len(data.passages))  # (N,)
    texts = [data.passages[i] for i in order.tolist()]
    window = config.passage_window
    ids = tokenize(tokenizer, texts, 10**9 if window else config.passage_max_len, "right", config.passage_prompt)
    position = list(range(len(ids)))
    if window:
        ids, position = split_windows(tokenizer, ids, window, config.passage_prompt)
    started = time.perf_counter()
    embeddings = config.encode(model, ids, "passage", pad_token_id=tokenizer.pad_token_id, device=device,
                               desc="corpus", texts=[texts[p] for p in position], out_dtype=config.embedding_dtype)
    logger.info("encoded %d corpus texts in %.1f s", len(ids), time.perf_counter() - started)
    position = torch.tensor(position)
    if cache:
        os.makedirs(os.path.dirname(os.path.abspath(cache)), exist_ok=True)
        torch.save({"fingerprint": fingerprint, "embeddings": embeddings, "position": position, "order": order},
                   cache + ".tmp")
        os.replace(cache + ".tmp", cache)
        logger.info("corpus embeddings written to %s", cache)
    return embeddings, position, order


def evaluate_beir(model, tokenizer, data: BeirSet, config, device, *, run_file: str | None = None,
                  cache: str | None = None, use_faiss: bool = False) -> dict:
    """Metrics (percent) of one model on a BEIR set, with per-query values under ``"per_item"``.

    ``config``: an :class:`.evaluation.EvalConfig`; with ``passage_window`` each passage scores as
    its best window. ``run_file``: also write the ranking (top 100) in TREC run format.
    """
    embeddings, position, order = corpus_embeddings(model, tokenizer, data, config, device, cache)
    query_ids = tokenize(tokenizer, data.queries, config.query_max_len, "right", config.query_prompt)
    queries = config.encode(model, query_ids, "query", pad_token_id=tokenizer.pad_token_id, device=device,
                            desc="queries", texts=data.queries)
    started = time.perf_counter()
    windows = len(position) > len(data.doc_ids)  # some passage has several windows
    if use_faiss:
        if windows:
            raise UserError("--faiss does not combine with --passage_window (MaxP needs the grouped search)")
        scores, found = faiss_top_k(queries, embeddings, DEPTH + 1)
    else:
        scores, found = top_k(queries, embeddings, DEPTH + 1, owner=position if windows else None,
                              device=device)  # (Q, 101): one spare for the query's own id
    found = order[found]  # (Q, k) corpus indices
    search_seconds = time.perf_counter() - started
    ranked = [(found[row].tolist(), scores[row].tolist()) for row in range(len(data.query_ids))]
    results = {**_score_run(data, ranked, run_file, what="model"), "search_seconds": round(search_seconds, 2)}
    if windows:
        results["windows"] = int(len(position))
    return results


def evaluate_beir_bm25(data: BeirSet, *, run_file: str | None = None) -> dict:
    """BM25 (:class:`.bm25.BM25`, k1 0.9, b 0.4) over the whole corpus: the keyword baseline, scored
    like :func:`evaluate_beir`. A document that shares no word with a query is not retrieved;
    ties fall in the same seeded corpus order as the models'."""
    started = time.perf_counter()
    order = tie_order(len(data.passages)).numpy()  # (N,)
    keyword = BM25([data.passages[i] for i in order.tolist()])
    ranked = [(order[found].tolist(), scores.tolist()) for found, scores in keyword.top_k(data.queries, DEPTH + 1)]
    seconds = time.perf_counter() - started  # indexing and search
    return {**_score_run(data, ranked, run_file, what="BM25"), "search_seconds": round(seconds, 2)}


def tie_order(count: int) -> torch.Tensor:
    """(N,) the seeded random order of the corpus in which equal scores fall."""
    return torch.randperm(count, generator=torch.Generator().manual_seed(TIE_SEED))


def _score_run(data: BeirSet, ranked: list[tuple[list[int], list[float]]], run_file: str | None, *, what: str) -> dict:
    """Metrics of per-query ``(corpus indices, scores)``, best first (the query's own id is dropped,
    the rest cut at :data:`DEPTH`); with ``run_file`` the ranking is also written in TREC format."""
    run, degenerate, lines = {}, 0, []
    for query, (found, scores) in zip(data.query_ids, ranked):
        kept = [(data.doc_ids[i], s) for i, s in zip(found, scores) if data.doc_ids[i] != query][:DEPTH]
        run[query] = [doc for doc, _ in kept]
        degenerate += len(kept) > 1 and kept[0][1] - kept[-1][1] < DEGENERATE_SPREAD
        lines += [f"{query} Q0 {doc} {rank} {score:.6f} longcontrast\n" for rank, (doc, score) in enumerate(kept, 1)]
    if degenerate > len(data.query_ids) / 10:
        logger.warning("MODEL COLLAPSE: for %d of %d queries the top %d documents score within %g of each other; the "
                       "%s cannot tell texts apart and its metrics mean nothing beyond chance",
                       degenerate, len(data.query_ids), DEPTH, DEGENERATE_SPREAD, what)
    if run_file:
        os.makedirs(os.path.dirname(os.path.abspath(run_file)), exist_ok=True)
        with open(run_file, "w") as handle:
            handle.writelines(lines)
    per_query = beir_metrics(data.qrels, run)
    return {"num_items": len(data.query_ids), "num_documents": len(data.doc_ids),
            **{m: 100 * float(np.mean(list(per_query[m].values()))) for m in BEIR_METRICS},
            "degenerate_queries": degenerate,
            "per_item": {m: [100 * per_query[m][q] for q in data.query_ids] for m in BEIR_METRICS}}


def format_beir_table(rows: dict[str, dict]) -> str:
    """A Markdown table of BEIR results: one row per model and part (``model [maxp@512]``)."""
    short = {"ndcg@10": "nDCG@10", "mrr@10": "MRR@10", "map@100": "MAP@100",
             **{f"recall@{k}": f"R@{k}" for k in (1, 5, 10, 20, 100)}}
    lines = ["| model | queries | " + " | ".join(short[m] for m in BEIR_METRICS) + " |",
             "|---|---|" + "---|" * len(BEIR_METRICS)]
    for model, results in rows.items():
        for part, metrics in (("", results), *((k, v) for k, v in results.items() if isinstance(v, dict)
                                                and "num_items" in v)):
            label = f"{model} [{part}]" if part else model
            lines.append(f"| {label} | {metrics['num_items']} | " + " | ".join(f"{metrics[m]:.2f}" for m in BEIR_METRICS)
                         + " |")
    return "\n".join(lines)
