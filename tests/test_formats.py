"""The ecosystem's training formats (FlagEmbedding, tevatron, a BEIR folder) and several positives
per query: the same examples in every format train to the same weights, one positive is drawn per
query, and no positive of a query is ever among its negatives (loss mask and miner)."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

import efficient_train
from conftest import write_jsonl
from longcontrast.collator import ContrastiveCollator, make_dataset, max_known_positives
from longcontrast.records import load_examples, parse_record
from longcontrast.loss import contrastive_loss
from helpers import common, data_script, weights, write_beir

miner = data_script("mine_hard_negatives")

QUERIES = [f"how can i renew permit {i}" for i in range(6)]
POSITIVES = [f"the permit {i} fee is {i} and the office is open" for i in range(6)]
NEGATIVES = [[f"library card {i}", f"parking {i} address"] for i in range(6)]


def write_every_format(folder):
    """The same six examples (query, positive, two negatives) in each format; tevatron's first
    positive carries a title, joined to its text by a space as BEIR joins them."""
    rows = list(zip(QUERIES, POSITIVES, NEGATIVES))
    title, text = POSITIVES[0].split(" fee ")[0], "fee " + POSITIVES[0].split(" fee ")[1]
    tevatron = [{"query_id": str(i), "query": q,
                 "positive_passages": [{"docid": f"p{i}", "title": title, "text": text} if i == 0 else
                                       {"docid": f"p{i}", "title": "", "text": p}],
                 "negative_passages": [{"docid": f"n{i}{j}", "text": n} for j, n in enumerate(ns)]}
                for i, (q, p, ns) in enumerate(rows)]
    return {
        "plain": write_jsonl(folder / "plain.jsonl", [{"query": q, "positive": p, "negatives": ns} for q, p, ns in rows]),
        "sentence-transformers": write_jsonl(folder / "sentence_transformers.jsonl", [{"anchor": q, "positive": p, "negative": ns}
                                                              for q, p, ns in rows]),
        "flagembedding": write_jsonl(folder / "flag.jsonl", [{"query": q, "pos": [p], "neg": ns} for q, p, ns in rows]),
        "tevatron": write_jsonl(folder / "tevatron.jsonl", tevatron),
    }


def test_every_format_reads_as_the_same_examples(tmp_path):
    for name, path in write_every_format(tmp_path).items():
        examples = load_examples([path])
        assert [(e.query, e.positive, e.negatives) for e in examples] == list(zip(QUERIES, POSITIVES, NEGATIVES)), name
    flag = parse_record({"query": "q", "pos": ["a", "b"], "neg": [], "prompt": "Represent: "}, "x:1")
    assert flag.query == "Represent: q" and flag.positives == ["a", "b"]


SGD = ["--optim", "sgd", "--learning_rate", "1", "--lr_scheduler_type", "constant", "--weight_decay", "0",
       "--max_grad_norm", "0", "--dropout", "0", "--max_steps", "1", "--per_device_train_batch_size", "6",
       "--mini_batch_size", "4"]


def test_one_sgd_step_is_the_same_in_every_format(tiny_model_dir, tmp_path):
    files = write_every_format(tmp_path)
    trained = {}
    for name, path in files.items():
        assert efficient_train.main(common(tiny_model_dir, path, tmp_path / name, *SGD)) == 0
        trained[name] = weights(tmp_path / name)
    first = trained.pop("plain")
    for name, other in trained.items():
        assert all(torch.equal(first[k], other[k]) for k in first), name
    # a BEIR folder (corpus, queries, qrels/train.tsv) gives the same examples without negatives
    corpus = [{"_id": f"d{i}", "title": "", "text": p} for i, p in enumerate(POSITIVES)]
    beir = write_beir(tmp_path / "beir", corpus, [{"_id": f"q{i}", "text": q} for i, q in enumerate(QUERIES)],
                      [(f"q{i}", f"d{i}", 1) for i in range(6)], split="train")
    no_negatives = write_jsonl(tmp_path / "bare.jsonl", [{"query": q, "positive": p} for q, p in zip(QUERIES, POSITIVES)])
    for name, path in (("beir", beir), ("bare", no_negatives)):
        assert efficient_train.main(common(tiny_model_dir, path, tmp_path / f"run-{name}", *SGD)) == 0
    beir_weights, bare = weights(tmp_path / "run-beir"), weights(tmp_path / "run-bare")
    assert all(torch.equal(beir_weights[k], bare[k]) for k in bare)
    assert not all(torch.equal(first[k], bare[k]) for k in bare)  # negatives do change the step


def flag_records():
    """Three queries with 3 positives each; query 1's negatives include query 0's positives."""
    positives = [[f"permit {i} fee option {j}" for j in range(3)] for i in range(3)]
    return [{"query": f"renew permit {i}", "pos": positives[i],
             "neg": positives[0][1:] if i == 1 else [f"library {i}"]} for i in range(3)], positives


def test_a_positive_is_drawn_per_query_and_the_draw_is_seeded(tiny_model_dir):
    from transformers import AutoTokenizer

    records, positives = flag_records()
    examples = load_examples_from(records)
    collate = ContrastiveCollator(AutoTokenizer.from_pretrained(tiny_model_dir), 16, 16,
                                  max_positives=max_known_positives(examples))
    rows = list(make_dataset(examples))

    def draws(seed):
        collate.seed, drawn = seed, []
        for epoch in range(30):
            collate.epoch = epoch
            torch.manual_seed(epoch)  # the global generator plays no part
            drawn.append(tuple(map(tuple, collate(rows)["passage_ids"][:3])))
        return drawn

    assert draws(0) == draws(0) and draws(0) != draws(1)
    collate.epoch = 3
    assert collate(rows)["passage_ids"] == collate(rows)["passage_ids"]  # one draw per query per epoch
    seen = {batch[0] for batch in draws(0)}
    assert len(seen) == 3  # every positive of query 0 gets its turn


def load_examples_from(records, tmp_path=None):
    import tempfile
    from pathlib import Path

    folder = Path(tmp_path or tempfile.mkdtemp())
    return load_examples([write_jsonl(folder / "flag.jsonl", records)])


def test_no_positive_of_a_query_is_its_negative_in_the_loss(tiny_model_dir):
    from transformers import AutoTokenizer

    records, positives = flag_records()
    examples = load_examples_from(records)
    collate = ContrastiveCollator(AutoTokenizer.from_pretrained(tiny_model_dir), 16, 16, num_hard_negatives=2,
                                  max_positives=max_known_positives(examples))
    torch.manual_seed(0)
    batch = collate(list(make_dataset(examples)))
    assert batch["query_positive_ids"].shape == (3, 3)
    torch.manual_seed(1)
    queries = F.normalize(torch.randn(3, 8), dim=1)
    passages = F.normalize(torch.randn(len(batch["passage_ids"]), 8), dim=1)
    ids = batch["passage_text_ids"].tolist()
    known = [set(row.tolist()) - {-1} for row in batch["query_positive_ids"]]
    hidden = [j for j in range(len(ids)) if j != 0 and ids[j] in known[0]]  # query 0's other positives
    passages[hidden] = queries[0]  # they would be query 0's hardest negatives, were they not masked
    got = contrastive_loss(queries, passages, 0.05, passage_text_ids=batch["passage_text_ids"],
                           query_positive_ids=batch["query_positive_ids"]).loss
    # brute force: query i's softmax runs over its target and every passage that is no positive of it
    losses = []
    for i in range(3):
        allowed = [j for j in range(len(ids)) if j == i or ids[j] not in known[i]]
        logits = [float(queries[i] @ passages[j]) / 0.05 for j in allowed]
        losses.append(math.log(sum(math.exp(x) for x in logits)) - logits[allowed.index(i)])
    assert float(got) == pytest.approx(sum(losses) / 3, rel=1e-5)
    # query 1's two listed negatives are query 0's positives: masked for query 0, not for query 1
    assert len(hidden) >= 2
    unmasked = contrastive_loss(queries, passages, 0.05, passage_text_ids=batch["passage_text_ids"]).loss
    assert float(unmasked) > float(got)  # the negative control: without the mask the loss differs


def test_flagembedding_with_three_positives_trains_and_mines(tiny_model_dir, tmp_path):
    records, positives = flag_records()
    records = records * 2 + [{"query": f"other question {i}", "pos": [f"office hours {i}"], "neg": []} for i in range(4)]
    train = write_jsonl(tmp_path / "flag.jsonl", records)
    assert efficient_train.main(common(tiny_model_dir, train, tmp_path / "run", "--max_steps", "2",
                                       "--mini_batch_size", "3")) == 0
    out = tmp_path / "mined.jsonl"
    assert miner.main(["--input", train, "--num_negatives", "4", "--output", str(out)]) == 0
    mined = [json.loads(line) for line in out.read_text().splitlines()]
    assert all(set(r) == {"query", "pos", "neg"} for r in mined)
    assert not any(n in r["pos"] for r in mined for n in r["neg"])
    assert sum(len(r["neg"]) for r in mined) > 0
    tevatron = write_jsonl(tmp_path / "tev.jsonl", [{"query": r["query"], "positive_passages": [{"text": p} for p in r["pos"]],
                                                      "negative_passages": []} for r in records])
    assert miner.main(["--input", tevatron, "--num_negatives", "2", "--output", str(tmp_path / "tev_mined.jsonl")]) == 0
    first = json.loads((tmp_path / "tev_mined.jsonl").read_text().splitlines()[0])
    assert first["negative_passages"] and all(set(n) == {"docid", "title", "text"} for n in first["negative_passages"])
    assert load_examples([str(tmp_path / "tev_mined.jsonl")])[0].negatives  # trains as it is


def several_positives_file(tmp_path):
    records = [{"query": f"how can i renew permit {i}", "pos": [f"permit {i} fee option {j}" for j in range(3)],
                "neg": [f"library card {i}", f"permit {(i + 1) % 8} fee option 0"]} for i in range(8)]
    return write_jsonl(tmp_path / "several.jsonl", records)


def test_gradcache_equals_the_plain_step_with_several_positives(tiny_model_dir, tmp_path):
    import origin_train
    from test_scripts import update

    data = several_positives_file(tmp_path)
    argv = [*SGD[:-2], "--per_device_train_batch_size", "8"]
    origin_train.main(common(tiny_model_dir, data, tmp_path / "o", *argv))
    efficient_train.main(common(tiny_model_dir, data, tmp_path / "e", *argv, "--mini_batch_size", "3"))
    update_o, update_e = update(tiny_model_dir, tmp_path / "o"), update(tiny_model_dir, tmp_path / "e")
    assert update_o.norm() > 0 and ((update_e - update_o).norm() / update_o.norm()).item() <= 1e-5


@pytest.mark.slow  # a whole training run (or several): the full suite runs it
def test_resume_with_several_positives_is_bit_exact(tiny_model_dir, tmp_path):
    """Each query's positive is drawn by a hash of seed, epoch and query: a run resumed in its second
    epoch draws what the uninterrupted run drew."""
    from test_scripts import assert_resume_is_exact

    argv = ["--max_steps", "5", "--dropout", "0.1", "--per_device_train_batch_size", "4", "--save_strategy", "steps",
            "--save_steps", "1", "--save_total_limit", "10", "--mini_batch_size", "3"]
    assert_resume_is_exact(tiny_model_dir, several_positives_file(tmp_path), tmp_path, argv, "checkpoint-3")
