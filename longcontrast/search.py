"""Exact top-k search of queries against a corpus of embeddings, in bounded memory.

Scores are cosines (dot products of L2-normalised vectors) computed in float32 whatever the
storage dtype (float16 halves the corpus in memory; each block is upcast for its product), by
blocks of queries against blocks of the corpus: at most ``query_block x corpus_block`` scores
exist at once, never the whole (Q x C) matrix, and no Python loop runs per query. The running
top-k is merged block by block on ``device`` (the GPU for a large corpus).

Several rows may belong to one passage (its windows, :func:`.inference.split_windows`): a
passage then scores as its best row (MaxP), and blocks are cut at passage boundaries.
Evaluation (:mod:`.beir`) and hard-negative mining share this module.
"""

from __future__ import annotations

import torch

# Reciprocal-rank fusion constant (Cormack et al., 2009): fused score = sum over rankers of 1 / (K + rank).
RRF_K = 60
CORPUS_BLOCK = 65_536  # corpus rows scored at once
QUERY_BLOCK = 1_024  # queries scored at once: 256 MB of float32 scores with CORPUS_BLOCK


def rank_fusion(*scores: torch.Tensor) -> torch.Tensor:
    """(Q, C) reciprocal-rank fusion of several (Q, C) score matrices: the hybrid of BM25 and a dense
    model in mining. A candidate's rank is 1 + the number of candidates scoring
    strictly higher, so tied candidates share a rank (no order of the candidates breaks a tie)."""
    fused = torch.zeros_like(scores[0], dtype=torch.float64)  # (Q, C)
    for matrix in scores:
        ascending = matrix.double().sort(dim=1).values  # (Q, C)
        at_most = torch.searchsorted(ascending, matrix.double(), right=True)  # (Q, C) candidates scoring <= each
        fused += 1.0 / (RRF_K + 1 + matrix.size(1) - at_most)
    return fused


def score_fusion(dense: torch.Tensor, keyword: torch.Tensor, *, weight: float) -> torch.Tensor:
    """(Q, C) convex combination (1 - weight) * z(dense) + weight * z(keyword) of two (Q, C) score
    matrices, each z-scored along its row (a query's candidates): the evaluation's hybrid of a dense
    model and BM25. Unlike :func:`rank_fusion` it keeps how far apart the scores are, which lifts
    Recall@1 (Bruch et al. 2023, "An Analysis of Fusion Functions for Hybrid Retrieval"). A row whose
    scores are all equal contributes zeros."""
    def z(matrix):
        matrix = matrix.double()
        centred = matrix - matrix.mean(dim=1, keepdim=True)  # (Q, C)
        spread = matrix.std(dim=1, keepdim=True, correction=0)  # (Q, 1)
        return torch.where(spread > 0, centred / spread.clamp_min(1e-12), torch.zeros_like(centred))

    return (1.0 - weight) * z(dense) + weight * z(keyword)  # (Q, C)


def _block_bounds(owner: torch.Tensor | None, rows: int, block: int) -> list[tuple[int, int]]:
    """(start, end) row ranges of at most ``block`` rows, never splitting one passage's rows
    (a passage with more rows than ``block`` gets a range of its own)."""
    if owner is None:
        return [(start, min(start + block, rows)) for start in range(0, rows, block)]
    if rows and bool((owner[1:] < owner[:-1]).any()):
        raise ValueError("owner must be non-decreasing: a passage's rows must be contiguous")
    bounds, start = [], 0
    while start < rows:
        end = min(start + block, rows)
        if end < rows and owner[end] == owner[end - 1]:  # back off to the passage's first row
            cut = int(torch.searchsorted(owner, owner[end], right=False))
            end = cut if cut > start else int(torch.searchsorted(owner, owner[end], right=True))
        bounds.append((start, end))
        start = end
    return bounds


def max_per_passage(scores: torch.Tensor, local: torch.Tensor, passages: int) -> torch.Tensor:
    """(q, passages) best score of each passage from (q, r) row scores; ``local``: (r,) the
    passage of each row, in ``0 .. passages - 1`` (MaxP)."""
    best = torch.full((scores.shape[0], passages), -torch.inf, dtype=scores.dtype, device=scores.device)
    return best.scatter_reduce(1, local.expand(scores.shape[0], -1), scores, reduce="amax")


def top_k(queries: torch.Tensor, corpus: torch.Tensor, k: int, *, owner: torch.Tensor | None = None,
          device: torch.device | str | None = None, query_block: int = QUERY_BLOCK,
          corpus_block: int = CORPUS_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` best passages of every query, best first.

    Args:
        queries: (Q, D) query embeddings.
        corpus: (R, D) row embeddings, any float dtype, on the CPU or on ``device``.
        k: passages per query (fewer if the corpus has fewer).
        owner: (R,) passage index of each row, non-decreasing; ``None``: each row is a passage.
        device: where the products run (default: the corpus's device).

    Returns ``(scores, indices)``, each (Q, k'): float32 cosines and passage indices (rows when
    ``owner`` is None), with k' = min(k, passages). Equal scores come in no particular order:
    callers that need random tie-breaking shuffle the corpus first.
    """
    device = torch.device(device) if device is not None else corpus.device
    rows = corpus.shape[0]
    owner_device = owner.to(device) if owner is not None else None
    passages = int(owner[-1]) + 1 if owner is not None and rows else rows
    k = min(k, passages)
    queries = queries.to(device, torch.float32)  # (Q, D)
    best_scores = torch.full((queries.shape[0], 0), -torch.inf, device=device)  # (Q, kept)
    best_indices = torch.zeros((queries.shape[0], 0), dtype=torch.long, device=device)
    # corpus blocks outside: each is moved and upcast once, whatever the number of queries
    for start, end in _block_bounds(owner, rows, corpus_block):
        block = corpus[start:end].to(device, torch.float32)  # (c, D)
        if owner is None:
            block_indices = torch.arange(start, end, device=device)  # (c,)
        else:
            local = owner_device[start:end] - owner_device[start]  # (c,) 0-based passages of the block
            width = int(local[-1]) + 1
            block_indices = torch.arange(width, device=device) + owner_device[start]  # (p,)
        merged_scores, merged_indices = [], []
        for q_start in range(0, queries.shape[0], query_block):
            block_scores = queries[q_start: q_start + query_block] @ block.T  # (q, c)
            if owner is not None:  # the best row of each passage: MaxP
                block_scores = max_per_passage(block_scores, local, width)  # (q, p)
            top = block_scores.topk(min(k, block_scores.shape[1]), dim=1)
            scores = torch.cat([best_scores[q_start: q_start + query_block], top.values], dim=1)  # (q, kept + k)
            indices = torch.cat([best_indices[q_start: q_start + query_block], block_indices[top.indices]], dim=1)
            if scores.shape[1] > k:
                keep = scores.topk(k, dim=1)
                scores, indices = keep.values, indices.gather(1, keep.indices)
            merged_scores.append(scores)
            merged_indices.append(indices)
        best_scores, best_indices = torch.cat(merged_scores), torch.cat(merged_indices)
    order = best_scores.argsort(dim=1, descending=True, stable=True)  # (Q, k) best first
    return best_scores.gather(1, order).cpu(), best_indices.gather(1, order).cpu()


def faiss_top_k(queries: torch.Tensor, corpus: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same exact search through FAISS's flat inner-product index (CPU, float32), when installed."""
    try:
        import faiss
    except ImportError as err:
        raise ImportError("FAISS is not installed: pip install faiss-cpu (or faiss-gpu)") from err
    index = faiss.IndexFlatIP(corpus.shape[1])
    index.add(corpus.float().numpy())
    scores, indices = index.search(queries.float().numpy(), min(k, corpus.shape[0]))
    return torch.from_numpy(scores), torch.from_numpy(indices).long()
