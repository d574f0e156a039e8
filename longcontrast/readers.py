"""Readers: every file the package reads. One JSON-lines reader; JSON, Parquet and
``datasets.save_to_disk`` folders of training records; BEIR folders (``corpus.jsonl``,
``queries.jsonl``, ``qrels/<split>.tsv``); corpus files. Each problem raises :class:`UserError`
naming the file and line.

The bottom layer with :mod:`.tokenization`: it imports nothing from the package but :class:`UserError`.
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from . import UserError

logger = logging.getLogger(__name__)

DATA_SUFFIXES = (".jsonl", ".json", ".parquet")


def join_title(title, text) -> str:
    """BEIR's and tevatron's passage: ``title + " " + text``, stripped (the text alone without a title)."""
    return f"{title or ''} {text or ''}".strip()


def iter_jsonl(path: Path):
    """``(where, record)`` of each non-blank line of a JSON-lines file, ``where`` being ``file:line``.

    A byte-order mark on the first line is allowed; bytes that are not UTF-8, a malformed line (with
    a hint when it is a last line without a newline: a truncated file) or a missing file raise
    :class:`UserError`.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: not found")
    try:
        with open(path, "rb") as handle:
            for line_number, raw in enumerate(handle, start=1):
                where = f"{path}:{line_number}"
                try:
                    line = raw.decode("utf-8-sig" if line_number == 1 else "utf-8")
                except UnicodeDecodeError as err:
                    raise UserError(f"{where}: not valid UTF-8 text ({err.reason} at byte {err.start} of the line)") from err
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    hint = "" if raw.endswith(b"\n") else (
                        "; it is the last line and has no newline: the file looks truncated (was it fully written?)")
                    raise UserError(f"{where}: malformed JSON line ({err.msg}){hint}") from err
                yield where, record
    except OSError as err:
        raise UserError(f"{path}: cannot read ({err.strerror or err})") from err


def read_json(path: str | Path):
    """A JSON file's content; a missing, unreadable or malformed file raises :class:`UserError` naming it."""
    try:
        with open(path, encoding="utf-8-sig") as handle:
            return json.load(handle)
    except FileNotFoundError as err:
        raise UserError(f"{path}: not found") from err
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: malformed JSON at line {err.lineno} ({err.msg})") from err
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not valid UTF-8 text ({err.reason} at byte {err.start})") from err
    except OSError as err:
        raise UserError(f"{path}: cannot read ({err})") from err


def _iter_file_records(path: Path):
    """(where, record) pairs of one data file."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        yield from iter_jsonl(path)
    elif suffix == ".json":
        records = read_json(path)
        if isinstance(records, dict) and isinstance(records.get("data"), list):
            records = records["data"]
        if not isinstance(records, list):
            raise UserError(f"{path}: a .json data file must hold a list of records")
        for index, record in enumerate(records):
            yield f"{path}: record {index}", record
    elif suffix == ".parquet":
        import pyarrow
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except pyarrow.ArrowException as err:
            raise UserError(f"{path}: not a readable Parquet file ({err})") from err
        for index, record in enumerate(rows):
            yield f"{path}: row {index}", record
    else:
        raise UserError(f"{path}: unsupported data file type; use {', '.join(DATA_SUFFIXES)}")


def _is_saved_dataset(folder: Path) -> bool:
    return (folder / "dataset_info.json").is_file() or (folder / "dataset_dict.json").is_file()

def _iter_folder_records(folder: Path):
    if _is_saved_dataset(folder):
        import datasets

        dataset = datasets.load_from_disk(str(folder))
        if isinstance(dataset, datasets.DatasetDict):
            if "train" not in dataset:
                raise UserError(f"{folder}: a saved DatasetDict needs a 'train' split, found {list(dataset)}")
            dataset = dataset["train"]
        for index, record in enumerate(dataset):
            yield f"{folder}: row {index}", record
        return
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in DATA_SUFFIXES)
    if not files:
        raise UserError(f"{folder}: no data files ({', '.join(DATA_SUFFIXES)}) in this folder")
    for path in files:
        yield from _iter_file_records(path)

def is_beir_folder(folder: Path) -> bool:
    return all((folder / name).exists() for name in ("corpus.jsonl", "queries.jsonl", "qrels"))


def _iter_beir_records(folder: Path):
    """A BEIR folder's training split (``qrels/train.tsv``) as flagembedding records: one per query,
    every relevant document (score > 0) a positive, no negatives (mine them:
    ``data/mine_hard_negatives.py --input FOLDER``)."""
    data = load_beir(str(folder), "train")
    text_of = dict(zip(data.doc_ids, data.passages))
    for query_id, query in zip(data.query_ids, data.queries):
        positives = [text_of[doc] for doc, grade in data.qrels[query_id].items() if grade > 0]
        yield f"{folder}: query {query_id}", {"query": query, "pos": positives, "neg": []}


def iter_records(name: str):
    """(where, record) pairs of a data file or folder; ``where`` names the record in messages
    (``file:line``). A folder is a BEIR folder (its training split as flagembedding records), a
    ``datasets.save_to_disk`` folder, or holds data files, read in name order."""
    path = Path(name)
    if not path.exists():
        raise UserError(f"data not found: {name}")
    if path.is_dir():
        return _iter_beir_records(path) if is_beir_folder(path) else _iter_folder_records(path)
    return _iter_file_records(path)


def iter_corpus(name: str):
    """(where, document id, passage) of each document of a corpus that training records name by id:
    a data file or folder of ``{docid or _id, title, text}`` records (tevatron's corpora and BEIR's
    ``corpus.jsonl``), or a BEIR folder (its ``corpus.jsonl``). The passage is title and text joined."""
    path = Path(name)
    if not path.exists():
        raise UserError(f"corpus not found: {name}")
    if path.is_dir():
        records = iter_jsonl(path / "corpus.jsonl") if is_beir_folder(path) else _iter_folder_records(path)
    else:
        records = _iter_file_records(path)
    for where, record in records:
        key = next((k for k in ("docid", "_id") if isinstance(record, dict) and record.get(k) is not None), None)
        if key is None or not isinstance(record.get("text"), str):
            raise UserError(f"{where}: a corpus record needs 'docid' (or '_id') and 'text'")
        text = join_title(record.get("title"), record["text"])
        if not text:
            raise UserError(f"{where}: document {record[key]!r} has no text")
        yield where, str(record[key]), text


@dataclass
class BeirSet:
    """A BEIR folder as read: passages in corpus order, queries with a relevant document, their qrels."""

    doc_ids: list[str]
    passages: list[str]  # title + " " + text
    query_ids: list[str]
    queries: list[str]
    qrels: dict[str, dict[str, int]]  # {query id: {doc id: grade}}, queries with a relevant document only
    corpus_file: str


def _beir_records(path: Path, fields: tuple[str, ...]):
    """(where, record) of a BEIR JSON-lines file whose records need ``fields``."""
    for where, record in iter_jsonl(path):
        if not isinstance(record, dict) or any(f not in record for f in fields):
            raise UserError(f"{where}: a record needs {', '.join(repr(f) for f in fields)}")
        yield where, record


def load_beir(folder: str, split: str = "test") -> BeirSet:
    """Read a BEIR folder; every problem raises :class:`UserError` naming the file."""
    root = Path(folder)
    if not root.is_dir():
        raise UserError(f"BEIR folder not found: {folder}")
    doc_ids, passages, seen = [], [], set()
    for where, record in _beir_records(root / "corpus.jsonl", ("_id", "text")):
        doc_id = str(record["_id"])
        if doc_id in seen:
            raise UserError(f"{where}: document id {doc_id!r} repeats")
        seen.add(doc_id)
        doc_ids.append(doc_id)
        passages.append(join_title(record.get("title"), record["text"]))
    if not doc_ids:
        raise UserError(f"{root / 'corpus.jsonl'}: the corpus is empty")
    query_text = {str(r["_id"]): str(r["text"]) for _, r in _beir_records(root / "queries.jsonl", ("_id", "text"))}
    qrels_file = root / "qrels" / f"{split}.tsv"
    if not qrels_file.is_file():
        present = sorted(p.stem for p in (root / "qrels").glob("*.tsv")) if (root / "qrels").is_dir() else []
        raise UserError(f"{qrels_file}: not found (splits here: {', '.join(present) or 'none'}); choose one with --split")
    qrels: dict[str, dict[str, int]] = {}
    with open(qrels_file, encoding="utf-8", newline="") as handle:
        for number, row in enumerate(csv.reader(handle, delimiter="\t"), 1):
            if not row or (number == 1 and not row[-1].lstrip("-").isdigit()):
                continue  # the header line (query-id corpus-id score)
            if len(row) != 3:
                raise UserError(f"{qrels_file}:{number}: expected 'query-id<TAB>corpus-id<TAB>score', got {row!r}")
            query, doc, score = row
            try:
                grade = int(score)
            except ValueError as err:
                raise UserError(f"{qrels_file}:{number}: score {score!r} is not an integer") from err
            if query not in query_text:
                raise UserError(f"{qrels_file}:{number}: query {query!r} is not in queries.jsonl")
            if doc not in seen:
                raise UserError(f"{qrels_file}:{number}: document {doc!r} is not in corpus.jsonl")
            judged = qrels.setdefault(query, {})
            if judged.get(doc, grade) != grade:
                raise UserError(f"{qrels_file}:{number}: query {query!r} and document {doc!r} are judged twice, "
                                f"{judged[doc]} and {grade}")
            judged[doc] = grade
    judged_queries = len(qrels)
    qrels = {q: docs for q, docs in qrels.items() if any(g > 0 for g in docs.values())}
    if judged_queries > len(qrels):
        logger.warning("%s: %d of %d judged queries have no relevant document and are left out", qrels_file,
                       judged_queries - len(qrels), judged_queries)
    if not qrels:
        raise UserError(f"{qrels_file}: no query has a relevant document (score > 0)")
    query_ids = list(qrels)
    return BeirSet(doc_ids, passages, query_ids, [query_text[q] for q in query_ids], qrels, str(root / "corpus.jsonl"))


def read_corpus(path: str) -> dict[str, list[str]] | list[str]:
    """Candidate passages: a ChatRAG ``documents.json`` (``{document: [chunk, ...]}``), a JSON list
    of strings or of objects with ``text``, a ``.jsonl`` of such strings or objects, or a ``.txt``
    with one passage a line. Problems raise :class:`UserError` naming the file."""
    def text_of(value, where):
        if isinstance(value, dict) and isinstance(value.get("text"), str):
            value = join_title(value.get("title"), value["text"])  # BEIR's and tevatron's passage
        elif isinstance(value, dict):
            value = next((value[k] for k in ("passage", "contents") if k in value), None)
        if not isinstance(value, str) or not value.strip():
            raise UserError(f"{where}: a passage must be a non-empty string or an object with 'text', got {value!r:.80}")
        return value

    file = Path(path)
    if not file.is_file():
        raise UserError(f"corpus not found: {path}")
    if file.suffix == ".json":
        data = read_json(file)
        if isinstance(data, dict):
            return {str(name): [text_of(c, f"{path}: {name}[{i}]") for i, c in enumerate(chunks)]
                    for name, chunks in data.items()}
        if isinstance(data, list):
            return [text_of(value, f"{path}: item {i}") for i, value in enumerate(data)]
        raise UserError(f"{path}: expected a list of passages or an object of document -> chunks")
    if file.suffix not in (".jsonl", ".txt"):
        raise UserError(f"{path}: unsupported corpus file; use .json (documents.json or a list), .jsonl or .txt")
    if file.suffix == ".jsonl":
        return [text_of(value, where) for where, value in iter_jsonl(file)]
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: cannot read ({err})") from err
    return [line for line in lines if line.strip()]


def check_output(output: str, inputs: list[str], *, overwrite: bool) -> None:
    """A data script's ``--output`` file: refused when it exists (without ``overwrite``) or is one
    of its ``inputs`` (reading and writing one file would lose the data)."""
    path = Path(output)
    if path.exists() and not overwrite:
        raise UserError(f"--output {path} exists; choose another file or pass --overwrite")
    if any(Path(name).exists() and path.resolve() == Path(name).resolve() for name in inputs):
        raise UserError(f"--output {path} is one of the input files")
