"""Hard-negative mining: candidates from a corpus scored by BM25 and/or a dense model, filtered
relative to the positive's score.

For each (query, positive) pair the candidates are a pool of texts (the whole corpus, the chunks of
the pair's own document, or every positive of the data), ranked by the scorer; the positive itself
and any text identical to it are never candidates. Positive-aware filtering follows NV-Retriever
(Moreira et al., 2024): a candidate scoring above ``max_score_ratio`` x the positive's score
("TopK-PercPos", 0.95 was their best) or above the positive's score minus ``margin``
("TopK-MarginPos") is likely an unlabelled positive and is dropped. The hardest survivors,
after skipping the ``skip_top`` best-ranked, become the negatives, hardest first.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from . import UserError
from .bm25 import BM25
from .readers import iter_records, read_corpus
from .records import normalised, parse_record, record_format
from .tokenization import tokenize
from .inference import PRECISIONS, autocast_dtype, encode, load_retriever, prompts_for
from .positions import token_positions
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
) -> tuple[list[int], int]:
    """One query's negatives, hardest first, and how many candidates the filter dropped on the way.

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
        if len(chosen) == config.num_negatives:
            break
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
        top = min(len(pool), config.skip_top + 4 * config.num_negatives + 32)
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
                chosen, filtered = select_negatives(tops[k], *arguments)
                if len(chosen) < config.num_negatives and top < len(pool):  # the top was not enough: everything
                    chosen, filtered = select_negatives(ranking[k].argsort(descending=True, stable=True).tolist(), *arguments)
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
            depth = min(len(pool), config.skip_top + 4 * config.num_negatives + 32 + max(len(excluded[q]) for q in rows))
            scores, found = top_k(query_rows, candidates, depth, device=device)  # (q, depth)
            for k, query in enumerate(rows):
                row_scores, row_found, row_depth = scores[k], found[k], depth
                while True:
                    banned = np.fromiter(excluded[query], dtype=np.int64)
                    mask = torch.from_numpy(np.isin(pool[row_found.numpy()], banned))  # (depth,)
                    chosen, filtered = select_negatives(range(len(row_found)), row_scores, positive_scores[k], mask,
                                                        config)
                    if len(chosen) == config.num_negatives or row_depth >= len(pool):
                        break
                    row_depth = min(len(pool), 4 * row_depth)  # not enough: search this query deeper
                    row_scores, row_found = (x[0] for x in top_k(query_rows[k: k + 1], candidates, row_depth, device=device))
                negatives[query] = [int(pool[int(row_found[c])]) for c in chosen]
                stats.add(chosen, filtered, config.num_negatives)
            progress.update(len(rows))
    progress.close()
    return negatives, stats


@dataclass
class MiningArguments:
    input: list[str] = field(metadata={"help": "Training records (.jsonl, .json, .parquet files or folders, or a "
                                       "BEIR folder) in any training format; each needs a query and a positive."})
    output: str = field(metadata={"help": "Where the records go, as JSON lines: each input record with its "
                                  "negatives field (hard_negatives / negative / negatives / neg / negative_passages) "
                                  "replaced, hardest first."})
    corpus: str | None = field(default=None, metadata={
        "help": "Candidate passages: a ChatRAG documents.json ({document: [chunk, ...]}), a JSON list, a .jsonl "
                "(strings or objects with 'text') or a .txt (one a line). Default: every positive of the input."})
    per_document: bool = field(default=False, metadata={
        "help": "Take each record's candidates from its own document only (a documents.json corpus and a "
                "'document' field in every record), as ChatRAG's evaluation ranks them."})
    model_name_or_path: str | None = field(default=None, metadata={
        "help": "Dense model scoring the candidates (a trained output folder for iterative mining; 'default': the "
                "embedded all-MiniLM-L6-v2). Needed by --scorer dense and hybrid."})
    scorer: str | None = field(default=None, metadata={
        "help": "bm25, dense, or hybrid (reciprocal-rank fusion of both). Default: dense when a model is given, "
                "else bm25.", "choices": list(SCORERS)})
    num_negatives: int = field(default=7, metadata={"help": "Negatives per record (fewer if the filter leaves fewer)."})
    skip_top: int = field(default=0, metadata={"help": "Skip this many best-ranked candidates first (rank window)."})
    max_score_ratio: float | None = field(default=None, metadata={
        "help": "Drop candidates scoring above this fraction of the positive's score (NV-Retriever's TopK-PercPos; "
                "0.95 was their best). Dense cosine when a model takes part, else BM25 score."})
    margin: float | None = field(default=None, metadata={
        "help": "Drop candidates scoring above the positive's score minus this margin (TopK-MarginPos)."})
    query_turns: int = field(default=5, metadata={"help": "A conversation query keeps its last N turns."})
    query_instruction: str | None = field(default=None, metadata={
        "help": "Prefix of every query for the dense model (default: the model's recorded 'query' prompt, if any)."})
    passage_instruction: str | None = field(default=None, metadata={
        "help": "Prefix of every passage for the dense model (default: its recorded 'document' prompt, if any)."})
    trust_remote_code: bool = field(default=False, metadata={
        "help": "Run the dense model's own code from its folder (e.g. nomic-bert); only for code you trust."})
    query_max_len: int = field(default=256, metadata={"help": "Max query tokens for the dense model (cut on the left)."})
    passage_max_len: int = field(default=1024, metadata={
        "help": "Max passage tokens for the dense model (cut on the right; capped at its position table)."})
    batch_size: int | None = field(default=None, metadata={"help": "Texts encoded at once (default: 64 on GPU, 8 on CPU)."})
    precision: str = field(default="auto", metadata={
        "help": "fp32, or bf16 / fp16 autocast for the dense model; auto: on a GPU bf16 where it computes in bf16, "
                "else fp16; fp32 on CPU.", "choices": list(PRECISIONS)})
    device: str | None = field(default=None, metadata={"help": "cuda, cpu... (default: cuda if available)."})
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing --output file."})


def validate(args: MiningArguments) -> None:
    if args.scorer is None:
        args.scorer = "dense" if args.model_name_or_path else "bm25"
    if args.scorer != "bm25" and not args.model_name_or_path:
        raise UserError(f"--scorer {args.scorer} needs --model_name_or_path (a dense model; 'default' for MiniLM)")
    if args.num_negatives < 1 or args.skip_top < 0:
        raise UserError("--num_negatives must be >= 1 and --skip_top >= 0")
    if args.max_score_ratio is not None and not 0 < args.max_score_ratio <= 1:
        raise UserError(f"--max_score_ratio must be in (0, 1], got {args.max_score_ratio}")
    if args.per_document and not args.corpus:
        raise UserError("--per_document needs --corpus (a documents.json)")
    output = Path(args.output)
    if output.exists() and not args.overwrite:
        raise UserError(f"--output {output} exists; choose another file or pass --overwrite")
    if any(Path(name).exists() and output.resolve() == Path(name).resolve() for name in args.input):
        raise UserError(f"--output {output} is one of the input files")


def run(args: MiningArguments) -> dict:
    """Mine, write ``args.output`` (atomically) and return a summary (also written beside it as
    ``<output>.json``)."""
    validate(args)
    started = time.perf_counter()
    records, queries, positive_texts, other_positives, documents, negative_keys = [], [], [], [], [], []
    for name in args.input:
        for where, record in iter_records(name):
            example = parse_record(record, where, args.query_turns)
            if args.per_document and not isinstance(record.get("document"), str):
                raise UserError(f"{where}: --per_document needs a 'document' field naming the record's document")
            records.append(record)
            queries.append(example.query)
            positive_texts.append(example.positive)  # the filter's reference: the first positive
            other_positives.append(example.other_positives)
            documents.append(record.get("document"))
            negative_keys.append(record_format(record, where))
    if not records:
        raise UserError(f"no records in {', '.join(args.input)}")

    texts, index = [], {}  # every distinct text once (whitespace-normalised key)

    def text_index(text: str) -> int:
        key = normalised(text)
        if key not in index:
            index[key] = len(texts)
            texts.append(text)
        return index[key]

    corpus = read_corpus(args.corpus) if args.corpus else None
    if isinstance(corpus, dict):
        by_document = {name: np.array(sorted({text_index(t) for t in chunks}), dtype=np.int64) for name, chunks in corpus.items()}
        everything = np.unique(np.concatenate([*by_document.values(), np.zeros(0, dtype=np.int64)]))
    elif corpus is not None:
        everything = np.array(sorted({text_index(t) for t in corpus}), dtype=np.int64)
    positives = [text_index(t) for t in positive_texts]
    others = [[text_index(t) for t in more] for more in other_positives]
    if corpus is None:
        everything = np.array(sorted(set(positives).union(*others)), dtype=np.int64)
    if args.per_document:
        if not isinstance(corpus, dict):
            raise UserError(f"--per_document needs a documents.json corpus ({{document: [chunk, ...]}}), not {args.corpus}")
        missing = sorted({d for d in documents if d not in corpus})
        if missing:
            raise UserError(f"documents {missing[:5]} of the records are not in {args.corpus}")
        pools = [by_document[d] for d in documents]
    else:
        pools = [everything] * len(records)

    dense, device = None, None
    if args.scorer != "bm25":
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        path = None if args.model_name_or_path == "default" else args.model_name_or_path
        model, tokenizer = load_retriever(path, trust_remote_code=args.trust_remote_code)
        model.to(device)
        prompts = prompts_for(model, args.query_instruction, args.passage_instruction)
        positions = token_positions(model.query_encoder)
        batching = {"batch_size": args.batch_size or (64 if device.type == "cuda" else 8),
                    "pad_token_id": tokenizer.pad_token_id, "device": device,
                    "autocast": autocast_dtype(args.precision, device)}
        needed = np.unique(np.concatenate([*{id(p): p for p in pools}.values(), np.array(positives)]))
        text_ids = tokenize(tokenizer, [texts[i] for i in needed], min(args.passage_max_len, positions), "right",
                            prompts["document"])
        # half precision on a GPU: a million passages in 2 GB (scores are computed in float32 anyway)
        dtype = torch.float16 if device.type == "cuda" else torch.float32
        text_embeddings = torch.zeros(len(texts), model.config.hidden_size, dtype=dtype)  # (T, D) unused rows stay 0
        text_embeddings[torch.from_numpy(needed)] = encode(model, text_ids, "passage", desc="passages", out_dtype=dtype,
                                                           **batching)
        query_ids = tokenize(tokenizer, queries, min(args.query_max_len, positions), "left", prompts["query"])
        dense = encode(model, query_ids, "query", desc="queries", **batching), text_embeddings  # (Q, D), (T, D)
        del model

    config = MiningConfig(num_negatives=args.num_negatives, skip_top=args.skip_top, max_score_ratio=args.max_score_ratio,
                          margin=args.margin, scorer=args.scorer)
    # a query may come in several records with other positives: none of them is ever its negative
    positives_of: dict[str, set[int]] = defaultdict(set)
    for query, positive, more in zip(queries, positives, others):
        positives_of[normalised(query)].update([positive, *more])
    excluded = [positives_of[normalised(query)] for query in queries]
    negatives, stats = mine(queries, positives, pools, texts, config, dense, device=device, excluded=excluded)

    output = args.output
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output + ".tmp", "w", encoding="utf-8") as handle:
        for record, chosen, form in zip(records, negatives, negative_keys):
            key = form.negatives
            # fields describing the old negatives (indices, page ids, the miner) would be stale
            record = {k: v for k, v in record.items() if not (k != key and k.startswith(("hard_negative", "negative")))}
            mined = [texts[i] for i in chosen]
            record[key] = [{"docid": "", "title": "", "text": t} for t in mined] if form.name == "tevatron" else mined
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(output + ".tmp", output)
    summary = {
        "output": output, "records": len(records), "candidates": int(len(everything)) if not args.per_document else
        {name: int(len(pool)) for name, pool in by_document.items()},
        "negatives_per_record": round(stats.negatives / stats.queries, 3), "filtered": stats.filtered,
        "records_with_fewer": stats.short, "seconds": round(time.perf_counter() - started, 1),
        "arguments": dict(vars(args)),
    }
    with open(output + ".json", "w") as handle:
        json.dump(summary, handle, indent=2)
    logger.info("mined %s negatives per record for %d records (%d candidates filtered as likely positives, %d records "
                "with fewer than %d) in %.1f s; wrote %s", summary["negatives_per_record"], len(records), stats.filtered,
                stats.short, args.num_negatives, summary["seconds"], output)
    return summary
