"""The training set on disk: records read once into a memory-mapped Arrow file, so data larger than
memory trains, and a second run on the same files starts at once.

:func:`training_set` streams the records of every ``--train_data`` path (:func:`.records.parse_record`:
the same formats and checks as :func:`.records.load_examples`) into ``<cache>/<key>/rows.arrow``,
a few thousand rows at a time, then finds exact duplicates and each repeated query's positives from
64-bit hashes (numpy arrays, not a dict of every text); those positives are a column of their own
(``known.arrow``), mapped beside the rows. The key is a hash of each file's path, size and
modification time, the query turns kept, whether teacher scores are read, and this module's format:
a changed file makes a new entry, never a stale read. An entry is written to a temporary
folder and renamed into place, so a crash leaves no half entry. Under torchrun the first process of
each machine builds it while the others wait (``main_process_first``), then every process maps the
same file. The rows have :func:`.collator.make_dataset`'s columns.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import UserError
from .readers import iter_corpus, iter_records
from .records import parse_record

logger = logging.getLogger(__name__)

FORMAT = 3  # bump when the rows' layout changes: older entries are then never read
CHUNK = 4096  # rows per Arrow record batch written


def default_cache_dir() -> str:
    return os.path.join(os.environ.get("LONGCONTRAST_CACHE", os.path.join(Path.home(), ".cache", "longcontrast")),
                        "training_data")


@dataclass
class TrainingSet:
    """The rows (a ``datasets.Dataset`` mapped from disk, duplicates left out) and what the run needs
    to know of them without reading them all."""

    rows: object
    sizes: list[int]  # examples per dataset (per --train_data path), duplicates left out
    max_known_positives: int  # the most positives a query has anywhere in the data
    span_rows: list[int]  # the rows with a positive_span or negative_spans (checked against the tokenizer)
    folder: str  # the cache entry
    corpus: object = None  # the documents that rows name by id (positive_rows, negative_rows), or None

    def __len__(self) -> int:
        return len(self.rows)


def _schema(scores: bool):
    import pyarrow as pa

    strings, ints, floats = pa.list_(pa.string()), pa.list_(pa.int64()), pa.list_(pa.float64())
    fields = [("query", pa.string()), ("positive", pa.string()), ("positives", strings), ("negatives", strings),
              ("length", pa.int64()), ("dataset", pa.int64()), ("positive_span", ints),
              ("negative_spans", pa.list_(ints)), ("where", pa.string()),
              ("positive_rows", ints), ("negative_rows", ints)]  # records naming passages by id: corpus rows
    if scores:
        fields += [("positive_scores", floats), ("negative_scores", floats)]
    return pa.schema(fields)


def _hash(*parts) -> int:
    data = json.dumps(parts, ensure_ascii=False).encode("utf-8")
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little", signed=True)


def _files(path: str) -> list[Path]:
    path = Path(path)
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]


def cache_key(paths: list[str], *, num_turns: int, scores: bool, corpora: list[str | None] = ()) -> str:
    """A hash of every file's path, size and modification time (records and corpora), and the reading settings."""
    stats = []
    for path in [*paths, *filter(None, corpora)]:
        for file in _files(path):
            try:
                stat = file.stat()
            except OSError as err:
                raise UserError(f"{file}: cannot read ({err.strerror or err})") from err
            stats.append([str(file.resolve()), stat.st_size, stat.st_mtime_ns])
    key = json.dumps({"format": FORMAT, "paths": [str(Path(p).resolve()) for p in paths], "files": stats,
                      "num_turns": num_turns, "scores": scores,
                      "corpora": [c and str(Path(c).resolve()) for c in corpora]})
    return hashlib.blake2b(key.encode(), digest_size=12).hexdigest()


class _Corpora:
    """The corpora that records name passages from by id (tevatron's layout), each read once into
    ``corpus.arrow`` (one ``text`` a row), its ids kept as sorted 64-bit hashes (numpy, no dict of ids)."""

    def __init__(self, target: str):
        self.target, self.sink, self.writer, self.count = target, None, None, 0
        # path -> (sorted id hashes, their rows, characters of each of its documents' text, its first row)
        self.read: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, int]] = {}

    def rows(self, path: str, ids: list[str], where: str) -> list[int]:
        """The corpus rows of ``ids`` in the corpus at ``path`` (read first when new)."""
        if path not in self.read:
            self._read(path)
        hashes, rows = self.read[path][:2]
        wanted = np.array([_hash(i) for i in ids], dtype=np.int64)
        found = np.minimum(np.searchsorted(hashes, wanted), len(hashes) - 1)
        missing = [i for i, ok in zip(ids, hashes[found] == wanted) if not ok]
        if missing:
            raise UserError(f"{where}: document id {missing[0]!r} is not in the corpus {path}")
        return rows[found].tolist()

    def _read(self, path: str) -> None:
        import pyarrow as pa

        if self.writer is None:
            schema = pa.schema([("text", pa.string())])
            self.sink = pa.OSFile(self.target, "wb")
            self.writer = pa.ipc.new_stream(self.sink, schema)
        hashes, texts, lengths, first = [], [], [], self.count
        for where, docid, text in iter_corpus(path):
            hashes.append(_hash(docid))
            texts.append(text)
            lengths.append(len(text))
            if len(texts) >= CHUNK:
                self._flush(texts)
        self._flush(texts)
        hashes = np.array(hashes, dtype=np.int64)
        order = np.argsort(hashes, kind="stable")
        repeated = np.nonzero(np.diff(hashes[order]) == 0)[0]
        if len(repeated):
            raise UserError(f"{path}: document {int(order[repeated[0] + 1]) + 1} repeats the id of document "
                            f"{int(order[repeated[0]]) + 1}; ids must be unique")
        self.read[path] = (hashes[order], order + first, np.array(lengths, dtype=np.int64), first)
        logger.info("read %d documents from %s", len(hashes), path)

    def _flush(self, texts: list[str]) -> None:
        import pyarrow as pa

        if texts:
            self.writer.write_batch(pa.record_batch([pa.array(texts, type=pa.string())], names=["text"]))
            self.count += len(texts)
            texts.clear()

    def length(self, path: str, row: int) -> int:
        """Characters of the text of ``row`` (a row of the corpus at ``path``)."""
        _, _, lengths, first = self.read[path]
        return int(lengths[row - first])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.sink.close()


def _write_rows(paths: list[str], corpora: list[str | None], target: str, *, num_turns: int,
                scores: bool) -> dict[str, np.ndarray]:
    """Every record into ``target`` (Arrow IPC stream), the documents its records name by id into
    ``corpus.arrow`` beside it; returns per row its key hash, query hash and dataset."""
    import pyarrow as pa

    schema = _schema(scores)
    keys, queries, datasets = [], [], []
    columns = {name: [] for name in schema.names}

    def flush(writer):
        if columns["query"]:
            writer.write_batch(pa.record_batch([pa.array(columns[n], type=schema.field(n).type) for n in schema.names],
                                               schema=schema))
            for values in columns.values():
                values.clear()

    corpus = _Corpora(os.path.join(os.path.dirname(target), "corpus.arrow"))
    with pa.OSFile(target, "wb") as sink, pa.ipc.new_stream(sink, schema) as writer, contextlib.closing(corpus):
        for dataset, (path, corpus_path) in enumerate(zip(paths, corpora)):
            count = len(keys)
            for where, record in iter_records(path):
                e = parse_record(record, where, num_turns, require_scores=scores, corpus=corpus_path is not None)
                spans = [list(s or ()) for s in (e.negative_spans or [])]
                row = {"query": e.query, "positive": e.positive, "positives": e.positives, "negatives": e.negatives,
                       "length": len(e.query) + len(e.positive), "dataset": dataset,
                       "positive_span": list(e.positive_span or ()), "negative_spans": spans, "where": where,
                       "positive_rows": [], "negative_rows": []}
                if e.positive_ids is not None:  # texts looked up in the corpus when a batch is made
                    row.update(positives=[], positive_rows=corpus.rows(corpus_path, e.positive_ids, where),
                               negative_rows=corpus.rows(corpus_path, e.negative_ids, where))
                    row["length"] += corpus.length(corpus_path, row["positive_rows"][0])
                keys.append(_hash(e.query, e.positives, e.negatives, e.positive_span, spans, row["positive_rows"],
                                  row["negative_rows"]))
                queries.append(_hash(e.query))
                datasets.append(dataset)
                if scores:
                    row.update(positive_scores=e.positive_scores, negative_scores=e.negative_scores)
                for name, value in row.items():
                    columns[name].append(value)
                if len(columns["query"]) >= CHUNK:
                    flush(writer)
            logger.info("read %d records from %s", len(keys) - count, path)
        flush(writer)
    return {"key": np.array(keys, dtype=np.int64), "query": np.array(queries, dtype=np.int64),
            "dataset": np.array(datasets, dtype=np.int64)}


def _build(paths: list[str], corpora: list[str | None], folder: str, *, num_turns: int, scores: bool) -> None:
    """Write a cache entry: the rows, the rows kept (first occurrences), the known positives of
    repeated queries, the summary."""
    import datasets as hf

    staging = tempfile.mkdtemp(prefix=".building-", dir=os.path.dirname(folder))
    try:
        hashes = _write_rows(paths, corpora, os.path.join(staging, "rows.arrow"), num_turns=num_turns, scores=scores)
        if not len(hashes["key"]):
            raise UserError(f"the training data is empty: {', '.join(paths)}")
        distinct, first = np.unique(hashes["key"], return_index=True)
        keep = np.sort(first)  # (K,) each distinct example's first row
        rows = hf.Dataset.from_file(os.path.join(staging, "rows.arrow"))
        if len(keep) < len(hashes["key"]):
            dropped = np.setdiff1d(np.arange(len(hashes["key"])), keep)
            twin = first[np.searchsorted(distinct, hashes["key"][dropped[0]])]
            logger.warning("dropped %d exact duplicate examples (the first: %s repeats %s)", len(dropped),
                           rows[int(dropped[0])]["where"], rows[int(twin)]["where"])
        # a query asked in several kept rows knows the positives of all of them (never its negatives)
        _, inverse, counts = np.unique(hashes["query"][keep], return_inverse=True, return_counts=True)
        repeated = keep[counts[inverse] > 1].tolist()  # usually few rows
        union: dict[str, list[str]] = {}
        picked = rows.select(repeated).select_columns(["query", "positives", "positive_rows"]) if repeated else []
        corpus = load_corpus(staging)
        for row in picked:
            mine = union.setdefault(row["query"], [])
            texts = corpus[row["positive_rows"]]["text"] if row["positive_rows"] else row["positives"]
            mine.extend(p for p in texts if p not in mine)
        known = {index: union[row["query"]] for index, row in zip(repeated, picked)}
        _write_known(known, len(hashes["key"]), os.path.join(staging, "known.arrow"))
        spans = (_list_lengths(rows, "positive_span") + _list_lengths(rows, "negative_spans"))[keep] > 0  # (K,)
        np.save(os.path.join(staging, "keep.npy"), keep)
        summary = {"sizes": np.bincount(hashes["dataset"][keep], minlength=len(paths)).tolist(),
                   "max_known_positives": max([len(v) for v in known.values()]
                                              + [int(_list_lengths(rows, c)[keep].max())
                                                 for c in ("positives", "positive_rows")]),
                   "span_rows": np.nonzero(spans)[0].tolist(), "paths": paths}
        with open(os.path.join(staging, "summary.json"), "w") as handle:
            json.dump(summary, handle)
        try:
            os.replace(staging, folder)
        except OSError:
            if not os.path.isdir(folder):
                raise
            shutil.rmtree(staging, ignore_errors=True)  # another run built the same entry meanwhile: the same rows
    except BaseException as err:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(err, OSError):  # a full disk, most likely: the entry is written beside the records' size
            raise UserError(f"the training data cache {os.path.dirname(folder)}: cannot write ({err.strerror or err}); "
                            "free space there or give another --data_cache_dir") from err
        raise


def _write_known(known: dict[int, list[str]], count: int, target: str) -> None:
    """The ``known_positives`` column of all ``count`` rows (Arrow IPC stream): ``known[row]``, else empty."""
    import pyarrow as pa

    lengths = np.zeros(count + 1, dtype=np.int32)
    for index, texts in known.items():
        lengths[index + 1] = len(texts)
    values = pa.array([t for index in sorted(known) for t in known[index]], type=pa.string())
    column = pa.ListArray.from_arrays(pa.array(np.cumsum(lengths, dtype=np.int32)), values)  # (N,) mostly empty
    table = pa.table({"known_positives": column})
    with pa.OSFile(target, "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=CHUNK * 16)


def _list_lengths(rows, column: str) -> np.ndarray:
    """(N,) the length of each row's list in ``column``."""
    import pyarrow.compute as pc

    return pc.list_value_length(rows.data.column(column)).to_numpy(zero_copy_only=False)


def load_rows(folder: str, *, extra: list[str] = ()):
    """The entry's rows without duplicates, with ``known_positives`` (a
    repeated query's positives everywhere it is asked; empty elsewhere: the row's own) and the
    columns of the ``extra`` files (one row per row of ``rows.arrow``: :mod:`.token_ids`). Every file
    stays memory-mapped: a ``datasets.Dataset`` made from an in-memory table would be hashed whole
    for its fingerprint (several copies of the data in memory)."""
    import datasets as hf

    rows = hf.concatenate_datasets([hf.Dataset.from_file(os.path.join(folder, name))
                                    for name in ("rows.arrow", "known.arrow", *extra)], axis=1)
    return rows.select(np.load(os.path.join(folder, "keep.npy")))


def load_corpus(folder: str, *, extra: list[str] = ()):
    """The entry's corpus (``text``, and the columns of the ``extra`` files), or None when no record
    names its passages by id."""
    import datasets as hf

    if not os.path.isfile(os.path.join(folder, "corpus.arrow")):
        return None
    return hf.concatenate_datasets([hf.Dataset.from_file(os.path.join(folder, name))
                                    for name in ("corpus.arrow", *extra)], axis=1)


def training_set(paths: list[str], *, num_turns: int, scores: bool, corpora: list[str | None] | None = None,
                 cache_dir: str | None = None, training_args=None) -> TrainingSet:
    """The rows of ``paths`` from the cache, built first when absent (:func:`_build`); with
    ``training_args`` the first process of each machine builds while the others wait."""
    cache_dir = cache_dir or default_cache_dir()
    try:
        os.makedirs(cache_dir, exist_ok=True)
    except OSError as err:
        raise UserError(f"the training data cache {cache_dir}: cannot create it ({err.strerror or err}); "
                        "give another --data_cache_dir") from err
    corpora = corpora or [None] * len(paths)
    folder = os.path.join(cache_dir, cache_key(paths, num_turns=num_turns, scores=scores, corpora=corpora))
    first = training_args.main_process_first(desc="the training data cache") if training_args is not None else None
    with first or contextlib.nullcontext():
        if os.path.isdir(folder):
            logger.info("training data read from its cache %s", folder)
        else:
            logger.info("reading the training data into %s (once: later runs on the same files map it)", folder)
            _build(paths, corpora, folder, num_turns=num_turns, scores=scores)
    with open(os.path.join(folder, "summary.json")) as handle:
        summary = json.load(handle)
    return TrainingSet(load_rows(folder), summary["sizes"], summary["max_known_positives"], summary["span_rows"], folder,
                       load_corpus(folder))
