"""The on-disk training set (longcontrast.training_set): the rows the in-memory reader gives, duplicates
and repeated queries found from hashes, the cache keyed by the files, errors that leave no entry."""

import json
import logging
import os

import pytest
import torch

from conftest import conversation_records, write_jsonl
from longcontrast import UserError
from longcontrast.collator import make_dataset, max_known_positives
from longcontrast.records import load_examples
from longcontrast.training_set import training_set

COLUMNS = ("query", "positive", "positives", "negatives", "length", "dataset", "positive_scores", "negative_scores")


def records():
    rows = conversation_records(6)
    rows[0]["positive_span"] = [4, 10]
    rows += [
        {"query": "how do I renew", "pos": ["renew online", "renew by mail"], "neg": ["parking"]},
        {"query": "how do I renew", "positive": "renew at the office", "negatives": ["a", "b"]},  # the query again
        {"anchor": "lost card", "positive": "call us", "negative_1": "x", "negative_2": "y"},
        {"query": "how do I renew", "positive": "renew at the office", "negatives": ["a", "b"]},  # a duplicate
    ]
    for row in rows:
        row.setdefault("positive_scores", [1.0] * len(row.get("pos", [0])))
        row.setdefault("negative_scores", [0.5] * len(row.get("neg") or row.get("negatives") or row.get(
            "hard_negatives") or ["x", "y"]))
    rows[-4]["pos_scores"], rows[-4]["neg_scores"] = rows[-4].pop("positive_scores"), rows[-4].pop("negative_scores")
    rows[-2]["scores"] = [1.0, 0.2, 0.1]
    del rows[-2]["positive_scores"], rows[-2]["negative_scores"]
    return rows


def test_the_rows_are_those_of_the_in_memory_reader(tmp_path, caplog):
    first = write_jsonl(tmp_path / "a.jsonl", records())
    second = write_jsonl(tmp_path / "b.jsonl", [dict(r, positive_scores=[2.0], negative_scores=[1.0])
                                                for r in conversation_records(3, negatives=1)])
    with caplog.at_level(logging.WARNING):
        data = training_set([first, second], num_turns=5, scores=True, cache_dir=str(tmp_path / "cache"))
    assert f"a.jsonl:10 repeats {first}:8" in caplog.text
    reference = list(make_dataset(load_examples([first, second], require_scores=True), teacher_scores=True))
    rows = list(data.rows)
    assert len(rows) == len(reference) == 12 and data.sizes == [9, 3]
    for row, expected in zip(rows, reference):
        assert {c: row[c] for c in COLUMNS} == {c: expected[c] for c in COLUMNS}
        assert (row["known_positives"] or row["positives"]) == expected["known_positives"]
    assert rows[6]["known_positives"] == ["renew online", "renew by mail", "renew at the office"]
    assert data.max_known_positives == max_known_positives(load_examples([first, second])) == 3
    assert data.span_rows == [0] and rows[0]["positive_span"] == [4, 10]


def test_a_second_read_maps_the_cache_and_a_changed_file_is_read_again(tmp_path, caplog):
    path = write_jsonl(tmp_path / "a.jsonl", conversation_records(5))
    cache = str(tmp_path / "cache")
    one = training_set([path], num_turns=5, scores=False, cache_dir=cache)
    with caplog.at_level(logging.INFO):
        two = training_set([path], num_turns=5, scores=False, cache_dir=cache)
    assert two.folder == one.folder and "read from its cache" in caplog.text
    assert training_set([path], num_turns=3, scores=False, cache_dir=cache).folder != one.folder
    write_jsonl(tmp_path / "a.jsonl", conversation_records(7))
    os.utime(path, ns=(1, 1))  # whatever the clock's resolution
    changed = training_set([path], num_turns=5, scores=False, cache_dir=cache)
    assert changed.folder != one.folder and len(changed) == 7


def test_a_bad_record_names_its_line_and_leaves_no_entry(tmp_path):
    rows = conversation_records(5)
    rows[3]["positive"] = ""
    path = write_jsonl(tmp_path / "a.jsonl", rows)
    with pytest.raises(UserError, match=r"a.jsonl:4: 'positive' must be a non-empty string"):
        training_set([path], num_turns=5, scores=False, cache_dir=str(tmp_path / "cache"))
    assert os.listdir(tmp_path / "cache") == []
    with pytest.raises(UserError, match="no teacher scores"):
        training_set([write_jsonl(tmp_path / "b.jsonl", conversation_records(2))], num_turns=5, scores=True,
                     cache_dir=str(tmp_path / "cache"))


def test_a_cache_folder_that_cannot_be_made_is_one_error(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", conversation_records(3))
    with pytest.raises(UserError, match="cannot create it"):
        training_set([path], num_turns=5, scores=False, cache_dir=os.path.join(path, "cache"))  # under a file


def test_cached_token_ids_give_the_batch_that_tokenising_gives(tmp_path, tiny_model_dir, caplog):
    from transformers import AutoTokenizer

    from longcontrast.collator import ContrastiveCollator
    from longcontrast.token_ids import with_token_ids

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    first = write_jsonl(tmp_path / "a.jsonl", records())
    second = write_jsonl(tmp_path / "b.jsonl", conversation_records(3, negatives=1))
    cache = str(tmp_path / "cache")
    prompts = ("query: ", "")
    data = training_set([first, second], num_turns=5, scores=False, cache_dir=cache)
    texts = list(data.rows)
    with_token_ids(data, tokenizer, query_max_len=12, passage_max_len=9, query_prompts=prompts, passage_prompt="p ")
    cached = list(data.rows)
    assert "known_positives_ids" in cached[0] and "known_positives_ids" not in texts[0]
    collate = ContrastiveCollator(tokenizer, 12, 9, num_hard_negatives=2, passage_prompt="p ", max_positives=3,
                                  dataset_prompts=prompts, negative_sampling="random")
    for batch in ([0, 6, 7, 10], [9, 11], [1, 2, 3, 4, 5, 8]):  # several datasets, the repeated query's rows
        expected, got = collate([texts[i] for i in batch]), collate([cached[i] for i in batch])
        assert got.keys() == expected.keys()
        for key in ("query_ids", "passage_ids"):
            assert got[key] == expected[key]
        for key in ("passage_text_ids", "query_positive_ids"):
            assert got[key].tolist() == expected[key].tolist()
    marked = dict(cached[0], query_ids=[7, 7], positives_ids=[[8, 8]])  # the ids are what the batch reads
    assert collate([marked])["query_ids"] == [[7, 7]] and collate([marked])["passage_ids"][0] == [8, 8]
    assert [bool(r["known_positives_ids"]) for r in cached] == [bool(r["known_positives"]) for r in texts]
    assert len(cached[6]["known_positives_ids"]) == 3
    # another length is another file, never the stale ids; the same settings map the file again
    other = training_set([first, second], num_turns=5, scores=False, cache_dir=cache)
    with_token_ids(other, tokenizer, query_max_len=12, passage_max_len=5, query_prompts=prompts, passage_prompt="p ")
    assert max(len(ids) for row in other.rows for ids in row["negatives_ids"]) == 5
    assert len(os.listdir(data.folder)) == 6  # rows, known, keep, summary and two token folders
    with caplog.at_level(logging.INFO):
        again = training_set([first, second], num_turns=5, scores=False, cache_dir=cache)
        with_token_ids(again, tokenizer, query_max_len=12, passage_max_len=9, query_prompts=prompts,
                       passage_prompt="p ")
    assert "token ids read from" in caplog.text and list(again.rows) == cached


def tevatron_both_ways(tmp_path, count: int = 9):
    """The same examples as tevatron records with their passages inline, and as records naming the
    passages by id in a corpus file (shuffled, with documents no record names)."""
    import random

    texts, inline, by_id = {}, [], []
    for i, record in enumerate(conversation_records(count)):
        query = record["messages"][-1]["content"]
        passages = [record["positive"], *record["hard_negatives"]]
        ids = [texts.setdefault(t, f"doc-{len(texts)}") for t in passages]
        inline.append({"query_id": str(i), "query": query, "positive_passages": [
            {"docid": ids[0], "title": "", "text": passages[0]}], "negative_passages": [
            {"docid": d, "text": t} for d, t in zip(ids[1:], passages[1:])]})
        by_id.append({"query_id": str(i), "query_text": query, "positive_document_ids": ids[:1],
                      "negative_document_ids": ids[1:]})
    corpus = [{"docid": d, "text": t} for t, d in texts.items()] + [{"docid": "unused", "text": "never named"}]
    random.Random(0).shuffle(corpus)
    return (write_jsonl(tmp_path / "inline.jsonl", inline), write_jsonl(tmp_path / "by_id.jsonl", by_id),
            write_jsonl(tmp_path / "corpus.jsonl", corpus), corpus)


def test_records_naming_passages_by_id_train_as_records_holding_them(tmp_path, tiny_model_dir):
    """tevatron's corpus layout: the rows hold corpus row numbers, not texts; a run on them ends at
    the weights of the same run on the records with their passages inline (dropout on), and a
    corpus whose ids name other texts must not."""
    import efficient_train
    from helpers import common, weights

    inline, by_id, corpus_file, corpus = tevatron_both_ways(tmp_path)
    data = training_set([by_id], corpora=[corpus_file], num_turns=5, scores=False, cache_dir=str(tmp_path / "cache"))
    assert data.rows[0]["negatives"] == [] and len(data.rows[0]["negative_rows"]) == 2 and len(data.corpus) == len(corpus)
    argv = ["--max_steps", "3", "--dropout", "0.1", "--mini_batch_size", "2", "--per_device_train_batch_size", "4",
            "--data_cache_dir", str(tmp_path / "cache")]
    efficient_train.main(common(tiny_model_dir, inline, tmp_path / "inline", *argv))
    efficient_train.main(common(tiny_model_dir, by_id, tmp_path / "by_id", "--train_corpus", corpus_file, *argv))
    reference, got = weights(tmp_path / "inline"), weights(tmp_path / "by_id")
    assert all(torch.equal(got[k], reference[k]) for k in reference)
    # the batches tokenised as they are drawn train to the same weights as the cached ids
    efficient_train.main(common(tiny_model_dir, inline, tmp_path / "texts", *argv[:-1], str(tmp_path / "texts_cache"),
                                "--cache_token_ids", "false"))
    assert all(torch.equal(weights(tmp_path / "texts")[k], reference[k]) for k in reference)
    assert not [f for entry in os.listdir(tmp_path / "texts_cache") for f in os.listdir(tmp_path / "texts_cache" / entry)
                if f.startswith("tokens-")]
    texts = [c["text"] for c in corpus]  # the negative control: every id names another document's text
    swapped = [dict(c, text=texts[(i + 1) % len(texts)]) for i, c in enumerate(corpus)]
    other = write_jsonl(tmp_path / "swapped.jsonl", swapped)
    efficient_train.main(common(tiny_model_dir, by_id, tmp_path / "swapped", "--train_corpus", other, *argv))
    assert not all(torch.equal(weights(tmp_path / "swapped")[k], reference[k]) for k in reference)


@pytest.mark.parametrize("case, message", [
    ("no corpus", "names its passages by document id"),
    ("unknown id", r"by_id.jsonl:2: document id 'doc-404' is not in the corpus"),
    ("repeated id", "repeats the id of document"),
    ("no text", "a corpus record needs 'docid'"),
])
def test_bad_corpus_layouts_are_one_error(case, message, tmp_path):
    _, by_id, corpus_file, corpus = tevatron_both_ways(tmp_path)
    if case == "unknown id":
        rows = [json.loads(line) for line in open(by_id)]
        rows[1]["negative_document_ids"] = ["doc-404"]
        write_jsonl(tmp_path / "by_id.jsonl", rows)
    elif case == "repeated id":
        write_jsonl(tmp_path / "corpus.jsonl", corpus + [dict(corpus[3], text="another text")])
    elif case == "no text":
        write_jsonl(tmp_path / "corpus.jsonl", corpus + [{"docid": "x"}])
    with pytest.raises(UserError, match=message):
        training_set([by_id], corpora=[None if case == "no corpus" else corpus_file], num_turns=5, scores=False,
                     cache_dir=str(tmp_path / "cache"))
    assert os.listdir(tmp_path / "cache") == []
