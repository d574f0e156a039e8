"""The training rows' token ids, cached beside them: every query, positive, negative and known
positive tokenised once per (tokenizer, lengths, prompts), so that a step pads ids instead of
tokenising texts.

:func:`with_token_ids` writes ``tokens-<key>/ids.arrow`` inside a training-data cache entry
(:mod:`.training_set`), one row per row of ``rows.arrow``, with :func:`.tokenization.tokenize`
(the collator's own cut: queries keep their end and their dataset's prompt, passages their start),
and returns the rows with four more columns: ``query_ids``, ``positives_ids``, ``negatives_ids`` and
``known_positives_ids`` (empty where the row's known positives are its own). The key hashes the
tokenizer's definition (a fast tokenizer's serialised pipeline), both lengths and every prompt: a
run with another tokenizer or length writes its own file, never reads stale ids. Written to a
staging file and renamed, under torchrun by the first process of each machine.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile

from . import UserError
from .tokenization import tokenize

logger = logging.getLogger(__name__)

FORMAT = 1  # bump when the columns' layout changes
COLUMNS = ("query_ids", "positives_ids", "negatives_ids", "known_positives_ids")


def tokenizer_fingerprint(tokenizer) -> str:
    """What decides a tokenizer's ids: a fast tokenizer's serialised pipeline (normaliser, model,
    added tokens, post-processor), else ``datasets``' content hash of the object."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return type(tokenizer).__name__ + ":" + hashlib.sha256(backend.to_str().encode("utf-8")).hexdigest()
    from datasets.fingerprint import Hasher

    return Hasher.hash(tokenizer)


def tokens_key(tokenizer, *, query_max_len: int, passage_max_len: int, query_prompts: tuple[str, ...],
               passage_prompt: str) -> str:
    key = json.dumps({"format": FORMAT, "tokenizer": tokenizer_fingerprint(tokenizer), "query_max_len": query_max_len,
                      "passage_max_len": passage_max_len, "query_prompts": list(query_prompts),
                      "passage_prompt": passage_prompt})
    return hashlib.blake2b(key.encode(), digest_size=12).hexdigest()


def _nested(lists: list[list[str]], tokenize_all) -> list[list[list[int]]]:
    """``tokenize_all`` over every text of ``lists`` at once, regrouped as ``lists``."""
    texts = [text for texts in lists for text in texts]
    ids = tokenize_all(texts) if texts else []  # a tokenizer refuses an empty batch
    grouped, start = [], 0
    for texts in lists:
        grouped.append(ids[start : start + len(texts)])
        start += len(texts)
    return grouped


def _row_batches(folder: str):
    """(row count, batches): every row of the entry's ``rows.arrow`` with its ``known_positives``,
    as dicts of columns (query, dataset, positives, negatives, known_positives), read as streams
    rather than mapped, so that one pass over a large file does not hold its pages."""
    import pyarrow as pa

    with pa.OSFile(os.path.join(folder, "known.arrow")) as handle:
        known = pa.ipc.open_stream(handle).read_all().column("known_positives")  # (N,) mostly empty: small

    def batches():
        start = 0
        with pa.OSFile(os.path.join(folder, "rows.arrow")) as handle:
            for batch in pa.ipc.open_stream(handle):
                columns = {name: batch.column(name).to_pylist() for name in ("query", "dataset", "positives", "negatives")}
                columns["known_positives"] = known.slice(start, batch.num_rows).to_pylist()
                start += batch.num_rows
                yield columns

    return len(known), batches()


def _write(rows: tuple[int, object], target: str, tokenizer, *, query_max_len: int, passage_max_len: int,
           query_prompts: tuple[str, ...], passage_prompt: str) -> None:
    """The four id columns of ``rows`` (:func:`_row_batches`) into ``target`` (Arrow IPC stream)."""
    import pyarrow as pa
    from tqdm.auto import tqdm

    ints = pa.list_(pa.int32())
    schema = pa.schema(list(zip(COLUMNS, (ints, pa.list_(ints), pa.list_(ints), pa.list_(ints)))))

    def passages(texts):
        return tokenize(tokenizer, texts, passage_max_len, "right", passage_prompt)

    with pa.OSFile(target, "wb") as sink, pa.ipc.new_stream(sink, schema) as writer, \
            tqdm(total=rows[0], desc="tokenising the training data", unit="rows", mininterval=10) as bar:
        for batch in rows[1]:
            queries: list[list[int]] = [[] for _ in batch["query"]]
            for dataset in sorted(set(batch["dataset"])):  # one prompt at a time
                mine = [i for i, d in enumerate(batch["dataset"]) if d == dataset]
                for i, ids in zip(mine, tokenize(tokenizer, [batch["query"][i] for i in mine], query_max_len, "left",
                                                 query_prompts[dataset])):
                    queries[i] = ids
            columns = [queries, _nested(batch["positives"], passages), _nested(batch["negatives"], passages),
                       _nested(batch["known_positives"], passages)]
            writer.write_batch(pa.record_batch([pa.array(c, type=f.type) for c, f in zip(columns, schema)],
                                               schema=schema))
            bar.update(len(queries))


def _write_corpus(folder: str, count: int, target: str, tokenizer, *, passage_max_len: int,
                  passage_prompt: str) -> None:
    """``input_ids`` of each of the ``count`` documents of the entry's ``corpus.arrow`` (cut as
    passages, read as a stream) into ``target`` (Arrow IPC stream)."""
    import pyarrow as pa
    from tqdm.auto import tqdm

    schema = pa.schema([("input_ids", pa.list_(pa.int32()))])
    with pa.OSFile(target, "wb") as sink, pa.ipc.new_stream(sink, schema) as writer, \
            pa.OSFile(os.path.join(folder, "corpus.arrow")) as source, \
            tqdm(total=count, desc="tokenising the corpus", unit="documents", mininterval=10) as bar:
        for batch in pa.ipc.open_stream(source):
            ids = tokenize(tokenizer, batch.column("text").to_pylist(), passage_max_len, "right", passage_prompt)
            writer.write_batch(pa.record_batch([pa.array(ids, type=schema.field(0).type)], schema=schema))
            bar.update(len(ids))


def with_token_ids(data, tokenizer, *, query_max_len: int, passage_max_len: int, query_prompts: tuple[str, ...],
                   passage_prompt: str, training_args=None):
    """``data`` (a :class:`.training_set.TrainingSet`) with its rows' token ids (:data:`COLUMNS`),
    tokenised into its cache entry first when absent. ``query_prompts``: each dataset's."""
    from .training_set import load_corpus, load_rows

    settings = dict(query_max_len=query_max_len, passage_max_len=passage_max_len, query_prompts=query_prompts,
                    passage_prompt=passage_prompt)
    folder = os.path.join(data.folder, "tokens-" + tokens_key(tokenizer, **settings))
    target, corpus_target = os.path.join(folder, "ids.arrow"), os.path.join(folder, "corpus_ids.arrow")
    first = training_args.main_process_first(desc="the token ids") if training_args is not None else None
    with first or contextlib.nullcontext():
        if os.path.isfile(target):
            logger.info("token ids read from %s", folder)
        else:
            os.makedirs(folder, exist_ok=True)
            handle, staging = tempfile.mkstemp(prefix=".ids-", dir=folder)
            os.close(handle)
            try:
                if data.corpus is not None:  # before the rows' file, whose presence marks the folder complete
                    _write_corpus(data.folder, len(data.corpus), staging, tokenizer, passage_max_len=passage_max_len,
                                  passage_prompt=passage_prompt)
                    os.replace(staging, corpus_target)
                _write(_row_batches(data.folder), staging, tokenizer, **settings)
                os.replace(staging, target)
            except OSError as err:  # a full disk, most likely
                raise UserError(f"the training data cache {data.folder}: cannot write the token ids "
                                f"({err.strerror or err}); free space there or give another --data_cache_dir") from err
            finally:
                if os.path.exists(staging):
                    os.remove(staging)
    data.rows = load_rows(data.folder, extra=[target])
    if data.corpus is not None:
        data.corpus = load_corpus(data.folder, extra=[corpus_target])
    return data
