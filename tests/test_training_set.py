"""The on-disk training set (longcontrast.training_set): the rows the in-memory reader gives, duplicates
and repeated queries found from hashes, the cache keyed by the files, errors that leave no entry."""

import logging
import os

import pytest

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
