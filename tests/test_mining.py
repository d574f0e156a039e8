import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import write_jsonl
from helpers import data_script
from longcontrast.records import load_examples
from longcontrast.bm25 import BM25, words
from longcontrast.mining import MiningConfig, mine, select_negatives
from longcontrast.search import rank_fusion, score_fusion

script = data_script("mine_hard_negatives")


def bm25_by_hand(query, texts, k1=0.9, b=0.4):
    docs = [words(t) for t in texts]
    avgdl = sum(map(len, docs)) / len(docs)
    scores = []
    for doc in docs:
        score = 0.0
        for word in set(words(query)):
            df = sum(word in d for d in docs)
            tf = doc.count(word)
            if df:
                idf = math.log(1 + (len(docs) - df + 0.5) / (df + 0.5))
                score += idf * tf * (k1 + 1) / (tf + k1 * (1 - b + b * len(doc) / avgdl))
        scores.append(score)
    return scores


def test_bm25_matches_the_formula():
    texts = ["the fee of the permit is ten", "renew your permit at the office", "parking permit fee fee",
             "a library card", "office hours"]
    bm25 = BM25(texts)
    for query in ["permit fee", "the office", "unknown words only", "fee fee permit library"]:
        got = bm25.scores(bm25.query_matrix([query]), np.arange(len(texts)))[0]
        assert got.tolist() == pytest.approx(bm25_by_hand(query, texts))
    chunked = BM25(texts, chunk=2)  # built two texts at a time, the vocabulary growing between chunks
    assert chunked.vocabulary == bm25.vocabulary and (chunked.weights != bm25.weights).nnz == 0
    subset = bm25.scores(bm25.query_matrix(["permit fee"]), np.array([2, 0]))[0]
    assert subset.tolist() == pytest.approx([bm25_by_hand("permit fee", texts)[i] for i in (2, 0)])


def test_bm25_agrees_with_bm25s_lucene_scores():
    """Against a maintained Lucene-style implementation (bm25s, method and idf "lucene", the same
    tokens): Lucene drops the constant (k1 + 1) of the classic formula, nothing else differs."""
    bm25s = pytest.importorskip("bm25s")
    rng = np.random.default_rng(0)
    vocabulary = "permit fee office renew card library parking address proof days open ten".split()
    texts = [" ".join(rng.choice(vocabulary, rng.integers(3, 40))) for _ in range(60)]
    theirs = bm25s.BM25(k1=0.9, b=0.4, method="lucene", idf_method="lucene")
    theirs.index(bm25s.tokenize(texts, stopwords=None, token_pattern=r"(?u)\b\w+\b", show_progress=False),
                 show_progress=False)
    ours = BM25(texts)
    for query in ["permit fee", "office office days", "library proof ten card"]:
        got = ours.scores(ours.query_matrix([query]), np.arange(len(texts)))[0].numpy() / (0.9 + 1)
        assert got == pytest.approx(theirs.get_scores(sorted(set(query.split()))), rel=1e-5, abs=1e-6)


def test_mteb_variant_agrees_with_bm25s_as_mteb_runs_it():
    """The mteb variant against bm25s with MTEB's settings (k1 1.5, b 0.75, its "en" stop words,
    PyStemmer's English stemmer), on texts with stop words, inflections and one-letter words."""
    bm25s = pytest.importorskip("bm25s")
    import Stemmer

    rng = np.random.default_rng(1)
    vocabulary = "the permits permit renewing renewal of a is offices office fees I x days open and to".split()
    texts = [" ".join(rng.choice(vocabulary, rng.integers(3, 40))).capitalize() for _ in range(60)]
    stemmer = Stemmer.Stemmer("english")
    theirs = bm25s.BM25(k1=1.5, b=0.75, method="lucene", idf_method="lucene")
    theirs.index(bm25s.tokenize(texts, stopwords="en", stemmer=stemmer, show_progress=False), show_progress=False)
    ours = BM25(texts, "mteb")
    assert "the" not in ours.vocabulary and "x" not in ours.vocabulary and "renew" in ours.vocabulary
    for query in ["Renewing the permits", "office fees and days", "open offices"]:
        got = ours.scores(ours.query_matrix([query]), np.arange(len(texts)))[0].numpy() / (1.5 + 1)
        tokens = bm25s.tokenize([query], stopwords="en", stemmer=stemmer, show_progress=False, return_ids=False)[0]
        assert got == pytest.approx(theirs.get_scores(sorted(set(tokens))), rel=1e-5, abs=1e-6)


def test_select_negatives_filters_relative_to_the_positive():
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    excluded = torch.tensor([False, False, True, False, False, False])  # a copy of the positive
    take = lambda **kw: select_negatives(list(range(6)), scores, 0.8, excluded, MiningConfig(num_negatives=3, **kw))  # noqa: E731
    assert take() == ([0, 1, 3], 0)  # hardest first, never the positive's copy
    assert take(skip_top=1) == ([1, 3, 4], 0)
    assert take(max_score_ratio=0.95) == ([3, 4, 5], 2)  # above 0.76 dropped
    assert take(margin=0.25) == ([4, 5], 3)  # above 0.55 dropped: only two left


def test_sampling_from_a_rank_range_draws_each_survivor_alike_and_keeps_rank_order():
    """--sample_from R: N of the first R survivors below skip_top, seeded per query, in rank order;
    over many queries every survivor of the range is drawn about N/R of the time, none outside it."""
    scores = torch.linspace(0.9, 0.1, 20)
    excluded = torch.zeros(20, dtype=torch.bool)
    excluded[3] = True  # the positive's copy is never a survivor
    config = MiningConfig(num_negatives=3, skip_top=1, sample_from=8, max_score_ratio=0.99)
    draws = [select_negatives(list(range(20)), scores, 0.85, excluded, config, query=q) for q in range(3000)]
    assert all(len(chosen) == 3 and chosen == sorted(chosen) for chosen, _ in draws)
    counts = np.bincount([c for chosen, _ in draws for c in chosen], minlength=20)
    survivors = [2, 4, 5, 6, 7, 8, 9, 10]  # 0 is skipped, 1 scores above 0.99 x 0.85, 3 is excluded
    assert set(np.nonzero(counts)[0]) == set(survivors)
    assert np.allclose(counts[survivors] / 3000, 3 / 8, atol=0.04)
    assert draws[7] == select_negatives(list(range(20)), scores, 0.85, excluded, config, query=7)  # seeded
    assert select_negatives(list(range(20)), scores, 0.85, excluded, MiningConfig(num_negatives=3, skip_top=1,
                            max_score_ratio=0.99), query=7)[0] == [2, 4, 5]  # without it: the hardest


def test_ratio_filter_with_a_negative_positive_score():
    """Cosines can be negative: a candidate scoring above the positive is filtered all the same."""
    scores = torch.tensor([-0.1, -0.19, -0.205, -0.215, -0.3])
    config = MiningConfig(num_negatives=5, max_score_ratio=0.95)
    chosen, filtered = select_negatives(list(range(5)), scores, -0.2, torch.zeros(5, dtype=torch.bool), config)
    assert chosen == [3, 4] and filtered == 3  # kept: at most -0.2 - 5% of 0.2 = -0.21 (0.95 x -0.2 would keep -0.19)


def test_a_query_with_several_positives_never_gets_one_as_negative(tmp_path):
    """20 queries, each in 3 records with 3 different positives; BM25 over the pool of positives."""
    records = [{"query": f"how do i renew permit {q}", "positive": f"renew permit {q} online, option {p} of 3",
                "negatives": []} for q in range(20) for p in range(3)]
    train = write_jsonl(tmp_path / "train.jsonl", records)
    out = tmp_path / "mined.jsonl"
    assert script.main(["--input", train, "--num_negatives", "3", "--output", str(out)]) == 0
    mined = [json.loads(line) for line in out.read_text().splitlines()]
    positives_of = {}
    for record in records:
        positives_of.setdefault(record["query"], set()).add(record["positive"])
    assert sum(len(r["negatives"]) for r in mined) == 180
    assert not any(n in positives_of[r["query"]] for r in mined for n in r["negatives"])


def test_rank_fusion_orders_by_summed_reciprocal_ranks():
    a = torch.tensor([[3.0, 2.0, 1.0]])
    b = torch.tensor([[1.0, 3.0, 2.0]])
    fused = rank_fusion(a, b)[0]
    assert fused.tolist() == pytest.approx([1 / 61 + 1 / 63, 1 / 62 + 1 / 61, 1 / 63 + 1 / 62])
    tied = rank_fusion(torch.tensor([[2.0, 2.0, 1.0]]), torch.tensor([[1.0, 1.0, 3.0]]))[0]
    # ties share the best rank: the first two candidates are not told apart by their order
    assert tied.tolist() == pytest.approx([1 / 61 + 1 / 62, 1 / 61 + 1 / 62, 1 / 63 + 1 / 61])


def test_score_fusion_of_a_constant_ranker_is_the_other_ranker_scaled():
    """A model that scores every candidate alike (collapse) adds nothing, not NaN: the hybrid is then
    BM25's standardised scores times its weight; a single candidate scores 0."""
    keyword = torch.tensor([[1.0, 4.0, 7.0]])
    fused = score_fusion(torch.full((1, 3), 0.5), keyword, weight=0.25)[0]
    assert fused.tolist() == pytest.approx((0.25 * (keyword[0] - 4.0) / keyword[0].std(correction=0)).tolist())
    assert score_fusion(torch.ones(2, 1), torch.ones(2, 1), weight=0.5).tolist() == [[0.0], [0.0]]


def test_deep_filtering_falls_back_to_the_whole_ranking():
    """More candidates filtered than the top of the ranking holds: the rest of the pool is searched."""
    texts = [f"permit fee {'fee ' * (60 - i)}" for i in range(60)] + ["permit"]
    config = MiningConfig(num_negatives=2, max_score_ratio=1e-9, scorer="bm25")
    negatives, stats = mine(["permit fee"], [60], [np.arange(60)], texts, config)
    assert negatives == [[]] and stats.filtered == 60 and stats.short == 1  # all 60 seen, not the top 40


def test_mine_groups_pools_and_never_returns_the_positive():
    texts = ["permit fee ten", "permit fee twenty", "office hours", "parking permit", "library card"]
    pool_a, pool_b = np.array([0, 1, 2]), np.array([3, 4, 0])
    queries = ["permit fee", "parking", "permit fee"]
    negatives, stats = mine(queries, [0, 3, 1], [pool_a, pool_b, pool_a], texts, MiningConfig(num_negatives=2), max_scores=4)
    assert negatives[0][0] == 1 and 0 not in negatives[0] and set(negatives[0]) <= {1, 2}
    assert set(negatives[1]) <= {4, 0} and 3 not in negatives[1]
    assert negatives[2][0] == 0 and 1 not in negatives[2]
    embeddings = torch.nn.functional.normalize(torch.randn(5, 4), dim=-1)
    dense = (embeddings[[0, 3, 1]], embeddings)
    got, _ = mine(queries, [0, 3, 1], [pool_a, pool_b, pool_a], texts, MiningConfig(num_negatives=2, scorer="dense"), dense)
    expected = (embeddings[0] @ embeddings[[1, 2]].T).argsort(descending=True)
    assert got[0] == [[1, 2][i] for i in expected.tolist()]


@pytest.fixture
def chatrag_like(tmp_path):
    documents = {
        "dmv": ["to renew a permit pay the fee at the office", "parking permit for the library",
                "office hours are 9 to 5", "the permit fee is 20", "address proof document"],
        "ssa": ["apply for a card online", "what does the card cost", "the card fee is 5"],
    }
    (tmp_path / "documents.json").write_text(json.dumps(documents))
    records = [
        {"messages": [{"role": "user", "content": "how do i renew my permit"}], "document": "dmv",
         "positive": documents["dmv"][0], "hard_negatives": ["stale"], "hard_negative_indices": [3]},
        {"anchor": "what is the card fee", "document": "ssa", "positive": "the  card fee is 5 ", "negative": "x"},
        {"query": "permit fee amount", "document": "dmv", "positive": documents["dmv"][3]},
    ]
    return tmp_path, documents, write_jsonl(tmp_path / "train.jsonl", records)


def test_script_per_document_keeps_formats_and_excludes_identical_texts(chatrag_like, tiny_model_dir):
    folder, documents, train = chatrag_like
    out = folder / "mined.jsonl"
    for scorer in ("bm25", "dense", "hybrid"):
        model = [] if scorer == "bm25" else ["--model_name_or_path", tiny_model_dir]
        assert script.main(["--input", train, "--corpus", str(folder / "documents.json"), "--per_document",
                            "--scorer", scorer, "--num_negatives", "3", "--output", str(out), "--overwrite", *model]) == 0
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        assert [sorted(r) for r in rows] == [["document", "hard_negatives", "messages", "positive"],
                                             ["anchor", "document", "negative", "positive"],
                                             ["document", "negatives", "positive", "query"]]
        assert all(n in documents["dmv"] for n in rows[0]["hard_negatives"]) and len(rows[0]["hard_negatives"]) == 3
        assert documents["dmv"][0] not in rows[0]["hard_negatives"]
        # the positive differs from its chunk by whitespace only: still never a negative
        assert sorted(rows[1]["negative"]) == sorted(documents["ssa"][:2])
        assert documents["dmv"][3] not in rows[2]["negatives"]
        examples = load_examples([str(out)])  # trains as it is
        assert len(examples) == 3 and examples[0].negatives == rows[0]["hard_negatives"]
    summary = json.loads((folder / "mined.jsonl.json").read_text())
    assert summary["records"] == 3 and summary["negatives_per_record"] == pytest.approx(8 / 3, abs=1e-3)


def test_script_pool_of_positives_and_filter(chatrag_like, tiny_model_dir):
    folder, documents, train = chatrag_like
    out = folder / "mined.jsonl"
    assert script.main(["--input", train, "--num_negatives", "5", "--output", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    positives = {documents["dmv"][0], documents["dmv"][3], "the  card fee is 5 "}
    for row, own in zip(rows, [documents["dmv"][0], "the  card fee is 5 ", documents["dmv"][3]]):
        negatives = row.get("hard_negatives", row.get("negative", row.get("negatives")))
        assert set(negatives) == positives - {own}
    # a ratio of 0.01 of the positive's score leaves (almost) nothing: the filter does act
    assert script.main(["--input", train, "--corpus", str(folder / "documents.json"), "--per_document",
                        "--model_name_or_path", tiny_model_dir, "--max_score_ratio", "0.01", "--output", str(out),
                        "--overwrite"]) == 0
    summary = json.loads((folder / "mined.jsonl.json").read_text())
    assert summary["filtered"] > 0 and summary["negatives_per_record"] < 1


@pytest.mark.parametrize("extra, message", [
    (["--scorer", "dense"], "needs --model_name_or_path"),
    (["--per_document"], "--per_document needs --corpus"),
    (["--corpus", "nowhere.json"], "corpus not found"),
    (["--max_score_ratio", "1.5"], "--max_score_ratio must be in"),
    (["--num_negatives", "5", "--sample_from", "3"], "--sample_from 3 must be at least --num_negatives (5)"),
])
def test_bad_input_ends_with_one_message(chatrag_like, capsys, extra, message):
    folder, _, train = chatrag_like
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--input", train, "--output", str(folder / "o.jsonl"), *extra])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (folder / "o.jsonl").exists()


def test_output_is_never_written_over(chatrag_like, capsys):
    folder, documents, train = chatrag_like
    before = Path(train).read_text()
    for output in (train, str(folder / "documents.json")):
        with pytest.raises(SystemExit):
            script.main(["--input", train, "--output", output])
    assert Path(train).read_text() == before and "exists" in capsys.readouterr().err
    (folder / "missing_doc.jsonl").write_text(json.dumps({"query": "q", "positive": "p", "document": "va"}) + "\n")
    with pytest.raises(SystemExit):
        script.main(["--input", str(folder / "missing_doc.jsonl"), "--corpus", str(folder / "documents.json"),
                     "--per_document", "--output", str(folder / "o.jsonl")])
    assert "'va'" in capsys.readouterr().err


def test_corpus_files(tmp_path):
    from longcontrast import UserError
    from longcontrast.readers import read_corpus

    (tmp_path / "c.txt").write_text("first passage\n\nsecond passage\n")
    (tmp_path / "c.jsonl").write_text('{"text": "first"}\n"second"\n')
    (tmp_path / "c.json").write_text('[{"passage": "first"}, "second"]')
    assert read_corpus(str(tmp_path / "c.txt")) == ["first passage", "second passage"]
    assert read_corpus(str(tmp_path / "c.jsonl")) == read_corpus(str(tmp_path / "c.json")) == ["first", "second"]
    (tmp_path / "bad.jsonl").write_text('{"text": "first"}\n{"text": 3}\n')
    with pytest.raises(UserError, match="bad.jsonl:2"):
        read_corpus(str(tmp_path / "bad.jsonl"))
    (tmp_path / "bad.csv").write_text("a,b\n")
    with pytest.raises(UserError, match="unsupported"):
        read_corpus(str(tmp_path / "bad.csv"))


@pytest.mark.parametrize("ratio", [None, 0.9, 0.2])
def test_dense_mining_equals_walking_the_whole_ranking(ratio):
    """The blocked top-k search with deeper re-searches gives what walking every candidate gives."""
    generator = torch.Generator().manual_seed(0)
    texts = torch.nn.functional.normalize(torch.randn(300, 16, generator=generator), dim=1)  # (T, D)
    queries = torch.nn.functional.normalize(texts[:20] + 0.3 * torch.randn(20, 16, generator=generator), dim=1)
    positives = list(range(20))
    excluded = [{q, (q + 1) % 20} for q in range(20)]  # each query has a second positive
    config = MiningConfig(num_negatives=5, max_score_ratio=ratio, scorer="dense", skip_top=1)
    pools = [np.arange(300)] * 20
    got, stats = mine([""] * 20, positives, pools, [""] * 300, config, dense=(queries, texts), excluded=excluded)
    for q in range(20):
        scores = (texts @ queries[q]).tolist()
        positive = scores[q]
        threshold = math.inf if ratio is None else positive - (1 - ratio) * abs(positive)
        walk = [c for c in sorted(range(300), key=lambda c: -scores[c]) if c not in excluded[q]][1:]  # skip_top 1
        assert got[q] == [c for c in walk if scores[c] <= threshold][:5], q
    assert stats.queries == 20
    if ratio == 0.2:
        assert stats.filtered > 20 * (4 * 5 + 32)  # deeper than the first search: re-searched
