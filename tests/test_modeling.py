import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import TINY_MAX_POSITIONS
from longcontrast.batching import pad
from longcontrast.modeling import DualEncoder, load_encoder, pool, read_pooling
from longcontrast.positions import extended_position_table

LONG = 4 * TINY_MAX_POSITIONS


def test_kept_rows_are_bit_identical_and_table_trainable(tiny_model_dir):
    original, _ = load_encoder(tiny_model_dir, max_position_embeddings=None)
    trained = original.embeddings.position_embeddings.weight.detach().clone()
    model, tokenizer = load_encoder(tiny_model_dir, max_position_embeddings=LONG)
    table = model.embeddings.position_embeddings.weight
    assert table.shape == (LONG, trained.size(1))
    assert torch.equal(table[:TINY_MAX_POSITIONS], trained)
    assert torch.isfinite(table).all()
    assert table.requires_grad and any(p is table for p in model.parameters())
    assert model.embeddings.position_ids.shape == (1, LONG)
    assert torch.equal(model.embeddings.position_ids[0], torch.arange(LONG))
    assert model.embeddings.token_type_ids.shape == (1, LONG)
    assert model.config.max_position_embeddings == LONG
    assert tokenizer.model_max_length == LONG


def test_new_rows_are_not_random():
    """Hierarchical rows carry the trained row of their offset; random rows are unrelated noise."""
    torch.manual_seed(0)
    trained = torch.randn(64, 16)
    hierarchical = extended_position_table(trained, 256, "hierarchical")
    random_rows = extended_position_table(trained, 256, "random")
    copied = extended_position_table(trained, 256, "copy")
    offsets = torch.arange(64, 256) % 64
    cos_h = F.cosine_similarity(hierarchical[64:], trained[offsets]).mean()
    cos_r = F.cosine_similarity(random_rows[64:], trained[offsets]).mean()
    assert cos_h > 0.5 and cos_r.abs() < 0.2  # i.i.d. rows: ~0.73 vs ~0
    assert torch.equal(copied[64:], trained[offsets])
    # hierarchical blocks stay distinguishable (unlike copy): position 64 + j differs from 128 + j
    assert (hierarchical[64:128] - hierarchical[128:192]).norm() > 0.1 * trained.norm()
    for table in (hierarchical, random_rows, copied):
        assert torch.equal(table[:64], trained)


@pytest.mark.parametrize("init", ["copy", "random"])
def test_rows_past_the_trained_length_receive_gradients(tiny_model_dir, init):
    """An extended table trains: a text longer than the trained positions sends gradient into the
    new rows it reads, and none into the rows past its end."""
    model, _ = load_encoder(tiny_model_dir, max_position_embeddings=LONG, position_init=init)
    length = TINY_MAX_POSITIONS + 10
    ids = torch.randint(5, 50, (1, length), generator=torch.Generator().manual_seed(0))
    hidden = model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state  # (1, L, D)
    (hidden * torch.randn_like(hidden)).sum().backward()  # a LayerNorm'd vector's plain sum has no gradient
    grad = model.embeddings.position_embeddings.weight.grad  # (LONG, D)
    read = grad[TINY_MAX_POSITIONS:length].norm(dim=1)  # the new rows this text reads
    assert (read > 0).all() and grad[length:].abs().sum() == 0


def test_unknown_position_init_rejected():
    with pytest.raises(ValueError):
        extended_position_table(torch.zeros(4, 2), 8, "sinusoid")


def test_forward_and_backward_beyond_trained_length(tiny_model_dir):
    model, _ = load_encoder(tiny_model_dir, max_position_embeddings=LONG)
    encoder = DualEncoder(model)
    ids = [[2] + [10 + i % 40 for i in range(LONG - 2)] + [3], [2, 11, 3]]
    out = encoder(**pad(ids, 0), side="passage")  # (2, D)
    # a random direction, not out.sum(): a LayerNorm'd vector with unit gains sums to a constant, whose
    # gradient is zero up to rounding
    (out @ torch.randn(out.size(1), generator=torch.Generator().manual_seed(0))).sum().backward()
    grad = model.embeddings.position_embeddings.weight.grad
    assert torch.isfinite(out).all() and grad[TINY_MAX_POSITIONS:].abs().sum() > 0


def test_save_and_reload_at_extended_length(tiny_model_dir, tmp_path):
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel

    model, tokenizer = load_encoder(tiny_model_dir, max_position_embeddings=LONG, dropout=0.0)
    encoder = DualEncoder(model, pooling="cls").eval()
    encoder.save(tmp_path / "out", tokenizer, max_seq_length=LONG, query_prompt="query: ")
    reloaded = AutoModel.from_pretrained(tmp_path / "out").eval()
    assert reloaded.config.max_position_embeddings == LONG
    ids = pad([[2] + [12] * (LONG - 2) + [3]], 0)
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded(**ids).last_hidden_state, model(**ids).last_hidden_state, rtol=1e-5, atol=1e-5
        )
    assert read_pooling(tmp_path / "out") == "cls"
    st = SentenceTransformer(str(tmp_path / "out"), device="cpu")
    text = "how can i apply"
    with torch.no_grad():
        batch = tokenizer([text], return_tensors="pt")
        ours = encoder(batch["input_ids"], batch["attention_mask"], side="passage")
    theirs = st.encode([text], convert_to_tensor=True)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    prompts = json.loads((tmp_path / "out" / "config_sentence_transformers.json").read_text())["prompts"]
    assert prompts["query"] == "query: "


def test_untied_encoders_are_saved_apart(tiny_model_dir, tmp_path):
    model, tokenizer = load_encoder(tiny_model_dir)
    encoder = DualEncoder.untied(model, pooling="mean")
    assert encoder.encoder_for("passage") is not encoder.encoder_for("query")
    encoder.save(tmp_path, tokenizer, max_seq_length=32)
    for name in ("query_encoder", "passage_encoder"):
        assert (tmp_path / name / "config.json").is_file()
        assert read_pooling(tmp_path / name) == "mean"


def test_pooling_ignores_padding():
    hidden = torch.randn(2, 4, 3)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    mean = pool(hidden, mask, "mean")
    torch.testing.assert_close(mean[0], F.normalize(hidden[0, :2].mean(0), dim=0))
    cls = pool(hidden, mask, "cls")
    torch.testing.assert_close(cls, F.normalize(hidden[:, 0], dim=-1))
    assert torch.allclose(mean.norm(dim=-1), torch.ones(2))


def test_read_pooling_of_embedded_default():
    from longcontrast.modeling import default_model_path

    assert read_pooling(default_model_path()) == "mean"
    assert read_pooling(Path("/nonexistent")) is None


def test_embedded_minilm_at_8192_positions(tmp_path):
    """The real checkpoint: extended to 8192, a 600-token forward, saved and reloaded at 8192."""
    from transformers import AutoModel

    from longcontrast.modeling import default_model_path

    original, _ = load_encoder(default_model_path(), max_position_embeddings=None)
    model, tokenizer = load_encoder(default_model_path(), max_position_embeddings=8192, dropout=0.0)
    table = model.embeddings.position_embeddings.weight
    assert table.shape[0] == 8192 and table.requires_grad
    assert torch.equal(table[:512], original.embeddings.position_embeddings.weight)
    ids = pad([[tokenizer.cls_token_id] + [2000 + i % 500 for i in range(598)] + [tokenizer.sep_token_id]], 0)
    model.eval()
    with torch.no_grad():
        hidden = model(**ids).last_hidden_state  # (1, 600, 384)
    assert hidden.shape == (1, 600, 384) and torch.isfinite(hidden).all()
    model.save_pretrained(tmp_path)
    reloaded = AutoModel.from_pretrained(tmp_path).eval()
    assert reloaded.config.max_position_embeddings == 8192
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**ids).last_hidden_state, hidden, rtol=1e-5, atol=1e-5)


def test_dropout_overrides(tiny_model_dir):
    model, _ = load_encoder(tiny_model_dir, dropout=0.2, attention_dropout=0.0)
    assert model.config.hidden_dropout_prob == 0.2 and model.config.attention_probs_dropout_prob == 0.0
    kept, _ = load_encoder(tiny_model_dir)
    assert kept.config.attention_probs_dropout_prob == 0.1  # the checkpoint's
