"""Every encoder family a user may bring, as a tiny random model built offline from its config:
positions extended (or kept native), both scripts' one-step parity, saved folders that reload in
AutoModel and SentenceTransformer with the same vectors, evaluate.py on the result. Decoder
embedders (Qwen3, Llama, Gemma 3, with last-token pooling) go through the same tests."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import efficient_train
import evaluate
import origin_train
from conftest import DECODERS, FAMILY_LONG as LONG, FAMILY_POSITIONS as TRAINED, conversation_records, write_jsonl
from longcontrast import UserError
from longcontrast.batching import pad
from longcontrast.modeling import load_encoder, pool
from longcontrast.positions import position_offset, position_table, token_positions
from helpers import DOCS, item, write_set


LEARNED = ["bert", "distilbert", "electra", "roberta", "xlm-roberta", "mpnet"]
NATIVE = ["deberta-v2", "modernbert"]


@pytest.mark.parametrize("family", LEARNED)
def test_learned_tables_extend_with_their_offset(family, family_dir):
    original, _ = load_encoder(family_dir(family), dropout=0.0)
    old = position_table(original).weight.detach()
    offset = position_offset(position_table(original))
    assert offset == (2 if family in ("roberta", "xlm-roberta", "mpnet") else 0)
    model, tokenizer = load_encoder(family_dir(family), LONG, dropout=0.0)
    table = position_table(model).weight
    assert table.shape[0] == offset + LONG and table.requires_grad
    assert torch.equal(table[: offset + TRAINED], old)  # trained rows and the offset rows, bit-identical
    tokens = torch.arange(TRAINED, LONG)
    assert torch.equal(table[offset + tokens], old[offset + tokens % TRAINED])  # copy init, real positions only
    assert token_positions(model) == tokenizer.model_max_length == LONG
    assert position_table(model).padding_idx == position_table(original).padding_idx
    short = pad([[0, 20, 21, 22, 2], [0, 23, 2]], 1)
    model.eval(), original.eval()
    with torch.no_grad():  # short texts read exactly as before
        torch.testing.assert_close(model(**short).last_hidden_state, original(**short).last_hidden_state)
        longest = model(**pad([[0] + [20 + i % 30 for i in range(LONG - 2)] + [2]], 1)).last_hidden_state
    assert longest.shape[1] == LONG and torch.isfinite(longest).all()


@pytest.mark.parametrize("family", NATIVE)
def test_native_positions_are_kept_and_more_is_refused(family, family_dir, caplog):
    model, tokenizer = load_encoder(family_dir(family), None)
    assert position_table(model) is None and token_positions(model) == LONG == tokenizer.model_max_length
    with pytest.raises(UserError, match=f"--max_position_embeddings {LONG} or less"):
        load_encoder(family_dir(family), 2 * LONG)
    with caplog.at_level("INFO"):
        load_encoder(family_dir(family), 2 * LONG, strict_positions=False)  # the scripts' default: logged
    assert "natively" in caplog.text


def test_attention_falls_back_where_sdpa_is_missing(family_dir, caplog):
    with caplog.at_level("INFO"):
        mpnet, _ = load_encoder(family_dir("mpnet"))
        modernbert, _ = load_encoder(family_dir("modernbert"))
    assert mpnet.config._attn_implementation == "eager" and "not available: sdpa" in caplog.text
    assert modernbert.config._attn_implementation == "sdpa"


def family_pooling(family: str) -> str:
    return "lasttoken" if family in DECODERS else "mean" if family == "modernbert" else "cls"


def arguments(model_dir, data, out, family, *extra):
    positions = ["--max_position_embeddings", str(LONG)] if family in LEARNED else []
    return ["--model_name_or_path", model_dir, "--train_data", data, "--output_dir", str(out), *positions,
            "--query_max_len", "32", "--passage_max_len", "48", "--num_hard_negatives", "2", "--save_strategy", "no",
            "--disable_tqdm", "true", "--optim", "sgd", "--learning_rate", "1", "--lr_scheduler_type", "constant",
            "--weight_decay", "0", "--max_grad_norm", "0", "--dropout", "0", "--max_steps", "1",
            "--per_device_train_batch_size", "7", "--pooling", family_pooling(family),
            "--query_prompt", "query: ", "--passage_prompt", "passage: ", *extra]


@pytest.mark.slow  # a whole training run (or several): the full suite runs it
@pytest.mark.parametrize("family", LEARNED + NATIVE + DECODERS)
def test_family_trains_saves_reloads_and_evaluates(family, family_dir, tmp_path):
    """One SGD step of both scripts gives the same update (GradCache parity, uneven mini-batches);
    the saved folder embeds like the trained encoder in AutoModel and SentenceTransformer, with its
    prompts; evaluate.py runs on it."""
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel, AutoTokenizer

    model_dir = family_dir(family)
    data = write_jsonl(tmp_path / "d.jsonl", conversation_records(7))
    assert origin_train.main(arguments(model_dir, data, tmp_path / "o", family)) == 0
    assert efficient_train.main(arguments(model_dir, data, tmp_path / "e", family, "--mini_batch_size", "3")) == 0
    start = AutoModel.from_pretrained(model_dir).state_dict()
    origin, efficient = load_file(tmp_path / "o" / "model.safetensors"), load_file(tmp_path / "e" / "model.safetensors")
    assert origin.keys() == efficient.keys()
    same_shape = [k for k in origin if k in start and start[k].shape == origin[k].shape]
    update = torch.cat([(origin[k] - start[k]).flatten() for k in same_shape])
    difference = torch.cat([(efficient[k] - origin[k]).flatten() for k in origin])
    assert update.norm() > 0 and (difference.norm() / update.norm()).item() <= 1e-5

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "e")
    reloaded = AutoModel.from_pretrained(tmp_path / "e").eval()
    st = SentenceTransformer(str(tmp_path / "e"), device="cpu")
    assert st.prompts["query"] == "query: " and st.prompts["document"] == "passage: "
    texts = ["how can i apply for a permit", "the office"]
    batch = tokenizer(["passage: " + t for t in texts], return_tensors="pt", padding=True)
    if family in DECODERS:  # every text ends with the end token pooled on, as in training
        start_tokenizer = AutoTokenizer.from_pretrained(model_dir)
        end = start_tokenizer.eos_token_id if family != "qwen3" else start_tokenizer.pad_token_id
        lengths = batch["attention_mask"].sum(dim=1)
        assert batch["input_ids"][torch.arange(2), lengths - 1].tolist() == [end, end]
        assert st.tokenize(["a"])["input_ids"][0].tolist().count(end) == 1  # appended once, not twice
    with torch.no_grad():
        ours = pool(reloaded(**batch).last_hidden_state, batch["attention_mask"], family_pooling(family))
    torch.testing.assert_close(st.encode_document(texts, convert_to_tensor=True), ours, rtol=1e-4, atol=1e-5)

    write_set(tmp_path / "sets" / "doc2dial", [item(i, gold=i % 8) for i in range(4)], DOCS)
    out = tmp_path / "eval.json"
    assert evaluate.main(["--model_path", str(tmp_path / "e"), "--data-folder", str(tmp_path / "sets"),
                          "--eval-dataset", "doc2dial", "--output_file", str(out)]) == 0
    results = __import__("json").loads(out.read_text())["results"][str(tmp_path / "e")]
    assert results["prompts"] == {"query": "query: ", "document": "passage: "}
    assert results["doc2dial"]["num_items"] == 4


def test_explicit_positions_beyond_a_native_model_exit_2(family_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", conversation_records(7))
    argv = arguments(family_dir("modernbert"), data, tmp_path / "o", "modernbert", "--max_position_embeddings", "4096")
    with pytest.raises(SystemExit) as exit_info:
        efficient_train.main(argv)
    assert exit_info.value.code == 2 and f"--max_position_embeddings {LONG} or less" in capsys.readouterr().err
    assert not Path(tmp_path / "o").exists()
