"""Late interaction (--colbert_dim): MaxSim against a brute force that shares nothing with it, and
GradCache over token vectors against the plain step (mini-batches of 1, uneven and whole, dropout
on, copies deduplicated), with negative controls that must differ."""

import contextlib
import json

import pytest
import torch
import torch.nn.functional as F

import efficient_train
import evaluate
import origin_train
from conftest import conversation_records, write_jsonl
from helpers import (assert_same, batch, common, gradients, make_model, max_relative_difference, run_main, run_step,
                     split_into_mini_batches, step_inputs, update, weights)
from longcontrast import late_interaction, multivector
from longcontrast.gradcache import RandState
from longcontrast.late_interaction import maxsim, read_projection
from longcontrast.step import full_batch_step
from longcontrast.loss import LossSettings
from test_gradcache import TEACHER, distillation_loss_fn, run_grad_cache as cached_step, run_reference as reference_step


def padded_unit_vectors(lengths, width, dim, seed):
    g = torch.Generator().manual_seed(seed)
    vectors = F.normalize(torch.randn(len(lengths), width, dim, generator=g, dtype=torch.float64), dim=-1)
    for row, length in enumerate(lengths):
        vectors[row, length:] = 0
    return vectors


def brute_force_maxsim(queries, passages, query_lengths, passage_lengths):
    """Loops over pairs of unpadded token matrices: sum over query tokens of the best dot product."""
    return torch.stack([torch.stack([(q[:lq] @ p[:lp].T).max(dim=1).values.sum()
                                     for p, lp in zip(passages, passage_lengths)])
                        for q, lq in zip(queries, query_lengths)])


@pytest.mark.parametrize("block_entries", [1, 40, 1 << 26])  # a passage a block, uneven blocks, one block
def test_maxsim_and_its_gradient_equal_the_brute_force(block_entries, monkeypatch):
    monkeypatch.setattr(late_interaction, "BLOCK_ENTRIES", block_entries)
    query_lengths, passage_lengths = [5, 3, 4], [7, 2, 5, 6]
    queries = padded_unit_vectors(query_lengths, 5, 4, seed=0).requires_grad_()
    passages = padded_unit_vectors(passage_lengths, 7, 4, seed=1).requires_grad_()
    weights_ = torch.randn(3, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    scores = maxsim(queries, passages)
    (scores * weights_).sum().backward()
    got = queries.grad.clone(), passages.grad.clone()
    queries.grad = passages.grad = None
    expected = brute_force_maxsim(queries, passages, query_lengths, passage_lengths)
    (expected * weights_).sum().backward()
    torch.testing.assert_close(scores, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got[0], queries.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got[1], passages.grad, rtol=1e-12, atol=1e-12)


def test_padding_never_scores():
    """A passage whose real tokens all score below 0 gets its (negative) MaxSim, not the 0 a
    padded zero vector would give; a padded query token adds nothing."""
    query = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])  # one real token, one padded
    passage = torch.tensor([[[-1.0, 0.0], [0.0, 0.0], [0.0, 0.0]]])  # one real token, two padded
    assert maxsim(query, passage).item() == -1.0
    assert late_interaction.mean_maxsim(query, passage).item() == -1.0


def colbert_model(model_dir, dropout, dim=16):
    model = make_model(model_dir, dropout=dropout)
    torch.manual_seed(1)
    model.projection = torch.nn.Linear(model.config.hidden_size, dim, bias=False, dtype=torch.float64)
    return model


@pytest.mark.parametrize("mini_batch_size", [1, 3, None])  # 1, uneven, whole batch
def test_cached_token_vectors_equal_the_plain_step(tiny_model_dir, mini_batch_size):
    model = colbert_model(tiny_model_dir, dropout=0.0)
    queries, passages, loss_fn = batch()
    model.zero_grad()
    plain = full_batch_step(model, split_into_mini_batches(queries, None, 0)[0],
                            split_into_mini_batches(passages, None, 0)[0], loss_fn, 1.0, torch.Tensor.backward)
    expected = gradients(model)
    out, got = cached_step(model, mini_batch_size)
    assert out.loss.item() == pytest.approx(plain.loss.item(), rel=1e-9)
    assert "projection.weight" in got
    assert_same(got, expected)


@pytest.mark.parametrize("mini_batch_size", [1, 3])
def test_dropout_on_replays_the_masks(tiny_model_dir, mini_batch_size):
    model = colbert_model(tiny_model_dir, dropout=0.1)
    out, got = cached_step(model, mini_batch_size)
    reference, expected = reference_step(model, mini_batch_size)
    assert out.loss.item() == pytest.approx(reference.loss.item(), rel=1e-9)
    assert_same(got, expected)


def test_negative_controls_differ(tiny_model_dir, monkeypatch):
    """Without the RNG replay dropout draws other masks; a single vector instead of token vectors
    is another objective: both change the gradient."""
    model = colbert_model(tiny_model_dir, dropout=0.1)
    _, expected = reference_step(model, 3)
    with monkeypatch.context() as patch:
        patch.setattr(RandState, "restored", lambda self: contextlib.nullcontext())
        _, broken = cached_step(model, 3)
    assert max_relative_difference(broken, expected) > 1e-2
    model = colbert_model(tiny_model_dir, dropout=0.0)
    _, token_level = cached_step(model, 3)
    model.projection = None
    _, single = cached_step(model, 3)
    assert max_relative_difference(single, {k: token_level[k] for k in single}) > 1e-2


# InfoNCE with the KL to a teacher's scores, on two Matryoshka prefixes of every token vector
DISTILLED = LossSettings(0.05, contrastive_weight=0.5, distill_weight=1.0, teacher_temperature=0.5,
                         matryoshka_dims=(16, 8), matryoshka_weights=(1.0, 0.5))


@pytest.mark.parametrize("mini_batch_size", [1, 3, None])
def test_distillation_on_token_vectors_cached_equals_full_batch_with_dropout(tiny_model_dir, mini_batch_size):
    """The teacher's term (student MaxSim of each query's own candidates) and the prefixes go through
    GradCache's cached token vectors exactly; shuffled teacher scores must give another gradient."""
    model = colbert_model(tiny_model_dir, dropout=0.1)
    loss_fn = distillation_loss_fn(DISTILLED, TEACHER)
    out, got = cached_step(model, mini_batch_size, loss_fn=loss_fn)
    reference, expected = reference_step(model, mini_batch_size, loss_fn=loss_fn)
    assert out.loss.item() == pytest.approx(reference.loss.item(), rel=1e-9)
    assert set(out.parts) == {"contrastive", "distill"} and out.parts["distill"].item() > 0
    assert_same(got, expected)
    _, shuffled = cached_step(model, mini_batch_size, loss_fn=distillation_loss_fn(DISTILLED, TEACHER.flip(1)))
    assert max_relative_difference(shuffled, expected) > 1e-2


@pytest.mark.parametrize("mini_batch_size", [1, 4])
def test_copies_are_encoded_once(tiny_model_dir, mini_batch_size):
    """contrastive_step deduplicates repeated texts on token vectors as on single vectors."""
    model = colbert_model(tiny_model_dir, dropout=0.0)
    plain, expected, _ = run_step(model, step_inputs(), None)
    out, got, seen = run_step(model, step_inputs(), mini_batch_size)
    assert seen == 2 * (4 + 10)  # no-grad pass and replay, each over the 4 distinct queries and 10 passages
    assert out.loss.item() == pytest.approx(plain.loss.item(), rel=1e-9)
    assert_same(got, expected)


def test_segments_are_scored_as_one_long_document():
    """MaxSim of passages joined from their segments (each padded on its own) equals the brute force
    over each passage's real tokens laid end to end, scores and gradients."""
    segment_lengths, owner = [3, 5, 2, 4, 5, 1], [0, 0, 0, 1, 2, 2]
    segments = padded_unit_vectors(segment_lengths, 5, 4, seed=3).requires_grad_()
    queries = padded_unit_vectors([4, 2], 4, 4, seed=4)
    weights_ = torch.randn(2, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    (maxsim(queries, late_interaction.join_segments(segments, owner)) * weights_).sum().backward()
    got = segments.grad.clone()
    segments.grad = None
    whole = [torch.cat([segments[s, :n] for s, (o, n) in enumerate(zip(owner, segment_lengths)) if o == p])
             for p in range(3)]  # each passage's real tokens, end to end
    expected = torch.stack([torch.stack([(q[:n] @ w.T).max(dim=1).values.sum() for w in whole])
                            for q, n in zip(queries, [4, 2])])
    (expected * weights_).sum().backward()
    torch.testing.assert_close(maxsim(queries, late_interaction.join_segments(segments, owner)), expected)
    torch.testing.assert_close(got, segments.grad, rtol=1e-12, atol=1e-12)


def segment_inputs():
    """step_inputs' 12 texts as the segments of 8 passages; segment 8 repeats segment 1 and 11
    repeats 9 (a segment shared by two passages is encoded once)."""
    inputs = step_inputs()
    inputs["passage_segment_owner"] = [0, 0, 1, 2, 3, 4, 5, 5, 6, 6, 6, 7]
    inputs["passage_text_ids"] = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7])
    return inputs


@pytest.mark.parametrize("mini_batch_size", [1, 3, 12])  # 1, uneven, whole batch
def test_segments_cached_equal_the_plain_step(tiny_model_dir, mini_batch_size):
    """GradCache over segments, a passage's segments cached apart, equals the plain step; another
    grouping of the same segments must give another gradient."""
    model = colbert_model(tiny_model_dir, dropout=0.0)
    plain, expected, _ = run_step(model, segment_inputs(), None)
    out, got, seen = run_step(model, segment_inputs(), mini_batch_size)
    assert seen == 2 * (4 + 10)  # the 4 distinct queries and 10 distinct segments, no-grad pass and replay
    assert out.loss.item() == pytest.approx(plain.loss.item(), rel=1e-9)
    assert_same(got, expected)
    regrouped = segment_inputs()
    regrouped["passage_segment_owner"] = [0, 1, 1, 2, 3, 4, 5, 5, 6, 6, 7, 7]
    _, other, _ = run_step(model, regrouped, mini_batch_size)
    assert max_relative_difference(other, expected) > 1e-2


SGD = ["--optim", "sgd", "--learning_rate", "1", "--lr_scheduler_type", "constant", "--weight_decay", "0",
       "--max_grad_norm", "0", "--dropout", "0", "--max_steps", "1", "--per_device_train_batch_size", "7",
       "--colbert_dim", "16"]


@pytest.mark.slow
def test_one_sgd_step_of_both_scripts_gives_the_same_update(tiny_model_dir, tmp_path):
    """origin_train and efficient_train (mini-batches of 1, 3 and a token budget) make the same SGD
    update of the encoder and of the projection; the saved folder is PyLate's layout, which this
    project reads back to the token vectors that AutoModel and the saved matrix give."""
    data = write_jsonl(tmp_path / "d.jsonl", conversation_records(7))
    origin_train.main(common(tiny_model_dir, data, tmp_path / "o", *SGD))
    for run, extra in (("e1", ["--mini_batch_size", "1"]), ("e3", ["--mini_batch_size", "3"]),
                       ("t", ["--mini_batch_tokens", "150"])):
        efficient_train.main(common(tiny_model_dir, data, tmp_path / run, *SGD, *extra))
        update_o, update_e = update(tiny_model_dir, tmp_path / "o"), update(tiny_model_dir, tmp_path / run)
        assert update_o.norm() > 0
        assert ((update_e - update_o).norm() / update_o.norm()).item() <= 1e-5
        projection_o, projection_e = (read_projection(tmp_path / name).weight for name in ("o", run))
        assert ((projection_e - projection_o).norm() / projection_o.norm()).item() <= 1e-5
    efficient_train.main(common(tiny_model_dir, data, tmp_path / "single", *SGD[:-2], "--mini_batch_size", "3"))
    single = update(tiny_model_dir, tmp_path / "single")
    assert ((single - update_o).norm() / update_o.norm()).item() > 1e-2  # the flag changes the objective
    assert "projection.weight" not in weights(tmp_path / "o")  # the encoder's folder holds the encoder alone

    config = json.loads((tmp_path / "o" / "config_sentence_transformers.json").read_text())
    assert config["similarity_fn_name"] == "MaxSim" and config["query_length"] == 32 and config["document_length"] == 48
    assert (config["query_prefix"], config["document_prefix"], config["do_query_expansion"]) == ("", "", False)
    assert json.loads((tmp_path / "o" / "modules.json").read_text())[1]["type"] == "sentence_transformers.models.Dense"
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoTokenizer

    # the folder read by hand: AutoModel's encoder, 1_Dense's matrix, a unit vector per token
    encoder, tokenizer = AutoModel.from_pretrained(tmp_path / "o"), AutoTokenizer.from_pretrained(tmp_path / "o")
    matrix = load_file(tmp_path / "o" / "1_Dense" / "model.safetensors")["linear.weight"]  # (16, H)
    inputs = tokenizer(["how do i renew my parking permit"], return_tensors="pt")
    with torch.no_grad():
        expected = F.normalize(encoder(**inputs).last_hidden_state[0] @ matrix.T, dim=-1)  # (L, 16)
    from longcontrast.inference import load_retriever

    model, _ = load_retriever(str(tmp_path / "o"))
    with torch.no_grad():
        ours = model(inputs["input_ids"], inputs["attention_mask"], side="query")[0]  # (L, 16)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_passages_read_in_segments_train_alike_in_both_scripts(tiny_model_dir, tmp_path):
    """--passage_segment_len: the collator cuts each passage into consecutive segments wrapped in
    the special tokens; origin_train and efficient_train (mini-batches of 1 and 3) make the same
    SGD update, another than reading each passage as one piece; the saved document length is the
    segment's."""
    from transformers import AutoTokenizer

    from longcontrast.collator import ContrastiveCollator

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = [{"query": "q", "positive": record["positive"], "negatives": record["hard_negatives"][:1]}
            for record in conversation_records(2)]
    whole = ContrastiveCollator(tokenizer, 32, 48)(rows)
    cut = ContrastiveCollator(tokenizer, 32, 48, passage_segment_len=8)(rows)
    owner = cut["passage_segment_owner"]
    assert owner == sorted(owner) and max(owner) == 3 and len(owner) > 4
    for passage, ids in enumerate(whole["passage_ids"]):
        pieces = [piece for piece, o in zip(cut["passage_ids"], owner) if o == passage]
        assert all(len(p) <= 8 and p[0] == ids[0] and p[-1] == ids[-1] for p in pieces)
        assert [t for p in pieces for t in p[1:-1]] == ids[1:-1]  # the passage's text, end to end
    assert torch.equal(cut["passage_text_ids"], whole["passage_text_ids"])

    data = write_jsonl(tmp_path / "d.jsonl", conversation_records(7))
    segments = [*SGD, "--passage_segment_len", "8"]
    origin_train.main(common(tiny_model_dir, data, tmp_path / "o", *segments))
    update_o = update(tiny_model_dir, tmp_path / "o")
    for run, size in (("e1", "1"), ("e3", "3")):
        efficient_train.main(common(tiny_model_dir, data, tmp_path / run, *segments, "--mini_batch_size", size))
        update_e = update(tiny_model_dir, tmp_path / run)
        assert ((update_e - update_o).norm() / update_o.norm()).item() <= 1e-5
    efficient_train.main(common(tiny_model_dir, data, tmp_path / "one_piece", *SGD, "--mini_batch_size", "3"))
    assert ((update(tiny_model_dir, tmp_path / "one_piece") - update_o).norm() / update_o.norm()).item() > 1e-2
    config = json.loads((tmp_path / "o" / "config_sentence_transformers.json").read_text())
    assert config["document_length"] == 8


@pytest.mark.parametrize("extra, message", [
    (["--colbert_dim", "-1"], "--colbert_dim must be >= 0"),
    (["--colbert_dim", "16", "--untie_encoders"], "--colbert_dim with --untie_encoders"),
    (["--passage_segment_len", "8"], "--passage_segment_len reads a passage in segments"),
    (["--colbert_dim", "16", "--passage_segment_len", "48"], "--passage_segment_len must be in [3, --passage_max_len 48)"),
    (["--colbert_dim", "16", "--passage_segment_len", "8", "--shift_positions"], "--passage_segment_len with --shift"),
])
def test_bad_flags_end_with_one_error_line(tiny_model_dir, tiny_train_file, tmp_path, capsys, extra, message):
    err = run_main(efficient_train, common(tiny_model_dir, tiny_train_file, tmp_path / "o", *extra), capsys)
    assert message in err


def test_a_late_interaction_folder_is_continued_in_segments(colbert_dir, tiny_train_file, tmp_path):
    """--passage_segment_len without --colbert_dim: the folder's own projection makes it late interaction."""
    assert efficient_train.main(common(colbert_dir, tiny_train_file, tmp_path / "o", "--passage_segment_len", "8",
                                       "--max_steps", "1", "--mini_batch_size", "2")) == 0
    assert json.loads((tmp_path / "o" / "config_sentence_transformers.json").read_text())["document_length"] == 8


# --- retrieval: the token index, its blocked search, the retriever's readings ---

def test_blocked_search_equals_the_brute_force(monkeypatch):
    """Corpus tokens in blocks that cut documents apart, several query blocks: the same scores and
    rankings as one loop over (query, document) pairs."""
    monkeypatch.setattr(multivector, "BLOCK_ENTRIES", 37)
    g = torch.Generator().manual_seed(0)
    documents = [F.normalize(torch.randn(n, 8, generator=g), dim=-1) for n in (5, 1, 12, 3, 7, 2)]
    queries = [F.normalize(torch.randn(n, 8, generator=g), dim=-1) for n in (4, 2, 6)]
    index = multivector.TokenIndex.build([d.half() for d in documents], list(range(6)), 6)
    expected = torch.tensor([[(q @ d.half().float().T).max(dim=1).values.sum().item() for d in documents]
                             for q in queries])  # (Q, N)
    scores, found = multivector.search(queries, index, k=4)
    torch.testing.assert_close(scores, expected.sort(dim=1, descending=True).values[:, :4], rtol=1e-5, atol=1e-5)
    assert torch.equal(found, expected.argsort(dim=1, descending=True)[:, :4])
    block, mask = multivector.padded_queries(queries)
    torch.testing.assert_close(multivector.maxsim_scores(block, mask, index, 2, 5), expected[:, 2:5], rtol=1e-5, atol=1e-5)
    assert index.bytes_per_token == 8 * 2 + 4


@pytest.fixture(scope="module")
def colbert_dir(tiny_model_dir, tmp_path_factory):
    from longcontrast.modeling import DualEncoder, load_encoder

    folder = tmp_path_factory.mktemp("colbert") / "m"
    encoder, tokenizer = load_encoder(tiny_model_dir, dropout=0.0)
    torch.manual_seed(0)
    projection = torch.nn.Linear(encoder.config.hidden_size, 8, bias=False)
    DualEncoder(encoder, "cls", projection=projection).save(folder, tokenizer, max_seq_length=64, query_max_length=32)
    return str(folder)


def test_long_documents_are_read_whole_in_segments(colbert_dir, tiny_model_dir, tmp_path):
    """A late-interaction model on a BEIR folder: ``whole`` scores every token of each document
    (read in 16-token segments, past what one pass reads) and ``tokens@8`` its 8-token segments;
    each run's scores equal MaxSim computed pair by pair from the model's own forward passes, in
    the run's order. evaluate.py reports both readings and fuses them with BM25."""
    import random

    from conftest import WORDS
    from helpers import write_beir
    from longcontrast.inference import load_retriever
    from longcontrast.multivector import LateInteractionRetriever
    from longcontrast.retrieval_sets import CorpusSet
    from longcontrast.retrievers import EncodeSettings
    from longcontrast.tokenization import split_windows, tokenize

    rng = random.Random(0)
    corpus = [{"_id": f"d{i}", "title": "", "text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 40)))}
              for i in range(9)]
    queries = [{"_id": f"q{i}", "text": " ".join(rng.choice(WORDS) for _ in range(3))} for i in range(4)]
    beir = write_beir(tmp_path / "beir", corpus, queries, [(f"q{i}", f"d{2 * i}", 1) for i in range(4)])
    model, tokenizer = load_retriever(colbert_dir)
    data = CorpusSet(beir)
    settings = EncodeSettings(query_max_len=32, passage_max_len=16, batch_size=4)
    runs = LateInteractionRetriever(model, tokenizer, settings, window=8).rank(data)
    assert list(runs) == ["whole", "tokens@8"]

    def vectors(ids):
        with torch.no_grad():
            return model(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long), side="query")[0]  # (L, 8)

    query_vectors = [vectors(ids) for ids in tokenize(tokenizer, data.queries, 32, "right")]
    full = tokenize(tokenizer, data.passages, 10**9, "right")
    for reading, length in (("whole", 16), ("tokens@8", 8)):
        pieces, owner = split_windows(tokenizer, full, length)
        assert len(pieces) > len(corpus)  # some documents are longer than one segment
        tokens = [torch.cat([vectors(p) for p, o in zip(pieces, owner) if o == d]).half().float()
                  for d in range(len(corpus))]
        expected = torch.tensor([[(q @ t.T).max(dim=1).values.sum().item() for t in tokens] for q in query_vectors])
        run = runs[reading]
        assert run.info["tokens"] == sum(len(p) for p in pieces)
        for q, (found, scores) in enumerate(zip(run.candidates, run.scores)):
            assert len(found) == len(corpus)
            torch.testing.assert_close(scores, expected[q, found], rtol=1e-5, atol=1e-5)
            assert bool((scores[:-1] >= scores[1:]).all())

    out = tmp_path / "e.json"
    assert evaluate.main(["--model_path", colbert_dir, "bm25", "--beir", beir, "--passage_max_len", "16",
                          "--passage_window", "8", "--fuse_bm25", "0.3", "--output_file", str(out),
                          "--bootstrap_samples", "100"]) == 0
    results = json.loads(out.read_text())["results"]
    row, fused = results[colbert_dir]["beir"], results[f"{colbert_dir}+bm25@0.3"]["beir"]
    assert row["tokens"] == runs["whole"].info["tokens"] and row["index_bytes"] == row["tokens"] * (8 * 2 + 4)
    assert "tokens@8" in row and "tokens@8" in fused  # every reading, alone and fused
    assert results[colbert_dir]["pooling"] == "MaxSim of 8-d token vectors"

    # a single-vector model read through an untrained projection: its own row beside it
    assert evaluate.main(["--model_path", tiny_model_dir, "--untrained_colbert_dim", "8", "--beir", beir,
                          "--passage_max_len", "16", "--output_file", str(out), "--bootstrap_samples", "100"]) == 0
    rows = json.loads(out.read_text())["results"]
    assert list(rows) == [tiny_model_dir, f"{tiny_model_dir}@colbert8"]
    assert rows[f"{tiny_model_dir}@colbert8"]["beir"]["tokens"] == row["tokens"]  # every token of every document


def test_the_miner_refuses_a_late_interaction_model(colbert_dir, tmp_path, capsys):
    """The miner reads one vector per text: a late-interaction folder ends with one error line and
    writes nothing."""
    from conftest import conversation_records, write_jsonl
    from helpers import data_script

    train = write_jsonl(tmp_path / "train.jsonl", conversation_records(6))
    out = tmp_path / "mined.jsonl"
    err = run_main(data_script("mine_hard_negatives"), ["--input", train, "--model_name_or_path", colbert_dir,
                                                        "--scorer", "dense", "--output", str(out)], capsys)
    assert "late-interaction model" in err and not out.exists()
