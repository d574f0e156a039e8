"""Retrieval sets: the data sources of evaluation, behind one interface. Each holds its queries,
its passages and the groups that say which passages a query ranks, and scores a retriever's
:class:`.results.Run` into :class:`.results.Scored`.

- :class:`ChatRAGSet` (ChatRAG-Bench's layout: Doc2Dial, QuAC, QReCC, the shared page sets): each
  item ranks the chunks of its own document; the query is the last ``num_turns`` turns written as
  ``user: ...`` / ``agent: ...`` lines, cut from the left. The gold is ranked by
  :func:`.metrics.gold_rank`: its copies are the gold, other ties are broken at random and scored in
  expectation. Recall@1/5/20, MRR@20 and NDCG@20; parts by answer position and by page half.
- :class:`CorpusSet` (the BEIR layout): every query ranks the whole corpus, kept in a seeded random
  order so that equal scores fall in an order that knows nothing of relevance. A query's own id
  among its results is dropped (BEIR's ``ignore_identical_ids``). BEIR's and MTEB's metrics by
  ``pytrec_eval``: nDCG@10, Recall@1/5/10/20/100, MRR@10, MAP@100; parts by half (queries split by
  their relevant document of smallest id).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import UserError
from .metrics import BEIR_METRICS, CHATRAG_METRICS, DEGENERATE_SPREAD, beir_metrics, gold_rank, per_item_metrics
from .readers import BeirSet, load_beir, read_json
from .records import format_query
from .results import Run, Scored

logger = logging.getLogger(__name__)

DATASETS = ("doc2dial", "quac", "qrecc")
DEPTH = 100  # documents ranked per corpus query: the deepest cutoff reported
TIE_SEED = 0  # the random corpus order that breaks ties


@dataclass
class Group:
    """Queries that rank the same passages: ``passages[start:end]`` of the set."""

    start: int
    end: int
    queries: list[int]


def _collapse_warning(degenerate: int, total: int, what: str, among: str) -> None:
    if degenerate > total / 10:
        logger.warning("MODEL COLLAPSE: for %d of %d queries %s score within %g of each other; the %s cannot tell "
                       "texts apart and its metrics mean nothing beyond chance", degenerate, total, among,
                       DEGENERATE_SPREAD, what)


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
    """Each page's half of a set split by page (:func:`split_halves` of the items' pages)."""
    return split_halves([item.page for item in items])


def split_halves(pages: list[str]) -> dict[str, str]:
    """Each page's half, for choosing on one half and reporting the other: pages in the order of a
    hash of their name, each to the half with fewer items so far, so both halves hold about as many
    items and no page is in both. ``pages``: each item's page. Returns page -> "selection" | "report"."""
    count = Counter(pages)
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


def _summary(values: dict[str, np.ndarray], rows: list[int]) -> Scored:
    return Scored(len(rows), {m: 100 * float(v[rows].mean()) for m, v in values.items()},
                  {m: (100 * v[rows]).tolist() for m, v in values.items()})


class ChatRAGSet:
    """A ChatRAG-layout set (its items and documents; :meth:`load` reads ``DATA_FOLDER/<dataset>/``):
    the chunks of every document some item ranks, concatenated in name order, one group a document.

    ``gold_texts`` (QReCC with its answer rule): each item's gold chunk followed by `` || `` and its
    first answer, which dense retrievers encode in place of the gold (ChatRAG's evaluation does).
    Parts: answers before / from ``split_at_token`` (items with ``gold_start_token``) and, with
    ``page_split``, ``split=selection`` and ``split=report`` (:func:`split_pages`), each with its own
    answer-position parts.
    """

    depth = None  # every candidate of a group is scored
    query_side = "left"  # a dialogue's latest turns are kept
    metric_names = CHATRAG_METRICS

    def __init__(self, name: str, items: list[Item], documents: dict[str, list[str]], *, qrecc_answer_rule: bool = True,
                 split_at_token: int = 512, page_split: bool = False):
        self.name, self.items, self.documents = name, items, documents
        self.queries = [item.query for item in self.items]
        asking: dict[str, list[int]] = {}  # document -> the items that rank its chunks, in item order
        for index, item in enumerate(self.items):
            asking.setdefault(item.document, []).append(index)
        self.offsets, self.passages, self.groups = {}, [], []
        for document in sorted(asking):
            self.offsets[document] = len(self.passages)
            self.passages.extend(self.documents[document])
            self.groups.append(Group(self.offsets[document], len(self.passages), asking[document]))
        self.gold_texts = None
        if name == "qrecc" and qrecc_answer_rule:
            # ChatRAG's QReCC gold labels come from word overlap with the answer; its evaluation appends
            # the first answer to the gold chunk before encoding, and so does this one.
            self.gold_texts = [self.documents[item.document][item.gold_index]
                               + (" || " + item.answers[0] if item.answers else "") for item in self.items]
        self.split_at_token, self.page_split = split_at_token, page_split

    @classmethod
    def load(cls, data_folder: str, dataset: str, *, num_turns: int = 5, **options) -> "ChatRAGSet":
        """``DATA_FOLDER/<dataset>`` read by :func:`load_chatrag`, its queries of ``num_turns`` turns."""
        return cls(dataset, *load_chatrag(data_folder, dataset, num_turns), **options)

    def score(self, run: Run, *, what: str = "model") -> Scored:
        """Each item's gold rank among its document's chunks (``run.scores[i]``: (C,) in chunk order)."""
        ranks, degenerate = [], 0
        for index, item in enumerate(self.items):
            scores = run.scores[index]  # (C,)
            start = self.offsets[item.document]
            local = run.copy_of[start: start + len(scores)]  # (C,)
            copies = local == local[item.gold_index]  # (C,) the gold's own text, wherever it repeats
            gold = None if run.gold_scores is None else run.gold_scores[index]
            ranks.append(gold_rank(scores, item.gold_index, gold, copies))
            degenerate += len(scores) > 1 and float(scores.max() - scores.min()) < DEGENERATE_SPREAD
        _collapse_warning(degenerate, len(self.items), what, "every candidate")
        values = per_item_metrics(ranks)
        result = self._scored(values, list(range(len(self.items))))
        result.info = {**run.info, "degenerate_queries": degenerate}
        if self.page_split:
            half = split_pages(self.items)
            for name in ("selection", "report"):
                result.parts[f"split={name}"] = self._scored(
                    values, [i for i, item in enumerate(self.items) if half[item.page] == name])
        return result

    def _scored(self, values: dict[str, np.ndarray], rows: list[int]) -> Scored:
        result = _summary(values, rows)
        cut = self.split_at_token  # long documents: is the answer found where a 512-token reader never looks?
        for name, keep in ((f"gold_start<{cut}", lambda t: t < cut), (f"gold_start>={cut}", lambda t: t >= cut)):
            part = [i for i in rows if self.items[i].gold_start_token is not None and keep(self.items[i].gold_start_token)]
            if part:
                result.parts[name] = _summary(values, part)
        return result


class CorpusSet:
    """A BEIR folder (:func:`.readers.load_beir`): one group, the whole corpus, in the seeded
    random order of :func:`tie_order` (``passages`` and ``doc_ids`` alike)."""

    depth = DEPTH + 1  # one spare for a query's own id
    query_side = "right"
    metric_names = BEIR_METRICS
    gold_texts = None

    def __init__(self, folder: str, split: str = "test", page_split: bool = False):
        self.data: BeirSet = load_beir(folder, split)
        self.page_split = page_split
        self.name = "beir"
        order = tie_order(len(self.data.passages)).tolist()
        self.passages = [self.data.passages[i] for i in order]
        self.doc_ids = [self.data.doc_ids[i] for i in order]
        self.queries = self.data.queries
        self.groups = [Group(0, len(self.passages), list(range(len(self.queries))))]
        self.corpus_file = self.data.corpus_file

    def ranking(self, run: Run) -> list[list[tuple[str, float]]]:
        """Each query's ``(doc id, score)`` list, best first: its own id dropped, cut at :data:`DEPTH`."""
        return [[(self.doc_ids[i], s) for i, s in zip(found.tolist(), scores.tolist()) if self.doc_ids[i] != query][:DEPTH]
                for query, found, scores in zip(self.data.query_ids, run.candidates, run.scores)]

    def score(self, run: Run, *, what: str = "model") -> Scored:
        ranked = self.ranking(run)
        degenerate = sum(len(kept) > 1 and kept[0][1] - kept[-1][1] < DEGENERATE_SPREAD for kept in ranked)
        _collapse_warning(degenerate, len(ranked), what, f"the top {DEPTH} documents")
        per_query = beir_metrics(self.data.qrels, {q: [doc for doc, _ in kept] for q, kept in zip(self.data.query_ids, ranked)})
        ids = self.data.query_ids
        values = {m: np.array([per_query[m][q] for q in ids]) for m in BEIR_METRICS}
        result = _summary(values, list(range(len(ids))))
        result.info = {"num_documents": len(self.doc_ids), "degenerate_queries": degenerate, **run.info}
        if self.page_split:  # a query's "page": its relevant document of smallest id (one document, one half)
            pages = [min(d for d, grade in self.data.qrels[q].items() if grade > 0) for q in ids]
            half = split_halves(pages)
            for name in ("selection", "report"):
                result.parts[f"split={name}"] = _summary(values, [i for i, page in enumerate(pages) if half[page] == name])
        return result

    def write_trec(self, run: Run, path: str) -> None:
        """The ranking (top :data:`DEPTH`) in TREC run format."""
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as handle:
            for query, kept in zip(self.data.query_ids, self.ranking(run)):
                handle.writelines(f"{query} Q0 {doc} {rank} {score:.6f} longcontrast\n"
                                  for rank, (doc, score) in enumerate(kept, 1))


def tie_order(count: int) -> torch.Tensor:
    """(N,) the seeded random order of a corpus in which equal scores fall."""
    return torch.randperm(count, generator=torch.Generator().manual_seed(TIE_SEED))
