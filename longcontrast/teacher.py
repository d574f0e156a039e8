"""Teacher scores for training records (distillation): a cross-encoder's, a bi-encoder's cosine or a
late-interaction model's MaxSim, or either fused with BM25 (the deployed hybrid), for each record's positives and negatives;
``data/score_with_teacher.py`` is the driver. The records are written back in their own format
with its score fields (:data:`.records.FORMATS`)."""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from . import UserError
from .bm25 import BM25
from .inference import PRECISIONS, autocast_dtype, encode, load_retriever, prompts_for
from .positions import token_positions
from .readers import check_output, iter_records, read_corpus
from .records import normalised, parse_record, record_format
from .search import score_fusion
from .tokenization import tokenize

logger = logging.getLogger(__name__)


@dataclass
class TeacherArguments:
    input: list[str] = field(metadata={"help": "Training records (.jsonl, .json, .parquet files or folders) in any "
                                       "training format, with their positives and hard negatives."})
    output: str = field(metadata={"help": "Where the records go, as JSON lines: each input record with its format's "
                                  "teacher score fields (pos_scores/neg_scores, scores, positive_scores/negative_scores)."})
    cross_encoder: str | None = field(default=None, metadata={
        "help": "A sentence-transformers CrossEncoder folder: its score of each (query, passage) pair."})
    model_name_or_path: str | None = field(default=None, metadata={
        "help": "A bi-encoder (any embedding model folder; 'default': the embedded all-MiniLM-L6-v2): the cosine of "
                "query and passage; a late-interaction folder (--colbert_dim, PyLate's layout): MaxSim, each passage "
                "read whole in consecutive --passage_max_len-token segments."})
    fuse_bm25: float | None = field(default=None, metadata={
        "help": "With --model_name_or_path: the hybrid (1 - W) z(cosine) + W z(BM25), as evaluate.py --fuse_bm25 "
                "deploys it: z-scored over each record's passages, or with --per_document over its document's chunks."})
    corpus: str | None = field(default=None, metadata={
        "help": "BM25's statistics: a ChatRAG documents.json, a JSON list, .jsonl or .txt of passages. Default: every "
                "passage of the input."})
    per_document: bool = field(default=False, metadata={
        "help": "Score each record against its own document ('document' field; a documents.json --corpus) as the "
                "evaluation's hybrid ranks a document's chunks: BM25's statistics and the z-scores over the document's "
                "chunks and its records' passages, so a score says how the passage stands in the whole document."})
    query_turns: int = field(default=5, metadata={"help": "A conversation query keeps its last N turns."})
    query_max_len: int = field(default=256, metadata={"help": "Max query tokens (bi-encoder)."})
    passage_max_len: int = field(default=512, metadata={"help": "Max passage tokens (bi-encoder; the cross-encoder "
                                                        "reads its own maximum)."})
    batch_size: int | None = field(default=None, metadata={"help": "Texts (pairs) scored at once (default: 64 on GPU, "
                                                           "8 on CPU)."})
    precision: str = field(default="auto", metadata={"help": "fp32, or bf16 / fp16 autocast for the bi-encoder.",
                                                     "choices": list(PRECISIONS)})
    trust_remote_code: bool = field(default=False, metadata={"help": "Run the model's own code from its folder."})
    device: str | None = field(default=None, metadata={"help": "cuda, cpu... (default: cuda if available)."})
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing --output file."})


def validate(args: TeacherArguments) -> None:
    if bool(args.cross_encoder) == bool(args.model_name_or_path):
        raise UserError("give one teacher: --cross_encoder FOLDER, or --model_name_or_path (with --fuse_bm25 W for "
                        "the hybrid)")
    if args.fuse_bm25 is not None and not (args.model_name_or_path and 0 < args.fuse_bm25 < 1):
        raise UserError("--fuse_bm25 W fuses a --model_name_or_path's cosine with BM25: W strictly between 0 and 1")
    if (args.corpus or args.per_document) and args.fuse_bm25 is None:
        raise UserError("--corpus and --per_document give BM25's statistics, which only --fuse_bm25 uses")
    if args.per_document and not args.corpus:
        raise UserError("--per_document needs --corpus (a documents.json)")
    for name in ("query_turns", "query_max_len", "passage_max_len", "batch_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UserError(f"--{name} must be >= 1")
    check_output(args.output, args.input, overwrite=args.overwrite)


@dataclass
class Scored:
    """The records as read, and per record its query and passages (positives first) to score."""

    records: list[dict] = field(default_factory=list)
    formats: list = field(default_factory=list)
    queries: list[str] = field(default_factory=list)
    passages: list[list[str]] = field(default_factory=list)
    num_positives: list[int] = field(default_factory=list)
    documents: list[str | None] = field(default_factory=list)


def read_inputs(args: TeacherArguments) -> Scored:
    data = Scored()
    for name in args.input:
        for where, record in iter_records(name):
            example = parse_record(record, where, args.query_turns)
            if args.per_document and not isinstance(record.get("document"), str):
                raise UserError(f"{where}: --per_document needs a 'document' field naming the record's document")
            data.records.append(record)
            data.formats.append(record_format(record, where))
            data.queries.append(example.query)
            data.passages.append([*example.positives, *example.negatives])
            data.num_positives.append(len(example.positives))
            data.documents.append(record.get("document"))
    if not data.records:
        raise UserError(f"no records in {', '.join(args.input)}")
    return data


def cross_encoder_scores(args: TeacherArguments, data: Scored, device) -> list[np.ndarray]:
    """Each record's (C,) cross-encoder scores (its raw output: logits for a ranking head)."""
    from sentence_transformers import CrossEncoder

    model = CrossEncoder(args.cross_encoder, device=str(device), trust_remote_code=args.trust_remote_code)
    pairs = [(query, passage) for query, passages in zip(data.queries, data.passages) for passage in passages]
    flat = np.asarray(model.predict(pairs, batch_size=args.batch_size or (64 if device.type == "cuda" else 8),
                                    show_progress_bar=True, convert_to_numpy=True), dtype=np.float64)
    if flat.ndim != 1:
        raise UserError(f"--cross_encoder {args.cross_encoder} gives {flat.shape[1:]} scores per pair; a teacher "
                        "needs one (a ranking head with num_labels 1)")
    return np.split(flat, np.cumsum([len(p) for p in data.passages])[:-1])


@dataclass
class Populations:
    """What each record's scores are computed over: its group's texts (``texts[group_of[r]]``) and the
    rows of its own passages among them. With ``--per_document`` a group is a document's chunks plus
    its records' passages (the hybrid is z-scored over all of them, as the evaluation ranks a
    document); otherwise each record is its own group, its passages."""

    texts: dict[str, list[str]]
    group_of: list[str]
    rows: list[np.ndarray]


def populations(args: TeacherArguments, data: Scored) -> Populations:
    if not args.per_document:
        names = [str(r) for r in range(len(data.records))]
        return Populations(dict(zip(names, data.passages)), names, [np.arange(len(p)) for p in data.passages])
    corpus = read_corpus(args.corpus)
    if not isinstance(corpus, dict):
        raise UserError(f"--per_document needs a documents.json corpus ({{document: [chunk, ...]}}), not {args.corpus}")
    missing = sorted({d for d in data.documents if d not in corpus})
    if missing:
        raise UserError(f"documents {missing[:5]} of the records are not in {args.corpus}")
    index: dict[str, dict[str, tuple[int, str]]] = {}  # document -> normalised text -> (row, text)
    for document in dict.fromkeys(data.documents):
        texts = index.setdefault(document, {})
        members = [r for r, d in enumerate(data.documents) if d == document]
        for text in [*corpus[document], *(t for r in members for t in data.passages[r])]:
            texts.setdefault(normalised(text), (len(texts), text))
    rows = [np.array([index[d][normalised(t)][0] for t in passages]) for d, passages in zip(data.documents, data.passages)]
    return Populations({d: [text for _, text in sorted(texts.values())] for d, texts in index.items()},
                       list(data.documents), rows)


def dense_scores(args: TeacherArguments, data: Scored, groups: Populations, device) -> list[np.ndarray]:
    """Each record's cosines of the bi-encoder with its group's texts, every distinct text encoded once."""
    path = None if args.model_name_or_path == "default" else args.model_name_or_path
    model, tokenizer = load_retriever(path, trust_remote_code=args.trust_remote_code)
    model.to(device)
    prompts = prompts_for(model, None, None)
    positions = token_positions(model.query_encoder)
    batching = {"batch_size": args.batch_size or (64 if device.type == "cuda" else 8),
                "pad_token_id": tokenizer.pad_token_id, "device": device, "autocast": autocast_dtype(args.precision, device)}
    index: dict[str, int] = {}  # each distinct text (whitespace-normalised) once
    texts = []
    for group in groups.texts.values():
        for text in group:
            if normalised(text) not in index:
                index[normalised(text)] = len(texts)
                texts.append(text)
    if model.projection is not None:
        return late_interaction_scores(data, groups, model, tokenizer, texts=texts, index=index, prompts=prompts,
                                       query_length=min(args.query_max_len, positions),
                                       length=min(args.passage_max_len, positions), batching=batching)
    passage_ids = tokenize(tokenizer, texts, min(args.passage_max_len, positions), "right", prompts["document"])
    passages = encode(model, passage_ids, "passage", desc="passages", **batching)  # (T, D)
    query_ids = tokenize(tokenizer, data.queries, min(args.query_max_len, positions), "left", prompts["query"])
    queries = encode(model, query_ids, "query", desc="queries", **batching)  # (Q, D)
    rows = {name: torch.tensor([index[normalised(t)] for t in group]) for name, group in groups.texts.items()}
    return [(passages[rows[name]] @ queries[q]).double().numpy() for q, name in enumerate(groups.group_of)]


def late_interaction_scores(data: Scored, groups: Populations, model, tokenizer, *, texts: list[str],
                            index: dict[str, int], prompts: dict[str, str], query_length: int, length: int,
                            batching: dict) -> list[np.ndarray]:
    """Each record's MaxSim (the sum over its query's tokens of the best cosine with the passage's
    tokens) of a late-interaction model against its group's texts, each text read whole in
    consecutive ``length``-token segments, as ``evaluate.py`` reads long documents."""
    from .multivector import TokenIndex, encode_tokens, maxsim_scores, padded_queries
    from .tokenization import split_windows

    whole = tokenize(tokenizer, texts, 10**9, "right", prompts["document"])  # every token: segments cover it all
    pieces, owner = split_windows(tokenizer, whole, length, prompts["document"])
    vectors = encode_tokens(model, pieces, "passage", desc="passages", texts=[texts[t] for t in owner], **batching)
    pieces_of: list[list[int]] = [[] for _ in texts]
    for piece, text in enumerate(owner):
        pieces_of[text].append(piece)
    query_ids = tokenize(tokenizer, data.queries, query_length, "left", prompts["query"])
    queries = encode_tokens(model, query_ids, "query", desc="queries", out_dtype=torch.float32, **batching)
    scores: list[np.ndarray | None] = [None] * len(data.records)
    members_of: dict[str, list[int]] = {}
    for r, name in enumerate(groups.group_of):
        members_of.setdefault(name, []).append(r)
    for name, group in groups.texts.items():
        rows, members = [index[normalised(t)] for t in group], members_of[name]
        mine = TokenIndex.build([vectors[p] for t in rows for p in pieces_of[t]],
                                [i for i, t in enumerate(rows) for _ in pieces_of[t]], len(rows))
        block, mask = padded_queries([queries[r] for r in members])
        for r, row in zip(members, maxsim_scores(block, mask, mine)):  # (m, len(group))
            scores[r] = row.double().numpy()
    return scores


def bm25_scores(args: TeacherArguments, data: Scored, groups: Populations) -> list[np.ndarray]:
    """Each record's BM25 scores of its group's texts, with the statistics of its document's chunks
    and records' passages (``--per_document``), or of the corpus (or every passage of the input) and
    the passages."""
    if args.per_document:
        statistics = dict(groups.texts)
        owner = {name: name for name in groups.texts}
    else:
        corpus = read_corpus(args.corpus) if args.corpus else None
        base = [] if corpus is None else [t for chunks in corpus.values() for t in chunks] if isinstance(corpus, dict) \
            else list(corpus)
        statistics, owner = {"": [*base, *(t for texts in groups.texts.values() for t in texts)]}, \
            {name: "" for name in groups.texts}
    scores: list[np.ndarray | None] = [None] * len(data.records)
    for name, texts in statistics.items():
        members = [r for r, g in enumerate(groups.group_of) if owner[g] == name]
        index = {}
        for text in texts:
            index.setdefault(normalised(text), (len(index), text))
        bm25 = BM25([text for _, text in sorted(index.values())])
        matrix = bm25.query_matrix([data.queries[r] for r in members])
        for row, r in enumerate(members):
            rows = np.array([index[normalised(t)][0] for t in groups.texts[groups.group_of[r]]])
            scores[r] = bm25.scores(matrix[row], rows).double().numpy().reshape(-1)
    return scores


def write_records(output: str, data: Scored, scores: list[np.ndarray]) -> None:
    """The input records with their format's teacher score fields set, written atomically."""
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output + ".tmp", "w", encoding="utf-8") as handle:
        for record, form, values, positives in zip(data.records, data.formats, scores, data.num_positives):
            values = [round(float(v), 6) for v in values]
            fields = [values] if len(form.scores) == 1 else [values[:positives], values[positives:]]
            record = {**record, **dict(zip(form.scores, fields))}
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(output + ".tmp", output)


def run(args: TeacherArguments) -> dict:
    """Score, write ``args.output`` (atomically) and return a summary (also written beside it as ``<output>.json``)."""
    # 1. the flags and the records
    validate(args)
    started = time.perf_counter()
    data = read_inputs(args)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    # 2. the teacher's scores
    if args.cross_encoder:
        scores, teacher = cross_encoder_scores(args, data, device), f"cross-encoder {args.cross_encoder}"
    else:
        groups = populations(args, data)
        scores, teacher = dense_scores(args, data, groups, device), f"bi-encoder {args.model_name_or_path}"
        if args.fuse_bm25 is not None:
            keyword = bm25_scores(args, data, groups)
            scores = [score_fusion(torch.from_numpy(d)[None], torch.from_numpy(k)[None], weight=args.fuse_bm25)[0].numpy()
                      for d, k in zip(scores, keyword)]
            teacher += f" fused with BM25 (weight {args.fuse_bm25:g})"
        scores = [s[rows] for s, rows in zip(scores, groups.rows)]  # each record's own passages
    bad = next((i for i, s in enumerate(scores) if not np.isfinite(s).all()), None)
    if bad is not None:
        raise UserError(f"the teacher gave a non-finite score to record {bad + 1}; nothing was written")
    # 3. the records and the summary
    write_records(args.output, data, scores)
    ranked_first = np.mean([int(np.argmax(s) < p) for s, p in zip(scores, data.num_positives) if len(s) > p])
    summary = {"output": args.output, "records": len(data.records), "teacher": teacher,
               "positive_ranked_first": round(float(ranked_first), 4), "seconds": round(time.perf_counter() - started, 1),
               "arguments": dict(vars(args))}
    with open(args.output + ".json", "w") as handle:
        json.dump(summary, handle, indent=2)
    logger.info("scored %d records with the %s (a positive first in %.1f%% of those with negatives) in %.1f s; wrote %s",
                len(data.records), teacher, 100 * ranked_first, summary["seconds"], args.output)
    return summary
