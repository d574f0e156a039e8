"""Retrievers: what ranks a retrieval set's passages for its queries. Each has
``rank(data) -> {reading: Run}``; a reading is one way of scoring a passage:

- :class:`DenseRetriever` (a trained or any encoder): ``whole`` (the passage read up to
  ``passage_max_len`` tokens), ``maxp@W`` (the best of the passage's consecutive W-token windows,
  each embedded on its own, covering the whole passage: MaxP, the chunking baseline of long
  documents), ``mean@W`` (the mean of the same windows' vectors: LongEmbed's chunking baseline,
  one vector a passage) and ``late@W`` (the best of the same windows, each the mean of its token states from
  one pass over its ``passage_max_len``-token segment of the passage: late chunking);
- :class:`BM25Retriever`: Okapi BM25 (:mod:`.bm25`'s variants), statistics per group (a ChatRAG document's
  chunks, or the whole corpus);
- :class:`Hybrid`: each reading of a dense retriever fused with BM25 (:func:`fuse`: z-scored scores, convex weights;
  on a corpus, over the union of both rankers' best documents).

A retriever ranks a set once: ``rank`` keeps its runs per set, so hybrids reuse them.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import UserError
from .batching import unique_sequences
from .bm25 import BM25, DEFAULT_VARIANT
from .inference import encode, late_chunk_embeddings
from .results import Run
from .retrieval_sets import TIE_SEED
from .search import faiss_top_k, max_per_passage, score_fusion, top_k
from .tokenization import split_windows, tokenize, window_spans

logger = logging.getLogger(__name__)

# BM25's weight in the hybrid (search.score_fusion) when --fuse_bm25 names none: the best of 0.2-0.5 on
# the selection half of the Doc2Dial dev set (docs/recipe-study.md)
DEFAULT_BM25_WEIGHT = 0.3


@dataclass(kw_only=True)
class EncodeSettings:
    """How a dense retriever reads: lengths in tokens, prompts, batching and precision."""

    query_max_len: int = 256
    passage_max_len: int = 1024
    batch_size: int = 64  # texts per forward pass
    max_tokens: int | None = None  # padded tokens per forward pass (None: inference.DEFAULT_MAX_TOKENS)
    autocast: torch.dtype | None = None  # encode under autocast in this dtype (None: float32)
    embedding_dtype: torch.dtype = torch.float32  # how a corpus's embeddings are kept
    query_prompt: str = ""  # prefixed to every query (a model's recorded "query" prompt)
    passage_prompt: str = ""  # prefixed to every passage (its "document" prompt)
    device: torch.device = torch.device("cpu")


class Retriever:
    """``rank(data) -> {reading: Run}``, computed once a set (by :meth:`_rank`) and kept."""

    def __init__(self):
        self._runs: dict[int, tuple[object, dict[str, Run]]] = {}

    def rank(self, data) -> dict[str, Run]:
        if id(data) not in self._runs:
            self._runs[id(data)] = (data, self._rank(data))  # the set is held so that its id stays its own
        return self._runs[id(data)][1]

    def _rank(self, data) -> dict[str, Run]:
        raise NotImplementedError


class DenseRetriever(Retriever):
    """A :class:`.modeling.DualEncoder` and its tokenizer as a retriever (cosine of unit vectors).

    ``window``: also the ``maxp@W`` reading; ``late_chunking``: also ``late@W`` (the whole passages
    then come from the same pass). ``cache``: a file for a corpus's ``whole`` embeddings, read when
    model, corpus and settings match (refused, naming what differs, when they do not), else written.
    ``use_faiss``: search a corpus with FAISS's exact flat index. ``truncate_dim``: read the first
    D coordinates of every vector, re-normalised (:meth:`truncated`).
    """

    def __init__(self, model, tokenizer, settings: EncodeSettings, *, window: int | None = None,
                 late_chunking: bool = False, cache: str | None = None, use_faiss: bool = False,
                 truncate_dim: int | None = None):
        super().__init__()
        self.model, self.tokenizer, self.settings = model, tokenizer, settings
        self.window, self.late_chunking, self.cache, self.use_faiss = window, late_chunking, cache, use_faiss
        self.truncate_dim = truncate_dim
        self._encoded: dict | None = None  # once truncated() is called: the whole-width embeddings, shared

    def truncated(self, dim: int) -> "DenseRetriever":
        """The same retriever reading the first ``dim`` coordinates of every vector, re-normalised
        (a Matryoshka model's prefix); it reuses this one's encodings: nothing is encoded twice."""
        other = DenseRetriever(self.model, self.tokenizer, self.settings, window=self.window,
                               late_chunking=self.late_chunking, cache=self.cache, use_faiss=self.use_faiss,
                               truncate_dim=dim)
        self._encoded = other._encoded = self._encoded if self._encoded is not None else {}
        return other

    def _cut(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(N, D) -> (N, truncate_dim) unit vectors, in the input's dtype; unchanged without truncate_dim."""
        if self.truncate_dim is None:
            return embeddings
        return F.normalize(embeddings[:, : self.truncate_dim].float(), dim=-1).to(embeddings.dtype)

    def _memoized(self, key: tuple, compute):
        if self._encoded is None:
            return compute()
        if key not in self._encoded:
            self._encoded[key] = compute()
        return self._encoded[key]

    def _encode(self, ids, side: str, *, desc: str, texts: list[str], out_dtype=torch.float32, cut: bool = True) -> torch.Tensor:
        s = self.settings
        embeddings = self._memoized(("encode", side, str(out_dtype), hash(tuple(map(tuple, ids)))), lambda: encode(
            self.model, ids, side, batch_size=s.batch_size, pad_token_id=self.tokenizer.pad_token_id, device=s.device,
            max_tokens=s.max_tokens, autocast=s.autocast, out_dtype=out_dtype, desc=desc, texts=texts))
        return self._cut(embeddings) if cut else embeddings

    def _tokenize(self, texts: list[str], max_length: int, side: str = "right", prompt: str | None = None):
        return tokenize(self.tokenizer, texts, max_length, side, self.settings.passage_prompt if prompt is None else prompt)

    def _rank(self, data) -> dict[str, Run]:
        s = self.settings
        query_ids = self._tokenize(data.queries, s.query_max_len, data.query_side, s.query_prompt)
        if data.depth is not None:
            return self._search(data, query_ids)
        full_ids = self._tokenize(data.passages, 10**9)  # every token: MaxP's windows cover the whole passage
        passage_ids = self._tokenize(data.passages, s.passage_max_len)
        late = None
        if self.window and self.late_chunking:
            # one pass over the passages gives both their whole embeddings and their late-chunked windows
            windows, owner, passages = self._late_chunks(data, full_ids)
            late, passages = (self._cut(windows), owner), self._cut(passages)
        else:
            passages = self._encode(passage_ids, "passage", desc=f"{data.name} passages", texts=data.passages)
        queries = self._encode(query_ids, "query", desc=f"{data.name} queries", texts=data.queries)
        # a passage's identity is its whole token sequence: texts that only read alike when cut are not copies
        copy_of = torch.tensor(unique_sequences(full_ids)[1])  # (N,)
        gold_scores = None
        if data.gold_texts is not None:
            gold_ids = self._tokenize(data.gold_texts, s.passage_max_len)
            gold = self._encode(gold_ids, "passage", desc=f"{data.name} gold", texts=data.gold_texts)
            gold_scores = (gold * queries).sum(dim=1)  # (Q,)
        runs = {"whole": group_run(data, lambda group, q: passages[group.start: group.end] @ queries[q], copy_of)}
        runs["whole"].gold_scores = gold_scores
        if self.window:
            pieces, owner = split_windows(self.tokenizer, full_ids, self.window, s.passage_prompt)
            windows = self._encode(pieces, "passage", desc=f"{data.name} windows", texts=[data.passages[i] for i in owner])
            runs[f"maxp@{self.window}"] = _best_window_run(data, windows, owner, queries, copy_of)
            mean = mean_of_windows(windows, owner, len(data.passages))  # (N, D)
            runs[f"mean@{self.window}"] = group_run(data, lambda group, q: mean[group.start: group.end] @ queries[q],
                                                     copy_of)
            if late is not None:
                runs[f"late@{self.window}"] = _best_window_run(data, *late, queries, copy_of)
        return runs

    def _late_chunks(self, data, full_ids):
        """(R, D) late-chunked windows, (R,) their passages and (N, D) the whole passages (read up to
        ``passage_max_len`` tokens), from one pass over each consecutive ``passage_max_len``-token
        segment of every passage: the windows cover the whole passage, the first segment is the
        whole reading."""
        s = self.settings
        segments, passage_of = split_windows(self.tokenizer, full_ids, s.passage_max_len, s.passage_prompt)
        spans = window_spans(self.tokenizer, segments, self.window, s.passage_prompt)
        windows, segment_of, whole = self._memoized(
            ("late", hash(tuple(map(tuple, segments))), str(spans)), lambda: late_chunk_embeddings(
                self.model, segments, spans, batch_size=s.batch_size, max_tokens=s.max_tokens, autocast=s.autocast,
                desc=f"{data.name} passages", texts=[data.passages[i] for i in passage_of],
                pad_token_id=self.tokenizer.pad_token_id, device=s.device))
        first = torch.searchsorted(torch.tensor(passage_of), torch.arange(len(full_ids)))  # (N,) each one's first segment
        return windows, [passage_of[i] for i in segment_of], whole[first]

    def _search(self, data, query_ids) -> dict[str, Run]:
        """Every query against the whole corpus: the best ``data.depth`` passages of each reading."""
        s = self.settings
        if self.use_faiss and self.window:
            raise UserError("--faiss does not combine with --passage_window (MaxP needs the grouped search)")
        passage_ids = self._tokenize(data.passages, s.passage_max_len)
        started = time.perf_counter()
        full_ids = self._tokenize(data.passages, 10**9) if self.window else None  # every token: windows cover it all
        if self.window and self.late_chunking:  # one pass gives the whole documents and their late chunks
            windows, owner, corpus = self._late_chunks(data, full_ids)
            late = (self._cut(windows).to(s.embedding_dtype), torch.tensor(owner))
            corpus = self._cut(corpus).to(s.embedding_dtype)
        else:
            corpus = self._corpus_embeddings(data, passage_ids)
        logger.info("encoded %d corpus texts in %.1f s", len(passage_ids), time.perf_counter() - started)
        queries = self._encode(query_ids, "query", desc="queries", texts=data.queries)
        runs = {"whole": self._top(queries, corpus, data.depth)}
        if self.window and self.late_chunking:
            runs[f"late@{self.window}"] = self._top(queries, late[0], data.depth, late[1])
            runs[f"late@{self.window}"].info["windows"] = len(late[1])
        if self.window:
            pieces, owner = split_windows(self.tokenizer, full_ids, self.window, s.passage_prompt)
            windows = self._encode(pieces, "passage", desc="corpus windows", texts=[data.passages[i] for i in owner],
                                   out_dtype=s.embedding_dtype)
            runs[f"maxp@{self.window}"] = self._top(queries, windows, data.depth, torch.tensor(owner))
            runs[f"maxp@{self.window}"].info["windows"] = len(pieces)
            mean = mean_of_windows(windows.float(), owner, len(data.passages)).to(s.embedding_dtype)  # (N, D)
            runs[f"mean@{self.window}"] = self._top(queries, mean, data.depth)
        return runs

    def _top(self, queries, corpus, depth: int, owner=None) -> Run:
        started = time.perf_counter()
        if self.use_faiss:
            scores, found = faiss_top_k(queries, corpus, depth)
        else:
            scores, found = top_k(queries, corpus, depth, owner=owner, device=self.settings.device)  # (Q, k)
        return Run(list(found), list(scores), info={"search_seconds": round(time.perf_counter() - started, 2)})

    def _corpus_embeddings(self, data, passage_ids) -> torch.Tensor:
        """(N, D) the corpus's whole embeddings in ``embedding_dtype``, through the cache if there is one."""
        s = self.settings
        if not self.cache:
            return self._cut(self._encode(passage_ids, "passage", desc="corpus", texts=data.passages,
                                          out_dtype=s.embedding_dtype, cut=False))
        fingerprint = {
            "model": model_fingerprint(self.model.paths["passage"]), "pooling": self.model.pooling,
            "corpus_sha256": _sha256(data.corpus_file), "passage_max_len": s.passage_max_len,
            "passage_prompt": s.passage_prompt, "window": None, "autocast": str(s.autocast),
            "dtype": str(s.embedding_dtype), "tie_seed": TIE_SEED, "weights": str(next(self.model.parameters()).dtype),
        }
        cache = self.cache
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
            return self._cut(saved["embeddings"])
        embeddings = self._encode(passage_ids, "passage", desc="corpus", texts=data.passages, out_dtype=s.embedding_dtype,
                                  cut=False)
        os.makedirs(os.path.dirname(os.path.abspath(cache)), exist_ok=True)
        torch.save({"fingerprint": fingerprint, "embeddings": embeddings}, cache + ".tmp")
        os.replace(cache + ".tmp", cache)
        logger.info("corpus embeddings written to %s", cache)
        return self._cut(embeddings)


def group_run(data, scores_of, copy_of=None) -> Run:
    """A run of every candidate of each query's group: ``scores_of(group, query)`` -> (C,)."""
    scores = [None] * len(data.queries)
    candidates = [None] * len(data.queries)
    for group in data.groups:
        for query in group.queries:
            scores[query] = scores_of(group, query)  # (C,)
            candidates[query] = torch.arange(group.start, group.end)
    return Run(candidates, scores, copy_of)


def mean_of_windows(windows: torch.Tensor, owner: list[int], passages: int) -> torch.Tensor:
    """(N, D) each passage's unit vector of the mean of its (R, D) window vectors (``owner``: (R,)
    their passages): LongEmbed's chunking baseline, one vector a document."""
    sums = torch.zeros(passages, windows.size(1), dtype=windows.dtype)  # (N, D)
    sums.index_add_(0, torch.tensor(owner), windows)
    return F.normalize(sums, dim=-1)


def _best_window_run(data, windows: torch.Tensor, owner: list[int], queries: torch.Tensor, copy_of) -> Run:
    """Each passage scored as its best window (MaxP): ``windows`` (R, D), ``owner`` (R,) their passages."""
    owner = torch.tensor(owner)  # (R,) non-decreasing
    first_row = torch.searchsorted(owner, torch.arange(len(data.passages) + 1))  # (N + 1,) each passage's first window

    def scores(group, query):
        rows = slice(int(first_row[group.start]), int(first_row[group.end]))
        window_scores = (windows[rows] @ queries[query])[None]  # (1, r)
        return max_per_passage(window_scores, owner[rows] - group.start, group.end - group.start)[0]  # (C,)
    run = group_run(data, scores, copy_of)
    run.info["windows"] = len(owner)
    return run


class BM25Retriever(Retriever):
    """The keyword baseline (:class:`.bm25.BM25`, one of its ``VARIANTS``). On a ChatRAG set each
    document's chunks are scored with that document's statistics (equal texts are copies); on a
    corpus, the best ``depth`` documents sharing a word with the query, ties in the corpus's seeded order."""

    def __init__(self, variant: str = DEFAULT_VARIANT):
        super().__init__()
        self.variant = variant

    def _rank(self, data) -> dict[str, Run]:
        started = time.perf_counter()
        if data.depth is not None:
            found = BM25(data.passages, self.variant).top_k(data.queries, data.depth)
            run = Run([torch.as_tensor(f) for f, _ in found], [torch.as_tensor(s) for _, s in found])
            run.info["search_seconds"] = round(time.perf_counter() - started, 2)  # indexing and search
            return {"whole": run}
        scores = {}
        for group in data.groups:
            index = BM25(data.passages[group.start: group.end], self.variant)
            rows = index.scores(index.query_matrix([data.queries[q] for q in group.queries]),
                                np.arange(group.end - group.start))  # (q, C)
            scores.update(zip(group.queries, rows))
        distinct: dict[str, int] = {}
        copy_of = torch.tensor([distinct.setdefault(p, len(distinct)) for p in data.passages])  # (N,)
        return {"whole": group_run(data, lambda group, q: scores[q], copy_of)}


class Hybrid(Retriever):
    """Each reading of a dense retriever (whole, MaxP, late chunks, token vectors...) fused with
    BM25's at ``weight`` (:func:`fuse`)."""

    def __init__(self, dense: Retriever, keyword: BM25Retriever, weight: float):
        super().__init__()
        self.dense, self.keyword, self.weight = dense, keyword, weight

    def _rank(self, data) -> dict[str, Run]:
        keyword = self.keyword.rank(data)["whole"]
        return {reading: fuse(run, keyword, weight=self.weight, depth=data.depth)
                for reading, run in self.dense.rank(data).items()}


def fuse(dense: Run, keyword: Run, *, weight: float, depth: int | None = None) -> Run:
    """The hybrid of a dense run and a BM25 run: per query ``(1 - weight) * z(dense) + weight * z(BM25)``
    (:func:`.search.score_fusion`) over its candidates; copies as the dense retriever reads them.

    A ChatRAG set's runs score the same candidates (every chunk of the query's document). A corpus's
    runs are each ranker's best ``k``: the hybrid scores their union, a document one ranker did not
    return taking that ranker's lowest returned score (Pyserini's hybrid rule: a bound it did not
    reach; BM25 returns only documents sharing a word, so its missing ones score 0 when it returned
    fewer than k), and keeps the best ``depth``."""
    if depth is None:
        if any(len(a) != len(b) or not torch.equal(a, b) for a, b in zip(dense.candidates, keyword.candidates)):
            raise UserError("fusion needs both retrievers' scores of the same candidates (a ChatRAG set)")
        scores = [score_fusion(d[None], k[None], weight=weight)[0] for d, k in zip(dense.scores, keyword.scores)]  # (C,)
        return Run(dense.candidates, scores, dense.copy_of)
    candidates, scores = [], []
    for found, values, other, other_values in zip(dense.candidates, dense.scores, keyword.candidates, keyword.scores):
        union = torch.cat([found, other[~torch.isin(other, found)]])  # (U,) dense's first: ties keep its order
        fused = score_fusion(_scores_over(union, found, values, floor=None)[None],
                             _scores_over(union, other, other_values, floor=0.0 if len(other) < depth else None)[None],
                             weight=weight)[0]  # (U,)
        order = torch.sort(fused, descending=True, stable=True).indices[:depth]
        candidates.append(union[order])
        scores.append(fused[order])
    return Run(candidates, scores, info={"fused_candidates": "union of both rankers' top k"})


def _scores_over(union: torch.Tensor, found: torch.Tensor, values: torch.Tensor, *, floor: float | None) -> torch.Tensor:
    """(U,) a ranker's scores of ``union``: its own where it returned the document, else ``floor``
    (None: its lowest returned score)."""
    lowest = float(values.min()) if len(values) else 0.0
    out = torch.full((len(union),), lowest if floor is None else floor, dtype=torch.float64)  # (U,)
    position = {int(d): i for i, d in enumerate(union.tolist())}
    out[[position[int(d)] for d in found.tolist()]] = values.double()
    return out


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
