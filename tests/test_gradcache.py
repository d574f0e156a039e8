"""GradCache parity: cached gradients equal full-batch gradients (the sentence-transformers and
open_clip style of test), with a negative control that must differ."""

import contextlib
import dataclasses
from functools import partial

import pytest
import torch

from longcontrast import gradcache
from longcontrast.batching import pad
from longcontrast.gradcache import RandState, grad_cache_step
from longcontrast.late_interaction import cat_padded
from longcontrast.loss import BatchLabels, LossSettings, training_loss
from longcontrast.modeling import DualEncoder
from longcontrast.step import full_batch_step
from helpers import (assert_same, batch, gradients, make_model, max_relative_difference, run_step, sequences,
                     split_into_mini_batches, step_inputs)


def run_grad_cache(model, mini_batch_size, seed=123, loss_fn=None):
    queries, passages, default_loss = batch()
    loss_fn = loss_fn or default_loss
    model.zero_grad()
    torch.manual_seed(seed)
    out = grad_cache_step(
        lambda b, side: model(**b, side=side),
        split_into_mini_batches(queries, mini_batch_size, 0),
        split_into_mini_batches(passages, mini_batch_size, 0),
        loss_fn, torch.device("cpu"),
    )
    return out, gradients(model)


def run_reference(model, mini_batch_size, seed=123, loss_fn=None):
    """Full-batch gradient with the masks GradCache draws: the same mini-batches, forward with
    autograd in the same order from the same seed, one backward through the whole graph."""
    queries, passages, default_loss = batch()
    loss_fn = loss_fn or default_loss
    model.zero_grad()
    torch.manual_seed(seed)
    # (token vectors, --colbert_dim: each mini-batch's own length, zero-padded to the longest)
    q = cat_padded([model(**b, side="query") for b in split_into_mini_batches(queries, mini_batch_size, 0)])
    p = cat_padded([model(**b, side="passage") for b in split_into_mini_batches(passages, mini_batch_size, 0)])
    out = loss_fn(q, p)
    out.loss.backward()
    return out, gradients(model)


@pytest.mark.parametrize("mini_batch_size", [1, 3, None])  # 1, uneven, whole batch
def test_no_dropout_equals_plain_full_batch(tiny_model_dir, mini_batch_size):
    model = make_model(tiny_model_dir, dropout=0.0)
    queries, passages, loss_fn = batch()
    model.zero_grad()
    plain = full_batch_step(
        model, split_into_mini_batches(queries, None, 0)[0], split_into_mini_batches(passages, None, 0)[0],
        loss_fn, 1.0, torch.Tensor.backward,
    )
    expected = gradients(model)
    out, got = run_grad_cache(model, mini_batch_size)
    assert out.loss.item() == pytest.approx(plain.loss.item(), rel=1e-6)
    assert_same(got, expected)


@pytest.mark.parametrize("untie", [False, True])
@pytest.mark.parametrize("mini_batch_size", [1, 3, None])
def test_dropout_on_equals_full_batch_with_same_masks(tiny_model_dir, mini_batch_size, untie):
    model = make_model(tiny_model_dir, dropout=0.1, untie=untie, pooling="mean")
    out, got = run_grad_cache(model, mini_batch_size)
    ref_out, expected = run_reference(model, mini_batch_size)
    assert out.loss.item() == pytest.approx(ref_out.loss.item(), rel=1e-6)
    assert_same(got, expected)
    if untie:
        assert any(n.startswith("passage_encoder.") for n in got)


def test_whole_mini_batch_draws_the_plain_steps_masks(tiny_model_dir):
    """With one mini-batch, GradCache and the plain step consume the RNG identically."""
    model = make_model(tiny_model_dir, dropout=0.1)
    queries, passages, loss_fn = batch()
    model.zero_grad()
    torch.manual_seed(7)
    full_batch_step(model, split_into_mini_batches(queries, None, 0)[0],
                    split_into_mini_batches(passages, None, 0)[0], loss_fn, 1.0, torch.Tensor.backward)
    expected = gradients(model)
    _, got = run_grad_cache(model, None, seed=7)
    assert_same(got, expected)


def test_negative_control_without_rng_replay_differs(tiny_model_dir, monkeypatch):
    """If the replay does not restore the RNG, dropout draws other masks and the gradients are wrong."""
    model = make_model(tiny_model_dir, dropout=0.1)
    _, expected = run_reference(model, 3)
    monkeypatch.setattr(RandState, "restored", lambda self: contextlib.nullcontext())
    _, broken = run_grad_cache(model, 3)
    assert max_relative_difference(broken, expected) > 1e-2


def test_negative_control_other_masks_differ(tiny_model_dir):
    model = make_model(tiny_model_dir, dropout=0.1)
    _, got = run_grad_cache(model, 3, seed=1)
    _, other = run_reference(model, 3, seed=2)
    assert max_relative_difference(got, other) > 1e-2


def test_scale_multiplies_gradients(tiny_model_dir):
    model = make_model(tiny_model_dir, dropout=0.0)
    _, once = run_grad_cache(model, 2)
    queries, passages, loss_fn = batch()
    model.zero_grad()
    grad_cache_step(lambda b, side: model(**b, side=side), split_into_mini_batches(queries, 2, 0),
                    split_into_mini_batches(passages, 2, 0), loss_fn, torch.device("cpu"), scale=0.25)
    quarter = gradients(model)
    assert_same({n: g * 4 for n, g in quarter.items()}, once)


def test_rand_state_replays_dropout_and_restores_outer_stream():
    torch.manual_seed(0)
    state = RandState.capture(torch.device("cpu"))
    first = torch.nn.functional.dropout(torch.ones(100), 0.5)
    after_first = torch.get_rng_state()
    with state.restored():
        again = torch.nn.functional.dropout(torch.ones(100), 0.5)
    assert torch.equal(first, again)
    assert torch.equal(torch.get_rng_state(), after_first)  # the outer stream goes on untouched


def test_replay_checks_gradient_count():
    encode = lambda inputs: inputs["x"] * torch.ones(1, requires_grad=True)  # noqa: E731
    mini_batches = [{"x": torch.ones(2, 3)}]
    states = [RandState.capture(torch.device("cpu"))]
    with pytest.raises(ValueError):
        gradcache.replay(encode, mini_batches, states, torch.ones(3, 3))


def test_only_one_mini_batch_graph_alive(tiny_model_dir, monkeypatch):
    """Each replayed mini-batch is back-propagated before the next one is encoded."""
    model = make_model(tiny_model_dir, dropout=0.0)
    events = []
    original_forward = DualEncoder.forward

    def forward(self, *args, **kwargs):
        events.append("forward" if torch.is_grad_enabled() else "no_grad")
        return original_forward(self, *args, **kwargs)

    monkeypatch.setattr(DualEncoder, "forward", forward)
    queries, passages, loss_fn = batch()
    grad_cache_step(lambda b, side: model(**b, side=side), split_into_mini_batches(queries, 2, 0),
                    split_into_mini_batches(passages, 4, 0), loss_fn, torch.device("cpu"),
                    backward=lambda t: (events.append("backward"), t.backward()))
    replay_events = [e for e in events if e != "no_grad"]
    assert replay_events == ["forward", "backward"] * (3 + 3)


def test_activation_checkpointing_keeps_gradients_exact(tiny_model_dir):
    """--gradient_checkpointing recomputes layers in the backward; the masks and gradients stay the same."""
    model = make_model(tiny_model_dir, dropout=0.1, untie=True)
    _, expected = run_reference(model, 3)
    model.activation_checkpointing_enable()
    _, got = run_grad_cache(model, 3)
    assert_same(got, expected)


def test_sync_context_only_lets_the_last_replay_synchronise(tiny_model_dir):
    """The hook for DDP's no_sync: every mini-batch but the very last is replayed with is_last False."""
    model = make_model(tiny_model_dir, dropout=0.0)
    queries, passages, loss_fn = batch()
    calls = []

    def sync_context(is_last):
        calls.append(is_last)
        return contextlib.nullcontext()

    grad_cache_step(lambda b, side: model(**b, side=side), split_into_mini_batches(queries, 2, 0),
                    split_into_mini_batches(passages, 5, 0), loss_fn, torch.device("cpu"),
                    sync_context=sync_context)
    assert calls == [False] * (3 + 2) + [True]


@pytest.mark.parametrize("mini_batch_size", [1, 3, 20])
def test_copies_are_encoded_once_with_the_gradients_of_every_copy(tiny_model_dir, mini_batch_size):
    model = make_model(tiny_model_dir, dropout=0.0)
    inputs = step_inputs()
    plain, expected, plain_rows = run_step(model, inputs, None)
    out, got, rows = run_step(model, inputs, mini_batch_size)
    assert plain_rows == 5 + 12
    assert rows == 2 * (4 + 10)  # no-grad pass and replay, each over the 4 distinct queries and 10 passages
    assert out.loss.item() == pytest.approx(plain.loss.item(), rel=1e-9)
    assert_same(got, expected)
    _, same, all_rows = run_step(model, inputs, mini_batch_size, deduplicate=False)
    assert all_rows == 2 * (5 + 12)
    assert_same(same, expected)


def test_negative_control_dropping_the_copies_differs(tiny_model_dir):
    """Copies are real rows and columns of the loss: a batch without them has another gradient."""
    model = make_model(tiny_model_dir, dropout=0.0)
    inputs = step_inputs()
    _, expected, _ = run_step(model, inputs, 3)
    keep = [i for i in range(12) if i not in (4, 11)]  # query 4's positive and the repeated negative
    without = {"query_ids": inputs["query_ids"][:4], "passage_ids": [inputs["passage_ids"][i] for i in keep],
               "passage_text_ids": inputs["passage_text_ids"][keep]}
    _, other, _ = run_step(model, without, 3)
    assert max_relative_difference(other, expected) > 1e-2


def span_inputs():
    """step_inputs with positive 1 pooled over tokens 2-7 only: its copy at hard negative 8 stays a
    whole-text vector, so the two are distinct texts to encode (one token sequence, two poolings)."""
    inputs = step_inputs()
    inputs["passage_pool_spans"] = [None, (2, 7)] + [None] * 10
    return inputs


@pytest.mark.parametrize("mini_batch_size", [1, 3, 20])
def test_pooling_spans_match_the_full_batch_and_stay_distinct(tiny_model_dir, mini_batch_size):
    model = make_model(tiny_model_dir, dropout=0.0, pooling="mean")
    plain, expected, _ = run_step(model, span_inputs(), None)
    out, got, rows = run_step(model, span_inputs(), mini_batch_size)
    assert rows == 2 * (4 + 11)  # the span-pooled positive 1 is not merged with its whole copy
    assert out.loss.item() == pytest.approx(plain.loss.item(), rel=1e-9)
    assert_same(got, expected)
    _, without, _ = run_step(model, step_inputs(), mini_batch_size)  # negative control: no span
    assert max_relative_difference(without, expected) > 1e-3


def test_span_pooled_vector_is_the_late_chunk_window(tiny_model_dir):
    """Training's span pooling and the evaluation's late chunking give one vector for one span, and
    both equal the mean of the encoder's own token states over the span (a brute force)."""
    from longcontrast.inference import late_chunk_embeddings

    model = make_model(tiny_model_dir, dropout=0.0, pooling="mean").float().eval()
    ids = sequences(1, 30, 31, seed=4)[0]  # 32 tokens
    with torch.no_grad():
        trained = model(**pad([ids], 0, spans=[(8, 20)]), side="passage")[0]  # (D,)
        states = model.query_encoder(input_ids=torch.tensor([ids])).last_hidden_state[0]  # (L, D)
    brute = torch.nn.functional.normalize(states[8:20].mean(dim=0), dim=0)
    windows, owner, _ = late_chunk_embeddings(model, [ids], [[(0, 8), (8, 20), (20, len(ids))]], batch_size=4,
                                              pad_token_id=0, device=torch.device("cpu"))
    torch.testing.assert_close(trained, brute)
    torch.testing.assert_close(windows[1], trained)
    assert owner == [0, 0, 0]


# Each query's own candidates in batch(): its positive, then its hard negatives (-1 pads).
CANDIDATES = torch.tensor([[0, 5, 6], [1, 7, 8], [2, 9, -1], [3, 10, 11], [4, -1, -1]])


def distillation_loss_fn(settings, teacher_scores):
    """batch()'s passages with CANDIDATES and the given teacher scores, under ``settings``."""
    labels = BatchLabels(passage_text_ids=torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 1, 8, 9, 10]),
                         candidates=CANDIDATES, teacher_scores=teacher_scores)
    return partial(training_loss, labels=labels, settings=settings)


TEACHER = torch.randn(5, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
OBJECTIVES = {  # InfoNCE with KL on three Matryoshka prefixes; pure MarginMSE
    "kl_matryoshka": LossSettings(0.05, contrastive_weight=0.5, distill_weight=1.0, teacher_temperature=0.5,
                                  matryoshka_dims=(32, 16, 8), matryoshka_weights=(1.0, 0.5, 0.25)),
    "margin_mse": LossSettings(0.05, contrastive_weight=0.0, distill_weight=1.0, distill_loss="margin_mse"),
}


@pytest.mark.parametrize("objective", list(OBJECTIVES))
@pytest.mark.parametrize("mini_batch_size", [1, 3, None])
def test_distillation_and_matryoshka_cached_equal_full_batch_with_dropout(tiny_model_dir, mini_batch_size, objective):
    model = make_model(tiny_model_dir, dropout=0.1, pooling="mean")
    loss_fn = distillation_loss_fn(OBJECTIVES[objective], TEACHER)
    out, got = run_grad_cache(model, mini_batch_size, loss_fn=loss_fn)
    ref_out, expected = run_reference(model, mini_batch_size, loss_fn=loss_fn)
    assert out.loss.item() == pytest.approx(ref_out.loss.item(), rel=1e-9)
    assert set(out.parts) == ({"contrastive", "distill"})
    assert_same(got, expected)


def test_negative_controls_teacher_scores_and_prefixes_change_the_gradient(tiny_model_dir):
    """Shuffled teacher scores, or no Matryoshka prefixes, give another gradient: the terms are live."""
    model = make_model(tiny_model_dir, dropout=0.0, pooling="mean")
    settings = OBJECTIVES["kl_matryoshka"]
    _, expected = run_grad_cache(model, 3, loss_fn=distillation_loss_fn(settings, TEACHER))
    _, shuffled = run_grad_cache(model, 3, loss_fn=distillation_loss_fn(settings, TEACHER.flip(1)))
    assert max_relative_difference(shuffled, expected) > 1e-2
    whole = dataclasses.replace(settings, matryoshka_dims=(), matryoshka_weights=())
    _, without = run_grad_cache(model, 3, loss_fn=distillation_loss_fn(whole, TEACHER))
    assert max_relative_difference(without, expected) > 1e-2
