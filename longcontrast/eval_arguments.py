"""``evaluate.py``'s arguments: dataclasses parsed by ``HfArgumentParser`` (every flag also takes
dashes for underscores), their checks, and what they build (the evaluation sets, a model as a
dense retriever)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Literal

import torch

from . import UserError
from .modeling import DualEncoder
from .inference import DEFAULT_MAX_TOKENS, autocast_dtype, load_retriever, prompts_for
from .multivector import LateInteractionRetriever
from .positions import token_positions
from .retrieval_sets import DATASETS, ChatRAGSet, CorpusSet
from .retrievers import DEFAULT_BM25_WEIGHT, DenseRetriever, EncodeSettings

logger = logging.getLogger(__name__)

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class ModelArguments:
    _argument_group_name = "models"
    model_path: list[str] | None = field(default=None, metadata={"help": (
        "Model folders to evaluate (a training output, with or without query_encoder/ and passage_encoder/, or any "
        "encoder); 'default' is the embedded all-MiniLM-L6-v2, 'bm25' the keyword baseline (BM25 over each document's "
        "chunks, or over the whole --beir corpus; its default variant, the one every hybrid fuses with), 'bm25-anserini' "
        "(k1 0.9, b 0.4, every word) and 'bm25-mteb' (k1 1.5, b 0.75, stop words dropped, stemmed: MTEB's baseline) "
        "its variants. Each model after the first is compared with the first. Default: default.")})
    query_encoder_path: str | None = field(default=None, metadata={
        "help": "Query encoder folder (with --passage_encoder_path, instead of --model_path)."})
    passage_encoder_path: str | None = field(default=None, metadata={"aliases": ["--context_encoder_path"],
                                                                     "help": "Passage encoder folder."})
    pooling: str | None = field(default=None, metadata={"choices": ["cls", "mean", "max", "lasttoken"],
        "help": "Pooling when the model records none in a sentence-transformers config (default: cls)."})
    query_prompt: str | None = field(default=None, metadata={"aliases": ["--query_instruction"],
        "help": "Prefix of every query (default: the model's recorded 'query' prompt, none if it records none)."})
    passage_prompt: str | None = field(default=None, metadata={"aliases": ["--passage_instruction"],
        "help": "Prefix of every passage (default: the model's recorded 'document' prompt, none if it records none)."})
    untrained_colbert_dim: int = field(default=0, metadata={"metavar": "D", "help": (
        "Also read each single-vector model as an untrained late-interaction model, a row NAME@colbertD: its token "
        "states through a new random D-dimensional projection (PyTorch's default init, seed 0, as "
        "efficient_train.py --colbert_dim D draws its own from --seed), scored by MaxSim; the baseline of a "
        "late-interaction model trained from it.")})
    trust_remote_code: bool = field(default=False, metadata={
        "help": "Run the model's own code from its folder (e.g. nomic-bert, jina-bert); only for code you trust."})
    torch_dtype: Literal["float32", "bfloat16", "float16", "auto"] = field(default="float32", metadata={"help": (
        "dtype of the loaded weights (auto: the checkpoint's). Half-precision weights halve the memory of a large "
        "embedder; encoding then runs in that dtype whatever --precision says.")})


@dataclass
class SetArguments:
    _argument_group_name = "evaluation sets"
    data_folder: str = field(default=os.path.join(HERE, "data", "chatrag_sample"), metadata={
        "help": "Folder with <dataset>/test.json and <dataset>/documents.json (default: the generated sample)."})
    eval_dataset: Literal["doc2dial", "quac", "qrecc", "all"] = field(default="all", metadata={
        "help": "Which ChatRAG set to evaluate."})
    beir: str | None = field(default=None, metadata={"metavar": "DIR", "help": (
        "Evaluate on a BEIR folder (corpus.jsonl, queries.jsonl, qrels/<split>.tsv): every query ranks the whole "
        "corpus. Replaces --data-folder and --eval-dataset.")})
    split: str = field(default="test", metadata={"help": "The BEIR qrels split (qrels/<split>.tsv)."})
    query_turns: int = field(default=5, metadata={"aliases": ["--num_turns", "--num-turns"],
                                                  "help": "A conversation query keeps its last N turns (as in training)."})
    qrecc_answer: bool = field(default=True, metadata={
        "help": "Append ' || <first answer>' to QReCC's gold chunk, as ChatRAG's evaluation does."})
    split_at_token: int = field(default=512, metadata={"help": (
        "Sets whose items carry gold_start_token (where the answer starts in the gold text, e.g. the whole pages of "
        "../shared/data/doc2dial/pages/dev) are also scored apart for answers starting before and from this token.")})
    page_split: bool = field(default=False, metadata={"help": (
        "Also score the set in two halves split by page (the items' source_doc_id; on a BEIR folder, each query's "
        "relevant document of smallest id; each page in one half, the halves of about equal size): choose recipes on "
        "split=selection, quote split=report.")})


@dataclass
class ReadingArguments:
    _argument_group_name = "readings"
    query_max_len: int = field(default=256, metadata={"help": "Max query tokens (conversations are cut on the left)."})
    passage_max_len: int = field(default=1024, metadata={
        "help": "Max passage tokens (cut on the right; capped at the model's position table)."})
    passage_window: int | None = field(default=None, metadata={"metavar": "W", "help": (
        "Also score every passage longer than W tokens as the best of its consecutive W-token windows covering "
        "the whole passage, each embedded on its own (MaxP): the chunking baseline of long documents.")})
    late_chunking: bool = field(default=False, metadata={"help": (
        "With --passage_window: also score every passage as the best of the same W-token windows, "
        "each the mean of its token states from ONE pass over the whole passage (late chunking, Guenther et al. "
        "2024): chunk-sized vectors that read the whole passage's context. Rows late@W.")})
    truncate_dim: list[int] | None = field(default=None, metadata={"metavar": "D", "help": (
        "Also score each dense model on the first D coordinates of its vectors, re-normalised (a Matryoshka "
        "model's prefixes; efficient_train.py --matryoshka_dims): a row NAME@dimD per D, from the same encodings, "
        "compared like a model.")})
    # a list (argparse's nargs "*"): HfArgumentParser's list fields take nargs "+", which refuses the bare flag
    fuse_bm25: float | None = field(default=None, metadata={"nargs": "*", "metavar": "W", "help": (
        "Also rank with each model fused with BM25: each candidate scored (1 - W) * z(cosine) + W * z(BM25), "
        "z-scored per query over a document's chunks (ChatRAG) or over the union of both rankers' top 100 (BEIR; a "
        "document one did not return takes its lowest returned score); a row NAME+bm25@W per weight, compared like a "
        f"model. Bare: W {DEFAULT_BM25_WEIGHT:g} (chosen on the Doc2Dial dev selection half, docs/evaluation.md).")})


@dataclass
class RunArguments:
    _argument_group_name = "running and output"
    batch_size: int | None = field(default=None, metadata={
        "help": "Texts encoded at once (default: 64 on GPU; 8 on CPU, where bigger batches only add padding)."})
    max_tokens_per_batch: int = field(default=DEFAULT_MAX_TOKENS, metadata={"help": (
        "Padded tokens per forward pass (texts x the longest); a longer text goes alone. The default holds two "
        "8192-token passages.")})
    precision: Literal["auto", "fp32", "bf16", "fp16"] = field(default="auto", metadata={"help": (
        "Encode in float32 or under bf16 / fp16 autocast. auto: on a GPU bf16 where it computes in bf16, else "
        "fp16; fp32 on CPU. On a CPU with AVX512-BF16 or AMX, bf16 is about 1.5x faster (embeddings move by "
        "~1e-3); on others it is slower.")})
    embedding_dtype: Literal["auto", "float32", "float16", "bfloat16"] = field(default="auto", metadata={"help": (
        "BEIR: how corpus embeddings are kept (scores are float32 either way). auto: float16 on GPU, float32 on "
        "CPU.")})
    faiss: bool = field(default=False, metadata={"help": (
        "BEIR: search with FAISS's exact flat index (needs faiss-cpu or faiss-gpu) instead of the built-in "
        "blocked search.")})
    corpus_embeddings: str | None = field(default=None, metadata={"metavar": "PATH", "help": (
        "BEIR: cache of the corpus embeddings (one model): written on the first run, reused when model, corpus "
        "and settings match, refused when they do not.")})
    run_file: str | None = field(default=None, metadata={"help": (
        "BEIR: also write each model's top 100 per query as a TREC run file (several models: -2, -3... before "
        "the extension for the second, third...; MaxP: .maxpW before it).")})
    device: str | None = field(default=None, metadata={"help": "cuda, cuda:1, cpu... (default: cuda if available)."})
    bootstrap_samples: int = field(default=10_000, metadata={
        "help": "Resamples of the paired bootstrap comparing each model with the first."})
    per_item: bool = field(default=False, metadata={
        "help": "Keep every item's metrics in the JSON (for paired comparisons made elsewhere)."})
    output_file: str | None = field(default=None, metadata={
        "help": "JSON results file (default: outputs/eval-<time>.json)."})


def validate(models: ModelArguments, sets: SetArguments, readings: ReadingArguments, run: RunArguments) -> None:
    """The flags checked against each other; raises :class:`UserError`. ``--fuse_bm25`` becomes a
    tuple of distinct weights (the bare flag: the default weight)."""
    if readings.late_chunking and not readings.passage_window:
        raise UserError("--late_chunking pools the token states over --passage_window W windows: give --passage_window")
    if readings.late_chunking and run.corpus_embeddings:
        raise UserError("--late_chunking embeds the corpus in one pass with its chunks; --corpus_embeddings caches "
                        "the whole documents only: give one of them")
    weights = readings.fuse_bm25
    readings.fuse_bm25 = tuple(dict.fromkeys(weights or [DEFAULT_BM25_WEIGHT])) if weights is not None else ()
    if any(not 0 < weight < 1 for weight in readings.fuse_bm25):
        raise UserError(f"--fuse_bm25 weights must lie strictly between 0 and 1, not {list(readings.fuse_bm25)}")
    if models.untrained_colbert_dim < 0:
        raise UserError(f"--untrained_colbert_dim must be >= 0, got {models.untrained_colbert_dim}")
    for value, name in ((readings.query_max_len, "query_max_len"), (readings.passage_max_len, "passage_max_len"),
                        (run.batch_size, "batch_size"), (sets.query_turns, "query_turns"),
                        (readings.passage_window, "passage_window"),
                        (min(readings.truncate_dim or [1]), "truncate_dim"), (run.max_tokens_per_batch, "max_tokens_per_batch"),
                        (run.bootstrap_samples, "bootstrap_samples")):
        if value is not None and value < 1:
            raise UserError(f"--{name} must be >= 1")
    if (models.query_encoder_path or models.passage_encoder_path) and (
            models.model_path or not (models.query_encoder_path and models.passage_encoder_path)):
        raise UserError("give either --model_path or both --query_encoder_path and --passage_encoder_path")
    if run.corpus_embeddings and len(models.model_path or ["default"]) > 1:
        raise UserError("--corpus_embeddings caches one model's corpus: evaluate one model with it")
    if sets.eval_dataset not in (*DATASETS, "all"):
        raise UserError(f"--eval_dataset must be one of {', '.join(DATASETS)} or all")


def load_sets(args: SetArguments) -> list:
    """The sets to evaluate on: the BEIR folder, else the ChatRAG-layout set(s)."""
    if args.beir:
        return [CorpusSet(args.beir, args.split, page_split=args.page_split)]
    names = DATASETS if args.eval_dataset == "all" else [args.eval_dataset]
    return [ChatRAGSet.load(args.data_folder, name, num_turns=args.query_turns, qrecc_answer_rule=args.qrecc_answer,
                            split_at_token=args.split_at_token, page_split=args.page_split) for name in names]


def dense_retriever(path: str | None, models: ModelArguments, readings: ReadingArguments, run: RunArguments):
    """A loaded model as a :class:`DenseRetriever`, and what the results record of it."""
    device = torch.device(run.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, tokenizer = load_retriever(path, models.query_encoder_path, models.passage_encoder_path, models.pooling,
                                      models.trust_remote_code, dtype=models.torch_dtype if models.torch_dtype == "auto"
                                      else getattr(torch, models.torch_dtype))
    model.to(device)
    prompts = prompts_for(model, models.query_prompt, models.passage_prompt)
    settings = encode_settings(model, query_max_len=readings.query_max_len, passage_max_len=readings.passage_max_len,
                               prompts=prompts, device=device, batch_size=run.batch_size,
                               max_tokens=run.max_tokens_per_batch, precision=run.precision,
                               embedding_dtype=run.embedding_dtype)
    logger.info("%s reads queries up to %d tokens and passages up to %d (its position table: %d)", path or "default",
                settings.query_max_len, settings.passage_max_len, token_positions(model.query_encoder))
    width = model.query_encoder.config.hidden_size
    if any(dim > width for dim in readings.truncate_dim or ()):
        raise UserError(f"--truncate_dim {max(readings.truncate_dim)} is wider than its {width}-dimensional vectors")
    single = [flag for flag, on in (("--late_chunking", readings.late_chunking), ("--truncate_dim", readings.truncate_dim),
                                    ("--faiss", run.faiss), ("--corpus_embeddings", run.corpus_embeddings)) if on]
    if model.projection is not None and single:
        raise UserError(f"{path} is a late-interaction model (one vector per token): {', '.join(single)} reads "
                        "one vector per text; leave it out")
    kind = DenseRetriever if model.projection is None else LateInteractionRetriever
    retriever = kind(model, tokenizer, settings, window=readings.passage_window, late_chunking=readings.late_chunking,
                     cache=run.corpus_embeddings, use_faiss=run.faiss)
    info = {"pooling": model.pooling if model.projection is None else f"MaxSim of {model.projection.out_features}-d "
            "token vectors", "prompts": prompts,
            "tokens_read": {"query": settings.query_max_len, "passage": settings.passage_max_len}}
    return retriever, info


def encode_settings(model, *, query_max_len: int, passage_max_len: int, prompts: dict[str, str], device: torch.device,
                    batch_size: int | None = None, max_tokens: int = DEFAULT_MAX_TOKENS, precision: str = "auto",
                    embedding_dtype: str = "auto") -> EncodeSettings:
    """How ``model`` reads (lengths capped at its position table; defaults as evaluate.py's flags),
    shared by evaluate.py and the evaluation during training, so that both score alike."""
    positions = token_positions(model.query_encoder)
    return EncodeSettings(
        query_max_len=min(query_max_len, positions), passage_max_len=min(passage_max_len, positions),
        batch_size=batch_size or (64 if device.type == "cuda" else 8), max_tokens=max_tokens,
        autocast=autocast_dtype(precision, device), embedding_dtype={
            "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}.get(
            embedding_dtype, torch.float16 if device.type == "cuda" else torch.float32),
        query_prompt=prompts["query"], passage_prompt=prompts["document"], device=device)


def untrained_late_interaction(retriever: DenseRetriever, dim: int) -> LateInteractionRetriever:
    """A single-vector retriever's model read through a new random ``dim``-d token projection
    (seed 0), sharing its encoders and settings: the untrained late-interaction baseline."""
    model = retriever.model
    with torch.random.fork_rng(devices=[]):  # the caller's random stream stays where it was
        torch.manual_seed(0)
        projection = torch.nn.Linear(model.query_encoder.config.hidden_size, dim, bias=False)
    late = DualEncoder(model.query_encoder, model.pooling, model.passage_encoder, model.prompts, model.paths,
                       projection=projection.to(next(model.parameters()).device))
    return LateInteractionRetriever(late, retriever.tokenizer, retriever.settings, window=retriever.window)
