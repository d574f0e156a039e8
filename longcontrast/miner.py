"""The hard-negative miner's driver (``data/mine_hard_negatives.py``): its arguments, then numbered
steps: read the records, gather each record's candidates, score them with a dense model if one
takes part, mine (:func:`.mining.mine`), write the records with their new negatives and a summary.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import torch

from . import UserError
from .inference import PRECISIONS, autocast_dtype, encode, load_retriever, prompts_for
from .mining import SCORERS, MiningConfig, mine
from .positions import token_positions
from .readers import check_output, iter_records, read_corpus
from .records import normalised, parse_record, record_format
from .tokenization import tokenize

logger = logging.getLogger(__name__)


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
    sample_from: int | None = field(default=None, metadata={
        "help": "Draw the --num_negatives at random (seeded by --seed and the record) from the first R candidates "
                "that survive the filter after --skip_top, kept in rank order: a pool of varied hardness, as "
                "FlagEmbedding's range_for_sampling (e.g. --skip_top 2 --sample_from 200). Default: the hardest."})
    seed: int = field(default=42, metadata={"help": "Seed of --sample_from's draws."})
    max_score_ratio: float | None = field(default=None, metadata={
        "help": "Drop candidates scoring above this fraction of the positive's score (NV-Retriever's TopK-PercPos; "
                "0.95 was their best). Dense cosine when a model takes part, else BM25 score."})
    margin: float | None = field(default=None, metadata={
        "help": "Drop candidates scoring above the positive's score minus this margin (TopK-MarginPos)."})
    query_turns: int = field(default=5, metadata={"help": "A conversation query keeps its last N turns."})
    query_prompt: str | None = field(default=None, metadata={"aliases": ["--query_instruction"],
        "help": "Prefix of every query for the dense model (default: the model's recorded 'query' prompt, if any)."})
    passage_prompt: str | None = field(default=None, metadata={"aliases": ["--passage_instruction"],
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
    if args.sample_from is not None and args.sample_from < args.num_negatives:
        raise UserError(f"--sample_from {args.sample_from} must be at least --num_negatives ({args.num_negatives})")
    if args.max_score_ratio is not None and not 0 < args.max_score_ratio <= 1:
        raise UserError(f"--max_score_ratio must be in (0, 1], got {args.max_score_ratio}")
    if args.per_document and not args.corpus:
        raise UserError("--per_document needs --corpus (a documents.json)")
    check_output(args.output, args.input, overwrite=args.overwrite)


@dataclass
class Inputs:
    """The records as read, and every distinct text they and the corpus hold (whitespace-normalised)."""

    records: list[dict] = field(default_factory=list)
    queries: list[str] = field(default_factory=list)
    positive_texts: list[str] = field(default_factory=list)  # the first positive: the filter's reference
    other_texts: list[list[str]] = field(default_factory=list)  # more positives of the record
    positives: list[int] = field(default_factory=list)  # their indices into texts, once the corpus is indexed
    others: list[list[int]] = field(default_factory=list)
    documents: list[str | None] = field(default_factory=list)
    formats: list = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    index: dict[str, int] = field(default_factory=dict)

    def text_index(self, text: str) -> int:
        key = normalised(text)
        if key not in self.index:
            self.index[key] = len(self.texts)
            self.texts.append(text)
        return self.index[key]


def read_inputs(args: MiningArguments) -> Inputs:
    data = Inputs()
    for name in args.input:
        for where, record in iter_records(name):
            example = parse_record(record, where, args.query_turns)
            if args.per_document and not isinstance(record.get("document"), str):
                raise UserError(f"{where}: --per_document needs a 'document' field naming the record's document")
            data.records.append(record)
            data.queries.append(example.query)
            data.positive_texts.append(example.positive)
            data.other_texts.append(example.other_positives)
            data.documents.append(record.get("document"))
            data.formats.append(record_format(record, where))
    if not data.records:
        raise UserError(f"no records in {', '.join(args.input)}")
    return data


def candidate_pools(args: MiningArguments, data: Inputs) -> tuple[list[np.ndarray], dict | int]:
    """Each record's candidate texts (indices into ``data.texts``) and their count for the summary:
    its document's chunks (``--per_document``), the whole corpus, or every positive of the input.
    The corpus's texts are indexed before the positives (the order in which equal scores fall)."""
    corpus = read_corpus(args.corpus) if args.corpus else None
    if isinstance(corpus, dict):
        by_document = {name: np.array(sorted({data.text_index(t) for t in chunks}), dtype=np.int64)
                       for name, chunks in corpus.items()}
        everything = np.unique(np.concatenate([*by_document.values(), np.zeros(0, dtype=np.int64)]))
    elif corpus is not None:
        everything = np.array(sorted({data.text_index(t) for t in corpus}), dtype=np.int64)
    data.positives = [data.text_index(t) for t in data.positive_texts]
    data.others = [[data.text_index(t) for t in more] for more in data.other_texts]
    if corpus is None:
        everything = np.array(sorted(set(data.positives).union(*data.others)), dtype=np.int64)
    if not args.per_document:
        return [everything] * len(data.records), int(len(everything))
    if not isinstance(corpus, dict):
        raise UserError(f"--per_document needs a documents.json corpus ({{document: [chunk, ...]}}), not {args.corpus}")
    missing = sorted({d for d in data.documents if d not in corpus})
    if missing:
        raise UserError(f"documents {missing[:5]} of the records are not in {args.corpus}")
    return [by_document[d] for d in data.documents], {name: int(len(pool)) for name, pool in by_document.items()}


def dense_embeddings(args: MiningArguments, data: Inputs, pools: list[np.ndarray]):
    """``((Q, D) queries, (T, D) texts)`` of the dense model (texts no pool holds stay 0) and its device."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    path = None if args.model_name_or_path == "default" else args.model_name_or_path
    model, tokenizer = load_retriever(path, trust_remote_code=args.trust_remote_code)
    model.to(device)
    prompts = prompts_for(model, args.query_prompt, args.passage_prompt)
    positions = token_positions(model.query_encoder)
    batching = {"batch_size": args.batch_size or (64 if device.type == "cuda" else 8),
                "pad_token_id": tokenizer.pad_token_id, "device": device, "autocast": autocast_dtype(args.precision, device)}
    needed = np.unique(np.concatenate([*{id(p): p for p in pools}.values(), np.array(data.positives)]))
    text_ids = tokenize(tokenizer, [data.texts[i] for i in needed], min(args.passage_max_len, positions), "right",
                        prompts["document"])
    # half precision on a GPU: a million passages in 2 GB (scores are computed in float32 anyway)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    texts = torch.zeros(len(data.texts), model.config.hidden_size, dtype=dtype)  # (T, D)
    texts[torch.from_numpy(needed)] = encode(model, text_ids, "passage", desc="passages", out_dtype=dtype, **batching)
    query_ids = tokenize(tokenizer, data.queries, min(args.query_max_len, positions), "left", prompts["query"])
    return (encode(model, query_ids, "query", desc="queries", **batching), texts), device


def write_records(output: str, data: Inputs, negatives: list[list[int]]) -> None:
    """The input records with their negatives field replaced (hardest first), written atomically."""
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output + ".tmp", "w", encoding="utf-8") as handle:
        for record, chosen, form in zip(data.records, negatives, data.formats):
            key = form.negatives
            # fields describing the old negatives (indices, page ids, the miner) would be stale
            record = {k: v for k, v in record.items() if not (k != key and k.startswith(("hard_negative", "negative")))}
            mined = [data.texts[i] for i in chosen]
            record[key] = [{"docid": "", "title": "", "text": t} for t in mined] if form.name == "tevatron" else mined
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(output + ".tmp", output)


def run(args: MiningArguments) -> dict:
    """Mine, write ``args.output`` (atomically) and return a summary (also written beside it as
    ``<output>.json``)."""
    # 1. the flags, the records and each record's candidates
    validate(args)
    started = time.perf_counter()
    data = read_inputs(args)
    pools, candidates = candidate_pools(args, data)
    # 2. the dense model's embeddings, if it takes part
    dense, device = dense_embeddings(args, data, pools) if args.scorer != "bm25" else (None, None)
    # 3. mining: a query may come in several records with other positives, none of them ever its negative
    positives_of: dict[str, set[int]] = defaultdict(set)
    for query, positive, more in zip(data.queries, data.positives, data.others):
        positives_of[normalised(query)].update([positive, *more])
    config = MiningConfig(num_negatives=args.num_negatives, skip_top=args.skip_top, max_score_ratio=args.max_score_ratio,
                          margin=args.margin, scorer=args.scorer, sample_from=args.sample_from, seed=args.seed)
    negatives, stats = mine(data.queries, data.positives, pools, data.texts, config, dense, device=device,
                            excluded=[positives_of[normalised(q)] for q in data.queries])
    # 4. the records and the summary
    write_records(args.output, data, negatives)
    summary = {
        "output": args.output, "records": len(data.records), "candidates": candidates,
        "negatives_per_record": round(stats.negatives / stats.queries, 3), "filtered": stats.filtered,
        "records_with_fewer": stats.short, "seconds": round(time.perf_counter() - started, 1),
        "arguments": dict(vars(args)),
    }
    with open(args.output + ".json", "w") as handle:
        json.dump(summary, handle, indent=2)
    logger.info("mined %s negatives per record for %d records (%d candidates filtered as likely positives, %d records "
                "with fewer than %d) in %.1f s; wrote %s", summary["negatives_per_record"], len(data.records),
                stats.filtered, stats.short, args.num_negatives, summary["seconds"], args.output)
    return summary
