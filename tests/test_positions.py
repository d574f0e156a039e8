"""Position extension inits and shifted position ids (PoSE): the ids, the draws, and GradCache
parity with shifts on (cached == full-batch gradients), with negative controls."""

import json

import pytest
import torch
from safetensors.torch import load_file

import efficient_train
from conftest import TINY_MAX_POSITIONS, conversation_records, write_jsonl
from longcontrast.collator import ContrastiveCollator
from longcontrast.batching import pad
from longcontrast.gradcache import grad_cache_step
from longcontrast.modeling import DualEncoder, load_encoder
from longcontrast.positions import draw_position_shifts, extended_position_table, position_ids
from helpers import assert_same, batch, gradients, max_relative_difference, run_step, step_inputs

LONG = 4 * TINY_MAX_POSITIONS


def test_interpolate_keeps_the_trained_rows_and_spreads_them_over_the_new_ones():
    torch.manual_seed(0)
    trained = torch.randn(64, 8)
    table = extended_position_table(trained, 64 * 16, "interpolate")
    assert torch.equal(table[:64], trained)
    torch.testing.assert_close(table[-1], trained[-1])
    # row p reads the trained table at p * 63 / 1023: 1023 / 63 = 16.24 rows per trained row
    p = 15 * 1023 // 63 + 1  # between trained rows 15 and 16
    where = p * 63 / 1023
    torch.testing.assert_close(table[p], trained[15] + (where - 15) * (trained[16] - trained[15]))
    assert (table[64:] - trained[torch.arange(64, 1024) % 64]).norm() > 1  # not a copy


def test_interpolate_all_stretches_the_whole_table():
    torch.manual_seed(0)
    trained = torch.randn(5, 3)
    table = extended_position_table(trained, 17, "interpolate_all")  # trained row i lands at 4 i
    torch.testing.assert_close(table[::4], trained)
    torch.testing.assert_close(table[2], (trained[0] + trained[1]) / 2)
    assert not torch.equal(table[:5], trained)  # short texts read other rows: documented


def test_position_ids_keep_cls_at_zero_and_shift_the_rest():
    ids = position_ids([4, 2], 5, [10, 0])
    assert ids.tolist() == [[0, 11, 12, 13, 0], [0, 1, 0, 0, 0]]


def test_drawn_shifts_fill_the_table_and_never_overflow_it():
    generator = torch.Generator().manual_seed(0)
    lengths = [1, 7, 30, 64] * 500
    shifts = draw_position_shifts(lengths, 64, generator)
    assert all(0 <= s and s + n - 1 <= 63 for s, n in zip(shifts, lengths))  # last token at most at 63
    assert max(s for s, n in zip(shifts, lengths) if n == 7) == 57 and min(shifts) == 0  # both ends reached
    assert set(draw_position_shifts([64, 80], 64, generator)) == {0}  # no room: no shift


def test_shift_zero_reads_as_before_and_a_shift_reads_other_rows(tiny_model_dir):
    encoder, _ = load_encoder(tiny_model_dir, LONG, dropout=0.0)
    model = DualEncoder(encoder.eval(), "mean")
    texts = [[2, 20, 21, 22, 23, 3], [2, 24, 3]]
    with torch.no_grad():
        plain = model(**pad(texts, 0), side="passage")
        zero = model(**pad(texts, 0, shifts=[0, 0]), side="passage")
        copied = model(**pad(texts, 0, shifts=[TINY_MAX_POSITIONS, TINY_MAX_POSITIONS]), side="passage")
        encoder.embeddings.position_embeddings.weight[TINY_MAX_POSITIONS:].normal_(0, 0.3)  # as after training
        moved = model(**pad(texts, 0, shifts=[TINY_MAX_POSITIONS, TINY_MAX_POSITIONS]), side="passage")
    torch.testing.assert_close(zero, plain, rtol=0, atol=1e-6)
    torch.testing.assert_close(copied, plain, rtol=0, atol=1e-6)  # copy init: one block on, the same rows
    assert (moved - plain).abs().max() > 1e-2


def test_collator_draws_one_shift_per_distinct_passage(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = [{"query": "q", "positive": "the fee", "negatives": ["the office", "the fee"]},
            {"query": "r", "positive": "the office", "negatives": ["the fee"]}]
    torch.manual_seed(0)
    out = ContrastiveCollator(tokenizer, 8, 16, 2, max_positions=LONG)(rows)
    texts = [tuple(ids) for ids in out["passage_ids"]]  # fee, office, office, fee, fee
    shifts = out["passage_position_shifts"]
    assert len(shifts) == len(texts) == 5
    assert len({(t, s) for t, s in zip(texts, shifts)}) == len(set(texts)) == 2  # copies share their shift
    assert all(s + len(t) <= LONG for t, s in zip(texts, shifts))
    assert "passage_position_shifts" not in ContrastiveCollator(tokenizer, 8, 16, 2)(rows)


def shifted_model(tiny_model_dir, dropout):
    torch.manual_seed(0)
    encoder, _ = load_encoder(tiny_model_dir, LONG, dropout=dropout)
    with torch.no_grad():  # new rows unlike the trained ones, as after training: shifts then matter
        encoder.embeddings.position_embeddings.weight[TINY_MAX_POSITIONS:].normal_(0, 0.3)
    return DualEncoder(encoder.double(), "mean").train()


def shifts_for(passages, seed=5):
    return draw_position_shifts([len(p) for p in passages], LONG, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("mini_batch_size", [1, 3, 20])  # 1, uneven, whole batch
def test_shifted_gradcache_equals_the_plain_full_batch(tiny_model_dir, mini_batch_size):
    model = shifted_model(tiny_model_dir, dropout=0.0)
    inputs = step_inputs()  # copies on both sides
    unique = {tuple(p): s for p, s in zip(inputs["passage_ids"], shifts_for(inputs["passage_ids"]))}
    inputs["passage_position_shifts"] = [unique[tuple(p)] for p in inputs["passage_ids"]]  # as the collator does
    plain, expected, _ = run_step(model, inputs, None)
    out, got, _ = run_step(model, inputs, mini_batch_size)
    assert out.loss.item() == pytest.approx(plain.loss.item(), rel=1e-9)
    assert_same(got, expected)
    inputs["passage_position_shifts"] = [0] * len(inputs["passage_ids"])  # negative control: no shift
    _, unshifted, _ = run_step(model, inputs, mini_batch_size)
    assert max_relative_difference(unshifted, expected) > 1e-2


@pytest.mark.parametrize("mini_batch_size", [1, 3, None])
def test_shifted_gradcache_with_dropout_equals_the_full_batch_with_the_same_masks(tiny_model_dir, mini_batch_size):
    """Dropout on: the replay re-reads each mini-batch's own position ids under its recorded RNG state."""
    model = shifted_model(tiny_model_dir, dropout=0.1)
    queries, passages, loss_fn = batch()
    shifts = shifts_for(passages)
    size = mini_batch_size or len(passages)
    query_batches = [pad(queries[i : i + size], 0) for i in range(0, len(queries), size)]
    passage_batches = [pad(passages[i : i + size], 0, shifts=shifts[i : i + size]) for i in range(0, len(passages), size)]

    def cached(seed=123):
        model.zero_grad()
        torch.manual_seed(seed)
        grad_cache_step(lambda b, side: model(**b, side=side), query_batches, passage_batches, loss_fn,
                        torch.device("cpu"))
        return gradients(model)

    model.zero_grad()
    torch.manual_seed(123)
    q = torch.cat([model(**b, side="query") for b in query_batches])
    p = torch.cat([model(**b, side="passage") for b in passage_batches])
    loss_fn(q, p).loss.backward()
    expected = gradients(model)
    assert_same(cached(), expected)
    assert max_relative_difference(cached(seed=7), expected) > 1e-3  # negative control: other masks


def train(tiny_model_dir, tmp_path, *extra):
    data = write_jsonl(tmp_path / "train.jsonl", conversation_records(8))
    out = tmp_path / "out"
    argv = ["--model_name_or_path", tiny_model_dir, "--train_data", data, "--output_dir", str(out),
            "--max_position_embeddings", str(LONG), "--query_max_len", "32", "--passage_max_len", "48",
            "--save_strategy", "no", "--disable_tqdm", "true", "--max_steps", "2", "--learning_rate", "1e-2",
            "--per_device_train_batch_size", "4", *extra]
    assert efficient_train.main(argv) == 0
    return out


@pytest.mark.parametrize("trainable, init, kept, untie", [
    ("positions", "copy", False, False), ("new_positions", "copy", True, False),
    ("new_positions", "interpolate_all", False, False), ("new_positions", "copy", True, True)])
def test_positions_only_training_moves_only_the_position_table(tiny_model_dir, tmp_path, trainable, init, kept, untie):
    """positions moves the whole table and nothing else; new_positions only the rows it added (the
    trained rows stay bit-identical, which positions, the negative control, does not keep), and
    after interpolate_all, which moved every row, the whole table. Untied, both encoders keep
    their trained rows (the freeze is applied to each, not lost when the passage encoder is copied)."""
    out = train(tiny_model_dir, tmp_path, "--shift_positions", "--trainable_parameters", trainable,
                "--position_init", init, *(["--untie_encoders"] if untie else []))
    start, _ = load_encoder(tiny_model_dir, LONG, position_init=init, dropout=0.0)
    before = start.state_dict()
    key = "embeddings.position_embeddings.weight"
    for folder in (["query_encoder", "passage_encoder"] if untie else [""]):
        after = load_file(out / folder / "model.safetensors")
        if folder != "query_encoder":  # (short, unshifted queries never read the new rows)
            assert not torch.equal(after[key][TINY_MAX_POSITIONS:], before[key][TINY_MAX_POSITIONS:])
        assert torch.equal(after[key][:TINY_MAX_POSITIONS], before[key][:TINY_MAX_POSITIONS]) == kept, folder
        for name, value in after.items():
            if name != key:
                assert torch.equal(value, before[name]), name
    recorded = json.loads((out / "training_args.json").read_text())
    assert recorded["shift_positions"] is True and recorded["trainable_parameters"] == trainable


@pytest.mark.parametrize("extra, message", [
    (["--weight_decay", "0.01"], "use --weight_decay 0"),
    (["--max_position_embeddings", str(TINY_MAX_POSITIONS)], "it was not extended"),
])
def test_new_positions_refuses_what_would_move_the_trained_rows(tiny_model_dir, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as exit_:
        train(tiny_model_dir, tmp_path, "--trainable_parameters", "new_positions", *extra)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_shifting_needs_a_learned_table(family_dir, tmp_path, capsys):  # noqa: F811 (the imported fixture)
    """A rotary model (ModernBERT) has no table to shift into: one clear error."""
    data = write_jsonl(tmp_path / "train.jsonl", conversation_records(4))
    with pytest.raises(SystemExit) as exit_:
        efficient_train.main(["--model_name_or_path", family_dir("modernbert"), "--train_data", data, "--output_dir",
                              str(tmp_path / "out"), "--shift_positions", "--query_max_len", "32",
                              "--passage_max_len", "48"])
    assert exit_.value.code == 2
    assert "--shift_positions: a learned position table is needed" in capsys.readouterr().err
