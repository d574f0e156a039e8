"""Top-k retrieval evaluation on ChatRAG-Bench conversational sets (Doc2Dial, QuAC, QReCC).

Protocol: each item ranks the chunks of its own document; the query is the last ``num_turns``
turns written as ``user: ...`` / ``agent: ...`` lines (:func:`longcontrast.data.format_query`),
truncated from the left; similarity is the cosine of the pooled, L2-normalised embeddings. The gold
chunk's rank is 1 + the number of chunks of the document scoring strictly higher (ties count in the
gold's favour, deterministically). Metrics: Recall@1/5/20, MRR@20 and NDCG@20 (one relevant chunk).
"""

from __future__ import annotations

import json
import logging
import math
import os
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import UserError
from .data import format_query, length_sorted_groups, pad, tokenize, unique_sequences
from .modeling import DualEncoder, default_model_path, from_pretrained, load_tokenizer, read_pooling, read_prompts

logger = logging.getLogger(__name__)

DATASETS = ("doc2dial", "quac", "qrecc")
METRICS = ("recall@1", "recall@5", "recall@20", "mrr@20", "ndcg@20")


@dataclass
class Item:
    id: str
    query: str
    document: str
    gold_index: int
    answers: list[str]
    gold_start_token: int | None = None  # where the answer starts in the gold text (long-document sets)


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
        items.append(Item(item_id, format_query(messages, num_turns), document, gold, [str(a) for a in answers], start))
    if not items:
        raise UserError(f"{folder / 'test.json'}: the evaluation set is empty")
    return items, documents


def read_json(path: Path):
    """A JSON file's content; a missing, unreadable or malformed file raises :class:`UserError` naming it."""
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError as err:
        raise UserError(f"{path}: not found") from err
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: malformed JSON at line {err.lineno} ({err.msg})") from err
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: cannot read ({err})") from err


def gold_rank(scores: torch.Tensor, gold_index: int, gold_score: torch.Tensor | None = None) -> int:
    """1 + the number of candidates scoring strictly higher than the gold one.

    ``scores``: (C,) the query's scores against its document's chunks. ``gold_score`` replaces
    the gold chunk's own score when the gold was encoded differently (QReCC's answer rule).
    """
    if gold_score is None:
        gold_score = scores[gold_index]
    higher = scores > gold_score  # (C,)
    higher[gold_index] = False
    return 1 + int(higher.sum())


def retrieval_metrics(ranks: list[int]) -> dict[str, float]:
    """Recall@1/5/20, MRR@20 and NDCG@20 in percent, from the gold ranks (1-based)."""
    n = len(ranks)
    return {
        "recall@1": 100 * sum(r <= 1 for r in ranks) / n,
        "recall@5": 100 * sum(r <= 5 for r in ranks) / n,
        "recall@20": 100 * sum(r <= 20 for r in ranks) / n,
        "mrr@20": 100 * sum(1 / r for r in ranks if r <= 20) / n,
        "ndcg@20": 100 * sum(1 / math.log2(r + 1) for r in ranks if r <= 20) / n,
    }


def load_retriever(model_path=None, query_encoder_path=None, context_encoder_path=None, pooling=None,
                   trust_remote_code=False):
    """A :class:`DualEncoder` and tokenizer for evaluation.

    ``model_path``: a folder saved by training (with or without ``query_encoder/`` and
    ``context_encoder/``) or any encoder; ``None``: the embedded default. Or separate
    ``query_encoder_path`` and ``context_encoder_path``. Pooling: the one recorded in the query
    encoder's sentence-transformers config, else ``pooling``, else ``cls``. The recorded prompts
    (``"query"`` of the query encoder, ``"document"`` of the context encoder) land in ``.prompts``.
    """
    if query_encoder_path or context_encoder_path:
        if model_path or not (query_encoder_path and context_encoder_path):
            raise UserError("give either --model_path or both --query_encoder_path and --context_encoder_path")
    else:
        model_path = model_path or default_model_path()
        if not Path(model_path).exists() and os.sep in str(model_path):
            raise UserError(f"model folder not found: {model_path}")
        split = Path(model_path) / "query_encoder"
        if split.is_dir() and (Path(model_path) / "context_encoder").is_dir():
            query_encoder_path, context_encoder_path = str(split), str(Path(model_path) / "context_encoder")
        else:
            query_encoder_path = context_encoder_path = str(model_path)

    def load(path):
        return from_pretrained(path, trust_remote_code=trust_remote_code).eval()

    query_encoder = load(query_encoder_path)
    context_encoder = load(context_encoder_path) if context_encoder_path != query_encoder_path else None
    recorded = read_pooling(query_encoder_path)
    if recorded and pooling and recorded != pooling:
        logger.warning("%s records %s pooling; using it instead of --pooling %s", query_encoder_path, recorded, pooling)
    prompts = {"query": read_prompts(query_encoder_path).get("query", ""),
               "document": read_prompts(context_encoder_path).get("document", "")}
    model = DualEncoder(query_encoder, recorded or pooling or "cls", context_encoder, prompts)
    return model, load_tokenizer(query_encoder_path, trust_remote_code)


def prompts_for(model: DualEncoder, query_instruction: str | None, passage_instruction: str | None) -> dict[str, str]:
    """The query and passage ("document") prompts to encode with: the given instructions, else the
    ones the model records, else none."""
    given = {"query": query_instruction, "document": passage_instruction}
    return {side: model.prompts.get(side, "") if prompt is None else prompt for side, prompt in given.items()}


def encode(model: DualEncoder, token_ids: list[list[int]], side: str, batch_size: int, pad_token_id: int,
           device: torch.device, desc: str = "encoding", bf16: bool = False) -> torch.Tensor:
    """(N, D) float32 embeddings of token id lists, encoded in batches of similar length.

    Each distinct token sequence is encoded once and its vector returned for every copy: a text
    repeated in a document then scores exactly as its copies do, whatever the padding of the batch
    it would have landed in (padding moves float32 results by ~1e-7, enough to break a tie against
    the gold). Texts are sorted by length (longest first, so memory peaks at once) and each batch is
    padded to its own longest; ``bf16``: under bf16 autocast. Rows come back in input order.
    """
    unique, copy_of = unique_sequences(token_ids)
    embeddings = [None] * len(unique)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    with torch.inference_mode(), autocast:
        # padded one batch at a time: a whole corpus padded at once would not fit on the device;
        # the bar shows on a terminal only (disable=None), not in logs
        for rows in tqdm(length_sorted_groups(unique, batch_size, None), desc=desc, leave=False, unit="batch",
                         disable=None):
            batch = pad([unique[i] for i in rows], pad_token_id, device)
            for row, embedding in zip(rows, model(**batch, side=side).float().cpu()):
                embeddings[row] = embedding
    return torch.stack(embeddings)[torch.tensor(copy_of, dtype=torch.long)]  # (N, D)


def uses_bf16(precision: str, device: torch.device) -> bool:
    """``precision`` is "fp32", "bf16" or "auto" (bf16 on GPU, where it is fast and standard)."""
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


@dataclass
class EvalConfig:
    query_max_len: int = 256
    passage_max_len: int = 1024
    batch_size: int = 64
    num_turns: int = 5
    qrecc_answer_rule: bool = True
    bf16: bool = False  # encode under bf16 autocast
    query_prompt: str = ""  # prefixed to every query (a model's recorded "query" prompt)
    passage_prompt: str = ""  # prefixed to every chunk (its "document" prompt)
    split_at_token: int = 512  # items with gold_start_token are also scored apart, before and from here


def evaluate_dataset(model, tokenizer, data_folder: str, dataset: str, config: EvalConfig, device) -> dict:
    """Metrics of one dataset: each chunk is encoded once, queries once, then ranked per document."""
    items, documents = load_chatrag(data_folder, dataset, config.num_turns)
    names = sorted({item.document for item in items})
    offsets, chunks = {}, []
    for name in names:
        offsets[name] = len(chunks)
        chunks.extend(documents[name])
    pad_id = tokenizer.pad_token_id
    chunk_ids = tokenize(tokenizer, chunks, config.passage_max_len, "right", config.passage_prompt)
    query_ids = tokenize(tokenizer, [item.query for item in items], config.query_max_len, "left", config.query_prompt)
    batching = config.batch_size, pad_id, device
    chunk_embeddings = encode(model, chunk_ids, "passage", *batching, f"{dataset} chunks", config.bf16)
    query_embeddings = encode(model, query_ids, "query", *batching, f"{dataset} queries", config.bf16)
    gold_embeddings = None
    if dataset == "qrecc" and config.qrecc_answer_rule:
        # ChatRAG's QReCC gold labels come from word overlap with the answer; its evaluation appends
        # the first answer to the gold chunk before encoding, and so does this one.
        gold_texts = [
            documents[item.document][item.gold_index] + (" || " + item.answers[0] if item.answers else "")
            for item in items
        ]
        gold_ids = tokenize(tokenizer, gold_texts, config.passage_max_len, "right", config.passage_prompt)
        gold_embeddings = encode(model, gold_ids, "passage", *batching, "qrecc gold+answer", config.bf16)
    ranks = []
    for index, item in enumerate(items):
        start = offsets[item.document]
        candidates = chunk_embeddings[start : start + len(documents[item.document])]  # (C, D)
        scores = candidates @ query_embeddings[index]  # (C,)
        gold_score = None if gold_embeddings is None else gold_embeddings[index] @ query_embeddings[index]
        ranks.append(gold_rank(scores, item.gold_index, gold_score))
    results = {"num_items": len(items), **retrieval_metrics(ranks)}
    if any(item.gold_start_token is not None for item in items):
        # Long documents: is the answer found where a 512-token reader never looks?
        cut = config.split_at_token
        for name, keep in ((f"gold_start<{cut}", lambda t: t < cut), (f"gold_start>={cut}", lambda t: t >= cut)):
            part = [rank for item, rank in zip(items, ranks) if item.gold_start_token is not None and keep(item.gold_start_token)]
            if part:
                results[name] = {"num_items": len(part), **retrieval_metrics(part)}
    return results


def average(results: dict[str, dict]) -> dict[str, float]:
    """The unweighted mean over datasets of each metric (the ChatRAG table's Average column)."""
    return {metric: sum(r[metric] for r in results.values()) / len(results) for metric in METRICS}


def format_table(rows: dict[str, dict[str, dict]]) -> str:
    """A Markdown table: one row per model; Average then each dataset; metrics in percent. A
    dataset scored by answer position adds a row per part (``model [doc2dial gold_start>=512]``)."""
    split = {}
    for model, results in rows.items():
        for dataset in DATASETS:
            for part, metrics in (results.get(dataset) or {}).items():
                if isinstance(metrics, dict):
                    split[f"{model} [{dataset} {part}, {metrics['num_items']} items]"] = {dataset: metrics}
    rows = {**rows, **split}
    datasets = [d for d in ("average", *DATASETS) if any(d in r for r in rows.values())]
    titles = {"average": "Average", "doc2dial": "Doc2Dial", "quac": "QuAC", "qrecc": "QReCC"}
    short = ["R@1", "R@5", "R@20", "MRR@20", "NDCG@20"]
    header = "| model | " + " | ".join(f"{titles[d]} {s}" for d in datasets for s in short) + " |"
    lines = [header, "|" + "---|" * (1 + len(datasets) * len(short))]
    for model, results in rows.items():
        cells = [f"{results[d][m]:.2f}" if d in results else "-" for d in datasets for m in METRICS]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
