"""Late-interaction retrieval: documents kept as float16 token vectors, scored by exact MaxSim.

A document longer than the model reads is read in consecutive segments of ``passage_max_len``
tokens (each segment's tokens carry that segment's context) and keeps the token vectors of all of
them: MaxSim then finds each query token's best match anywhere in the document. The index is one
(T, D) float16 matrix of every token of the corpus and the (T,) document of each; a search scores
blocks of query tokens against blocks of corpus tokens, so memory stays bounded by
:data:`BLOCK_ENTRIES` whatever the corpus.
"""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .batching import pad, unique_sequences
from .inference import batches_of_distinct, check_finite
from .results import Run
from .retrievers import DenseRetriever, group_run
from .tokenization import split_windows

logger = logging.getLogger(__name__)

# Entries of one (corpus tokens, query tokens) similarity block, and of one (documents, query
# tokens) table of best matches: 2^26 float32 entries are 256 MiB.
BLOCK_ENTRIES = 1 << 26


def encode_tokens(model, token_ids: list[list[int]], side: str, *, batch_size: int, pad_token_id: int,
                  device: torch.device, max_tokens: int | None = None, autocast: torch.dtype | None = None,
                  out_dtype: torch.dtype = torch.float16, desc: str = "encoding",
                  texts: list[str] | None = None) -> list[torch.Tensor]:
    """Each text's (L_i, D) token vectors (one per token it was read with, special tokens
    included), on the CPU in ``out_dtype``; batching and copies as :func:`.inference.encode`."""
    unique, copy_of, first_copy, groups = batches_of_distinct(token_ids, batch_size=batch_size, max_tokens=max_tokens,
                                                              desc=desc)
    vectors_of: list[torch.Tensor | None] = [None] * len(unique)
    context = torch.autocast(device.type, dtype=autocast) if autocast is not None else nullcontext()
    with torch.inference_mode(), context:
        for rows in groups:
            batch = pad([unique[i] for i in rows], pad_token_id, device)
            vectors = model(**batch, side=side).float()  # (b, L, D)
            check_finite(vectors.flatten(1), rows, first_copy, desc=desc, side=side, texts=texts)
            for row, distinct in enumerate(rows):
                vectors_of[distinct] = vectors[row, : len(unique[distinct])].to("cpu", out_dtype)  # (L_i, D)
    return [vectors_of[distinct] for distinct in copy_of]


@dataclass
class TokenIndex:
    """Every token vector of a corpus: ``vectors`` (T, D) float16 and ``owner`` (T,) the document
    of each, non-decreasing (a document's tokens are contiguous)."""

    vectors: torch.Tensor
    owner: torch.Tensor
    documents: int

    @classmethod
    def build(cls, pieces: list[torch.Tensor], piece_owner: list[int], documents: int) -> "TokenIndex":
        """From (L_i, D) token vectors of pieces (segments) and the document of each (non-decreasing)."""
        owner = torch.repeat_interleave(torch.tensor(piece_owner, dtype=torch.int32),
                                        torch.tensor([len(p) for p in pieces]))  # (T,)
        return cls(torch.cat(pieces), owner, documents)

    @property
    def bytes_per_token(self) -> int:
        return self.vectors.element_size() * self.vectors.size(1) + self.owner.element_size()

    def token_range(self, start: int, end: int) -> tuple[int, int]:
        """The rows of documents ``start .. end - 1``."""
        bounds = torch.searchsorted(self.owner, torch.tensor([start, end], dtype=self.owner.dtype))
        return int(bounds[0]), int(bounds[1])


def padded_queries(queries: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q, Lq, D) float32 zero-padded query token vectors and their (Q, Lq) mask."""
    length = max(len(q) for q in queries)
    stacked = torch.stack([F.pad(q.float(), (0, 0, 0, length - len(q))) for q in queries])  # (Q, Lq, D)
    mask = torch.arange(length)[None, :] < torch.tensor([len(q) for q in queries])[:, None]  # (Q, Lq)
    return stacked, mask


def maxsim_scores(queries: torch.Tensor, query_mask: torch.Tensor, index: TokenIndex, start: int = 0,
                  end: int | None = None) -> torch.Tensor:
    """(Q, n) MaxSim of each query against documents ``start .. end - 1`` of the index: the sum over
    the query's tokens (``query_mask``) of its best dot product with the document's tokens.

    queries: (Q, Lq, D) float32. Corpus tokens are scored in blocks against all query tokens at
    once; each block's best match per document and query token is merged by ``amax``.
    """
    end = index.documents if end is None else end
    first, last = index.token_range(start, end)
    flat = queries.reshape(-1, queries.size(-1))  # (Q * Lq, D)
    best = torch.full((end - start, flat.size(0)), -torch.inf)  # (n, Q * Lq)
    block = max(1, BLOCK_ENTRIES // flat.size(0))
    for row in range(first, last, block):
        stop = min(row + block, last)
        similarity = index.vectors[row:stop].float() @ flat.T  # (b, Q * Lq)
        rows = (index.owner[row:stop] - start).long()[:, None].expand_as(similarity)  # (b, Q * Lq) a view
        best.scatter_reduce_(0, rows, similarity, "amax")
    best = best.view(end - start, *query_mask.shape)  # (n, Q, Lq)
    return (best * query_mask[None]).sum(dim=-1).T  # (Q, n)


def search(queries: list[torch.Tensor], index: TokenIndex, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` best documents of each query, best first: ``(scores, indices)``, each (Q, k')."""
    k = min(k, index.documents)
    tokens = max(len(q) for q in queries)
    per_block = max(1, BLOCK_ENTRIES // max(1, index.documents * tokens))  # queries whose best-match table fits
    scores, found = [], []
    for start in range(0, len(queries), per_block):
        block, mask = padded_queries(queries[start: start + per_block])
        top = maxsim_scores(block, mask, index).topk(k, dim=1, sorted=True)  # (q, k)
        scores.append(top.values)
        found.append(top.indices)
    return torch.cat(scores), torch.cat(found)


class LateInteractionRetriever(DenseRetriever):
    """A late-interaction model (``--colbert_dim``; a PyLate folder) as a retriever.

    Readings: ``whole``: every token of each passage, read in consecutive ``passage_max_len``-token
    segments; ``tokens@W`` (with ``window``): the same in W-token segments, the windows that MaxP
    reads. ``info`` of each run: the index's tokens, bytes and search seconds.
    """

    def _index(self, data, full_ids, length: int) -> TokenIndex:
        s = self.settings
        pieces, owner = split_windows(self.tokenizer, full_ids, length, s.passage_prompt)
        vectors = self._memoized(("tokens", length, hash(tuple(map(tuple, pieces)))), lambda: encode_tokens(
            self.model, pieces, "passage", batch_size=s.batch_size, pad_token_id=self.tokenizer.pad_token_id,
            device=s.device, max_tokens=s.max_tokens, autocast=s.autocast, desc=f"{data.name} passages",
            texts=[data.passages[i] for i in owner]))
        return TokenIndex.build(vectors, owner, len(full_ids))

    def _queries(self, ids, data, desc="queries") -> list[torch.Tensor]:
        s = self.settings
        return encode_tokens(self.model, ids, "query", batch_size=s.batch_size, pad_token_id=self.tokenizer.pad_token_id,
                             device=s.device, max_tokens=s.max_tokens, autocast=s.autocast, out_dtype=torch.float32,
                             desc=f"{data.name} {desc}", texts=data.queries)

    def _rank(self, data) -> dict[str, Run]:
        s = self.settings
        queries = self._queries(self._tokenize(data.queries, s.query_max_len, data.query_side, s.query_prompt), data)
        full_ids = self._tokenize(data.passages, 10**9)  # every token: the segments cover the whole passage
        lengths = {"whole": s.passage_max_len}
        if self.window and self.window != s.passage_max_len:  # (at the same length it is the whole reading)
            lengths[f"tokens@{self.window}"] = self.window
        runs = {}
        for reading, length in lengths.items():
            index = self._index(data, full_ids, length)
            started = time.perf_counter()
            if data.depth is not None:
                scores, found = search(queries, index, data.depth)
                run = Run(list(found), list(scores))
            else:
                run = self._grouped(data, queries, index, copy_of=torch.tensor(unique_sequences(full_ids)[1]))
            run.info.update(tokens=len(index.owner), index_bytes=len(index.owner) * index.bytes_per_token,
                            search_seconds=round(time.perf_counter() - started, 2))
            logger.info("%s %s: %d token vectors (%.1f MB), searched in %.1f s", data.name, reading, len(index.owner),
                        run.info["index_bytes"] / 1e6, run.info["search_seconds"])
            runs[reading] = run
        if data.gold_texts is not None:  # QReCC's answer rule: the gold scored as its chunk and answer
            gold_ids = self._tokenize(data.gold_texts, s.passage_max_len)
            gold = self._index(data, gold_ids, s.passage_max_len)
            query_block, mask = padded_queries(queries)
            runs["whole"].gold_scores = torch.stack([maxsim_scores(query_block[q: q + 1], mask[q: q + 1], gold, q, q + 1)[0, 0]
                                                     for q in range(len(queries))])  # (Q,)
        return runs

    def _grouped(self, data, queries, index: TokenIndex, copy_of: torch.Tensor) -> Run:
        """Each query against its group's passages (a ChatRAG document's chunks); ``copy_of`` (N,):
        equal token sequences are copies."""
        scores = {}
        for group in data.groups:
            block, mask = padded_queries([queries[q] for q in group.queries])
            scores.update(zip(group.queries, maxsim_scores(block, mask, index, group.start, group.end)))  # (C,) each
        return group_run(data, lambda group, q: scores[q], copy_of)
