"""Hard-negative mining: candidates from a corpus scored by BM25 and/or a dense model, filtered
relative to the positive's score.

For each (query, positive) pair the candidates are a pool of texts (the whole corpus, the chunks of
the pair's own document, or every positive of the data), ranked by the scorer; the positive itself
and any text identical to it are never candidates. Positive-aware filtering follows NV-Retriever
(Moreira et al., 2024): a candidate scoring above ``max_score_ratio`` x the positive's score
("TopK-PercPos", 0.95 was their best) or above the positive's score minus ``margin``
("TopK-MarginPos") is likely an unlabelled positive and is dropped. The hardest survivors,
after skipping the ``skip_top`` best-ranked, become the negatives, hardest first (or, with
``sample_from``, a seeded draw from a range of them, as FlagEmbedding's ``range_for_sampling``).
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from .bm25 import BM25
from .search import QUERY_BLOCK, rank_fusion, top_k

logger = logging.getLogger(__name__)

SCORERS = ("bm25", "dense", "hybrid")


@dataclass(kw_only=True)
class MiningConfig:
    num_negatives: int = 7
    skip_top: int = 0  # ranks skipped before taking negatives (the very top is where false negatives live)
    max_score_ratio: float | None = None  # keep a candidate only if its score <= ratio x the positive's
    margin: float | None = None  # keep a candidate only if its score <= the positive's - margin
    scorer: str = "bm25"
    # draw the negatives at random from this many survivors below skip_top (FlagEmbedding's
    # range_for_sampling), seeded per query; None: the hardest ones
    sample_from: int | None = None
    seed: int = 0

    @property
    def survivors(self) -> int:
        """How many filtered candidates below ``skip_top`` a query's negatives come from."""
        return max(self.num_negatives, self.sample_from or 0)


@dataclass
class MiningStats:
    queries: int = 0
    negatives: int = 0
    filtered: int = 0  # candidates dropped by the positive-aware filter, ranked above the last one taken
    short: int = 0  # queries left with fewer negatives than asked for

    def add(self, chosen: list[int], filtered: int, wanted: int) -> None:
        """Count one query's outcome."""
        self.queries += 1
        self.negatives += len(chosen)
        self.filtered += filtered
        self.short += len(chosen) < wanted


def query_groups(pools: list[np.ndarray]) -> list[list[int]]:
    """The queries sharing each pool array object (scored together)."""
    groups: dict[int, list[int]] = defaultdict(list)
    for query, pool in enumerate(pools):
        groups[id(pool)].append(query)
    return list(groups.values())


def select_negatives(
    order: list[int], filter_scores: torch.Tensor, positive_score: float, excluded: torch.Tensor, config: MiningConfig,
    query: int = 0,
) -> tuple[list[int], int]:
    """One query's negatives, hardest first, and how many candidates the filter dropped on the way:
    the first ``num_negatives`` survivors, or with ``sample_from`` a draw of them (a generator seeded
    by ``config.seed`` and ``query``) from the first ``sample_from`` survivors, in rank order.

    Args:
        order: candidate positions, best-ranked first (all of them, or the top of the ranking).
        filter_scores: (C,) scores in the space of ``positive_score`` (the dense cosine when a dense
            model takes part, else BM25), for the positive-aware filter.
        excluded: (C,) True for the positive and its copies.
    """
    threshold = math.inf
    if config.max_score_ratio is not None:
        # ratio x the positive's score when it is positive; below a negative score by the same share
        # (0.95 x -0.2 = -0.19 would let candidates above the positive through)
        threshold = min(threshold, positive_score - (1 - config.max_score_ratio) * abs(positive_score))
    if config.margin is not None:
        threshold = min(threshold, positive_score - config.margin)
    chosen, skipped, filtered = [], 0, 0
    for candidate in order:
        if excluded[candidate]:
            continue
        if skipped < config.skip_top:
            skipped += 1
            continue
        if filter_scores[candidate] > threshold:
            filtered += 1
            continue
        chosen.append(candidate)
        if len(chosen) == config.survivors:
            break
    if len(chosen) > config.num_negatives:  # sampled from a rank range
        drawn = np.random.default_rng([config.seed, query]).choice(len(chosen), config.num_negatives, replace=False)
        chosen = [chosen[i] for i in sorted(drawn)]
    return chosen, filtered


def mine(
    queries: list[str], positives: list[int], pools: list[np.ndarray], texts: list[str], config: MiningConfig,
    dense: tuple[torch.Tensor, torch.Tensor] | None = None, max_scores: int = 1 << 24, device=None,
    excluded: list[set[int]] | None = None,
) -> tuple[list[list[int]], MiningStats]:
    """The negatives of every query, as indices into ``texts``, hardest first.

    Args:
        queries: Q query texts (for BM25).
        positives: Q indices into ``texts`` of each query's positive (the filter's reference).
        excluded: Q sets of indices into ``texts`` that are never a query's negative: every positive
            of that query (default: its own positive alone).
        pools: Q arrays of candidate indices into ``texts``; queries sharing one array object are
            scored together (one matrix product per group).
        texts: every text: the corpus and the positives, each distinct text once (so the positive's
            copies in a pool are exactly the entries equal to its index).
        dense: ``(query_embeddings (Q, D), text_embeddings (T, D))``, L2-normalised; needed unless
            the scorer is ``bm25``. Scored on ``device`` (the GPU for a large corpus).
        max_scores: bound on the query x candidate scores held at once (memory).
    """
    use_bm25, use_dense = config.scorer in ("bm25", "hybrid"), config.scorer in ("dense", "hybrid")
    if use_dense and dense is None:
        raise ValueError(f"scorer {config.scorer!r} needs dense embeddings")
    if excluded is None:
        excluded = [{p} for p in positives]
    if config.scorer == "dense":
        return mine_dense(positives, pools, config, dense, excluded, device)
    bm25 = BM25(texts) if use_bm25 else None
    if use_dense:
        query_embeddings, text_embeddings = (e.to(device) for e in dense)
    stats, negatives = MiningStats(), [[] for _ in queries]
    progress = tqdm(total=len(queries), desc="mining", unit="query")
    for members in query_groups(pools):
        pool = pools[members[0]]  # (C,) candidate indices
        if use_bm25:
            pool_weights = bm25.weights[pool].T.tocsc()  # (V, C)
        if use_dense:
            pool_embeddings = text_embeddings[torch.from_numpy(pool).to(text_embeddings.device)].float()  # (C, D)
        # Selection walks the top of the ranking; enough for the filter to drop a good many first.
        top = min(len(pool), config.skip_top + 4 * config.survivors + 32)
        step = max(1, max_scores // max(len(pool), 1))
        for start in range(0, len(members), step):
            rows = members[start : start + step]
            positive = np.array([positives[q] for q in rows])
            scored, positive_scores = {}, {}
            if use_bm25:
                query_matrix = bm25.query_matrix([queries[q] for q in rows])  # (q, V)
                scored["bm25"] = torch.from_numpy((query_matrix @ pool_weights).toarray())  # (q, C)
                positive_scores["bm25"] = np.asarray(query_matrix.multiply(bm25.weights[positive]).sum(axis=1)).ravel()
            if use_dense:
                rows_embeddings = query_embeddings[torch.tensor(rows, device=query_embeddings.device)]  # (q, D)
                scored["dense"] = (rows_embeddings @ pool_embeddings.T).cpu()  # (q, C)
                own = text_embeddings[torch.from_numpy(positive).to(text_embeddings.device)].float()  # (q, D)
                positive_scores["dense"] = (rows_embeddings * own).sum(dim=-1).cpu().numpy()  # (q,)
            ranking = rank_fusion(*scored.values()) if config.scorer == "hybrid" else next(iter(scored.values()))
            filtering, filtering_positive = (scored["dense"], positive_scores["dense"]) if use_dense else (
                scored["bm25"], positive_scores["bm25"])
            tops = ranking.topk(top, dim=1).indices.tolist()  # (q, top)
            for k, query in enumerate(rows):
                # (C,) texts are distinct, so this is every copy of every positive of the query
                mask = torch.from_numpy(np.isin(pool, np.fromiter(excluded[query], dtype=np.int64)))
                arguments = filtering[k], float(filtering_positive[k]), mask, config
                chosen, filtered = select_negatives(tops[k], *arguments, query=query)
                if len(chosen) < config.num_negatives and top < len(pool):  # the top was not enough: everything
                    chosen, filtered = select_negatives(ranking[k].argsort(descending=True, stable=True).tolist(),
                                                        *arguments, query=query)
                negatives[query] = [int(pool[c]) for c in chosen]
                stats.add(chosen, filtered, config.num_negatives)
            progress.update(len(rows))
    progress.close()
    return negatives, stats


def mine_dense(positives: list[int], pools: list[np.ndarray], config: MiningConfig,
               dense: tuple[torch.Tensor, torch.Tensor], excluded: list[set[int]], device=None,
               ) -> tuple[list[list[int]], MiningStats]:
    """:func:`mine` with the dense scorer alone, at corpus scale: each query's best candidates come
    from the exact blocked search (:func:`.search.top_k`, on ``device``), never a full ranking;
    a query whose top candidates the filter and the exclusions use up searches again, four times
    deeper, until it has its negatives or the pool is spent."""
    query_embeddings, text_embeddings = dense  # (Q, D), (T, D)
    stats, negatives = MiningStats(), [[] for _ in positives]
    progress = tqdm(total=len(positives), desc="mining", unit="query")
    for members in query_groups(pools):
        pool = pools[members[0]]  # (C,) candidate indices
        whole = len(pool) == len(text_embeddings) and bool((pool == np.arange(len(pool))).all())
        candidates = text_embeddings if whole else text_embeddings[torch.from_numpy(pool)]  # (C, D) no copy if whole
        for start in range(0, len(members), QUERY_BLOCK):
            rows = members[start: start + QUERY_BLOCK]
            query_rows = query_embeddings[torch.tensor(rows)]  # (q, D)
            own = text_embeddings[torch.tensor([positives[q] for q in rows])]  # (q, D)
            positive_scores = (query_rows.float() * own.float()).sum(dim=-1).tolist()  # (q,)
            depth = min(len(pool), config.skip_top + 4 * config.survivors + 32 + max(len(excluded[q]) for q in rows))
            scores, found = top_k(query_rows, candidates, depth, device=device)  # (q, depth)
            for k, query in enumerate(rows):
                row_scores, row_found, row_depth = scores[k], found[k], depth
                while True:
                    banned = np.fromiter(excluded[query], dtype=np.int64)
                    mask = torch.from_numpy(np.isin(pool[row_found.numpy()], banned))  # (depth,)
                    chosen, filtered = select_negatives(range(len(row_found)), row_scores, positive_scores[k], mask,
                                                        config, query)
                    if len(chosen) == config.num_negatives or row_depth >= len(pool):
                        break
                    row_depth = min(len(pool), 4 * row_depth)  # not enough: search this query deeper
                    row_scores, row_found = (x[0] for x in top_k(query_rows[k: k + 1], candidates, row_depth, device=device))
                negatives[query] = [int(pool[int(row_found[c])]) for c in chosen]
                stats.add(chosen, filtered, config.num_negatives)
            progress.update(len(rows))
    progress.close()
    return negatives, stats
