"""The blocked exact search against a brute force that sorts every score, the token budget of
encoding, the precision choice, and the paired comparison against scipy."""

import numpy as np
import pytest
import torch

from longcontrast.tokenization import tokenize
from longcontrast.inference import autocast_dtype, encode, load_retriever
from longcontrast.tokenization import split_windows
from longcontrast.metrics import paired_difference
from longcontrast.search import faiss_top_k, top_k


def unit(rows, dim, seed):
    vectors = torch.randn(rows, dim, generator=torch.Generator().manual_seed(seed))
    return vectors / vectors.norm(dim=1, keepdim=True)


@pytest.mark.parametrize("query_block, corpus_block", [(1, 1), (3, 7), (1000, 1000)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_top_k_equals_sorting_every_score(query_block, corpus_block, dtype):
    queries, corpus = unit(10, 16, 0), unit(53, 16, 1).to(dtype)
    scores, indices = top_k(queries, corpus, 12, query_block=query_block, corpus_block=corpus_block)
    full = queries @ corpus.float().T  # (10, 53)
    expected = full.sort(dim=1, descending=True)
    assert torch.equal(indices, expected.indices[:, :12])
    assert torch.allclose(scores, expected.values[:, :12])
    assert top_k(queries, corpus, 500)[1].shape == (10, 53)  # k larger than the corpus


def test_faiss_finds_the_same_top_k():
    queries, corpus = unit(10, 16, 4), unit(200, 16, 5)
    ours, theirs = top_k(queries, corpus, 20), faiss_top_k(queries, corpus, 20)
    assert torch.equal(ours[1], theirs[1]) and torch.allclose(ours[0], theirs[0], atol=1e-5)


@pytest.mark.parametrize("corpus_block", [1, 2, 5, 64])
def test_grouped_rows_score_as_their_best_row(corpus_block):
    """MaxP: passages of 1 to 4 rows, blocks that would cut them; brute force: max per passage."""
    sizes = [1, 3, 4, 1, 2, 4, 1, 1, 3]
    owner = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))  # (R,)
    queries, rows = unit(6, 8, 2), unit(len(owner), 8, 3)
    scores, indices = top_k(queries, rows, 5, owner=owner, corpus_block=corpus_block)
    full = queries @ rows.T  # (6, R)
    best = torch.stack([full[:, owner == p].max(dim=1).values for p in range(len(sizes))], dim=1)  # (6, P)
    expected = best.sort(dim=1, descending=True)
    assert torch.equal(indices, expected.indices[:, :5]) and torch.allclose(scores, expected.values[:, :5])
    with pytest.raises(ValueError, match="non-decreasing"):
        top_k(queries, rows, 5, owner=owner.flip(0))


def test_encoding_never_exceeds_the_token_budget(tiny_model_dir):
    model, tokenizer = load_retriever(tiny_model_dir, pooling="mean")
    texts = [("the permit fee is due " * n).strip() for n in (1, 2, 3, 5, 8, 2, 1)]
    ids = tokenize(tokenizer, texts, 64, "right")
    widths = []
    forward = model.forward
    model.forward = lambda input_ids, attention_mask, side: (widths.append(tuple(input_ids.shape))
                                                              or forward(input_ids, attention_mask, side))
    cpu = {"pad_token_id": tokenizer.pad_token_id, "device": torch.device("cpu")}
    alone = encode(model, ids, "passage", batch_size=8, max_tokens=1, **cpu)
    assert [n for n, _ in widths] == [1] * len(set(map(tuple, ids)))  # a budget of 1 token: one text a pass
    widths.clear()
    grouped = encode(model, ids, "passage", batch_size=8, max_tokens=40, **cpu)
    assert all(n * length <= 40 or n == 1 for n, length in widths) and max(n for n, _ in widths) > 1
    assert torch.allclose(alone, grouped, atol=1e-5)


def test_windows_cover_the_passage_once(tiny_model_dir):
    _, tokenizer = load_retriever(tiny_model_dir, pooling="mean")
    ids = tokenize(tokenizer, ["fee " * 30, "permit office"], 10**9, "right", "query: ")
    pieces, owner = split_windows(tokenizer, ids, 12, "query: ")
    prompt = tokenizer("query: ", add_special_tokens=False)["input_ids"]
    assert owner == [0] * (len(pieces) - 1) + [1] and pieces[-1] == ids[1]
    assert all(len(p) <= 12 and p[0] == ids[0][0] and p[-1] == ids[0][-1] for p in pieces)
    assert all(p[1: 1 + len(prompt)] == prompt for p in pieces)  # every window keeps the prompt
    body = [t for p in pieces[:-1] for t in p[1 + len(prompt): -1]]
    assert body == ids[0][1 + len(prompt): -1]  # consecutive, no overlap, nothing lost


def test_auto_precision_never_picks_emulated_bf16(monkeypatch):
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert autocast_dtype("auto", cuda) is torch.float16  # T4, V100
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert autocast_dtype("auto", cuda) is torch.bfloat16
    assert autocast_dtype("auto", torch.device("cpu")) is None and autocast_dtype("bf16", cuda) is torch.bfloat16


def test_paired_difference_against_scipy():
    from scipy import stats

    rng = np.random.default_rng(0)
    a = rng.integers(0, 2, 600).astype(float) * 100  # a Recall@1 column of 600 queries
    b = np.where(rng.random(600) < 0.1, 100 - a, a)  # B differs on ~10% of queries
    ours = paired_difference(a, b, resamples=10_000)
    theirs = stats.bootstrap((b - a,), np.mean, n_resamples=10_000, method="percentile", random_state=1)
    assert ours["difference"] == pytest.approx((b - a).mean())
    assert ours["low"] == pytest.approx(theirs.confidence_interval.low, abs=0.3)
    assert ours["high"] == pytest.approx(theirs.confidence_interval.high, abs=0.3)
    test = stats.permutation_test((a, b), lambda x, y: np.mean(y - x), permutation_type="samples", n_resamples=10_000,
                                  random_state=1)
    assert ours["p"] == pytest.approx(test.pvalue, abs=0.02)
    same = paired_difference(a, a)
    assert same["difference"] == same["low"] == same["high"] == 0 and same["p"] == 1
    shifted = paired_difference(a, a + 1.0)  # B better on every query by one point
    assert shifted["low"] == shifted["high"] == 1 and shifted["p"] < 0.001


def test_search_benchmark_row_runs_and_checks_itself():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("search_speed", Path(__file__).parents[1] / "bench" / "search_speed.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    row = bench.search_row(3000, 40, 16, "float16", "cpu", 10)
    assert row["exact"] and row["seconds"] >= 0 and row["vectors_mb"] == pytest.approx(3000 * 16 * 2 / 2**20, abs=0.1)
