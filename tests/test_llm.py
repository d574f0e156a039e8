"""Decoder embedders and LoRA: last-token pooling on the right token under either padding, causal
attention kept, LoRA + GradCache equal to LoRA on the whole batch (dropout on, activation
checkpointing, two processes), bit-exact resume, adapter and merged outputs that embed alike in
sentence-transformers, half-precision base weights, and the combinations refused at start-up."""

import json
import shutil
from functools import partial
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import efficient_train
import evaluate
import origin_train
from conftest import conversation_records, write_jsonl
from longcontrast.batching import pad
from longcontrast.inference import load_retriever
from longcontrast.late_interaction import read_projection
from longcontrast.gradcache import grad_cache_step
from longcontrast.lora import add_lora
from longcontrast.loss import contrastive_loss
from longcontrast.modeling import DualEncoder, load_encoder, pool, prepare_tokenizer
from helpers import torchrun
from helpers import DOCS, item, write_set
from helpers import gradients, max_relative_difference, sequences

TEXTS = ["how can i apply for a permit", "the office", "what does it cost to renew my document proof"]
QWEN3_INSTRUCTION = "Instruct: Given a question, retrieve passages that answer it\nQuery:"


def encoder_and_tokenizer(model_dir, pooling="lasttoken"):
    encoder, tokenizer = load_encoder(model_dir, None, dropout=0.0)
    prepare_tokenizer(tokenizer, pooling)
    return encoder.eval(), tokenizer


@pytest.mark.parametrize("family", ["qwen3", "llama", "gemma3"])
def test_lasttoken_pools_the_end_token_under_right_and_left_padding(family, decoder_dir):
    """Each text pooled in a padded batch, right or left, equals the text encoded alone; the token
    pooled is the end token (Qwen3: the appended <|endoftext|>, which is also the pad token)."""
    encoder, tokenizer = encoder_and_tokenizer(decoder_dir(family))
    end = tokenizer.pad_token_id if family == "qwen3" else tokenizer.eos_token_id
    with torch.no_grad():
        alone = []
        for text in TEXTS:
            ids = tokenizer([text], return_tensors="pt")
            assert ids["input_ids"][0, -1].item() == end and ids["input_ids"][0].tolist().count(end) == 1
            alone.append(pool(encoder(**ids).last_hidden_state, ids["attention_mask"], "lasttoken"))
        alone = torch.cat(alone)  # (3, D)
        for side in ("right", "left"):
            tokenizer.padding_side = side
            batch = tokenizer(TEXTS, return_tensors="pt", padding=True)
            assert (batch["attention_mask"] == 0).any()
            pooled = pool(encoder(**batch).last_hidden_state, batch["attention_mask"], "lasttoken")
            torch.testing.assert_close(pooled, alone, rtol=1e-4, atol=1e-5)
        if family == "qwen3":  # negative control: "the last token that is not padding" is not the end token
            tokenizer.padding_side = "right"
            batch = tokenizer(TEXTS, return_tensors="pt", padding=True)
            by_id = pool(encoder(**batch).last_hidden_state, (batch["input_ids"] != tokenizer.pad_token_id).long(),
                         "lasttoken")
            assert (by_id - alone).abs().max() > 1e-2


@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_decoders_stay_causal(family, decoder_dir):
    """A token's hidden state does not depend on the tokens after it (the model is not made
    bidirectional by the encoder path)."""
    encoder, _ = encoder_and_tokenizer(decoder_dir(family))
    ids = torch.tensor([[5, 20, 21, 22, 23, 24, 25]])
    with torch.no_grad():
        short = encoder(input_ids=ids[:, :4], attention_mask=torch.ones(1, 4, dtype=torch.long)).last_hidden_state
        long = encoder(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
    torch.testing.assert_close(long[:, :4], short, rtol=1e-5, atol=1e-6)


def test_a_missing_pad_token_is_set_and_logged(decoder_dir, caplog):
    _, tokenizer = load_encoder(decoder_dir("llama"), None)
    assert tokenizer.pad_token_id is None
    with caplog.at_level("INFO"):
        prepare_tokenizer(tokenizer, "lasttoken")
    assert tokenizer.pad_token == "</s>" and "no pad token" in caplog.text and "appending '</s>'" in caplog.text


def lora_model(model_dir, *, dropout=0.1, checkpointing=False):
    """A float64 DualEncoder with LoRA adapters whose B matrices are random (peft starts them at
    zero, which would leave the A matrices without a gradient in the first step)."""
    torch.manual_seed(0)
    encoder, _ = load_encoder(model_dir, None, dropout=0.0)
    encoder = add_lora(encoder.double(), base_path=model_dir, r=4, alpha=8, dropout=dropout)
    for name, parameter in encoder.named_parameters():
        if "lora_B" in name:
            parameter.data.normal_(std=0.1)
    model = DualEncoder(encoder, "lasttoken").train()
    if checkpointing:
        model.activation_checkpointing_enable()
    return model


def lora_step(model, mini_batch_size, *, cached=True, seed=123):
    """Adapter gradients of one contrastive batch: GradCache over mini-batches, or (cached=False)
    the same mini-batches encoded with autograd from the same seed (the masks GradCache draws) and
    one backward through everything."""
    queries, passages = sequences(5, 3, 20, seed=1), sequences(12, 5, 40, seed=2)
    size = mini_batch_size or 12
    query_batches = [pad(queries[i: i + size], 0) for i in range(0, 5, size)]
    passage_batches = [pad(passages[i: i + size], 0) for i in range(0, 12, size)]
    loss_fn = partial(contrastive_loss, temperature=0.05)
    model.zero_grad()
    torch.manual_seed(seed)
    if cached:
        grad_cache_step(lambda b, side: model(**b, side=side), query_batches, passage_batches, loss_fn,
                        torch.device("cpu"))
    else:
        q = torch.cat([model(**b, side="query") for b in query_batches])
        p = torch.cat([model(**b, side="passage") for b in passage_batches])
        loss_fn(q, p).loss.backward()
    found = gradients(model)
    assert found and all("lora_" in name for name in found)
    return found


@pytest.mark.parametrize("mini_batch_size", [1, 3, None])
def test_lora_gradcache_with_dropout_equals_the_full_batch(decoder_dir, mini_batch_size):
    model = lora_model(decoder_dir("qwen3"), dropout=0.1)
    expected = lora_step(model, mini_batch_size, cached=False)
    assert max_relative_difference(lora_step(model, mini_batch_size), expected) < 1e-9
    assert max_relative_difference(lora_step(model, mini_batch_size, seed=7), expected) > 1e-3  # other masks


def test_activation_checkpointing_in_the_replay_keeps_lora_gradients_exact(decoder_dir):
    """Non-reentrant checkpointing inside GradCache's replay recomputes with the replay's dropout
    masks: the gradients equal those without checkpointing."""
    expected = lora_step(lora_model(decoder_dir("qwen3")), 3)
    got = lora_step(lora_model(decoder_dir("qwen3"), checkpointing=True), 3)
    assert max_relative_difference(got, expected) < 1e-9


def test_similarities_stay_float32_under_bf16_autocast():
    """At temperature 0.01 bf16 logits sit on a grid 0.5 apart: the loss computes them in float32
    even inside an autocast region (negative control: the same product under autocast differs)."""
    g = torch.Generator().manual_seed(0)
    queries = torch.nn.functional.normalize(torch.randn(6, 64, generator=g), dim=-1)
    passages = torch.nn.functional.normalize(torch.randn(12, 64, generator=g), dim=-1)
    expected = contrastive_loss(queries, passages, 0.01).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = contrastive_loss(queries, passages, 0.01).loss
        naive = torch.nn.functional.cross_entropy(queries @ passages.T / 0.01, torch.arange(6))
    assert got.dtype == torch.float32 and abs(got.item() - expected.item()) < 1e-5
    assert abs(naive.float().item() - expected.item()) > 1e-3


def lora_arguments(model_dir, data, out, *extra, pooling="lasttoken"):
    return ["--model_name_or_path", model_dir, "--train_data", data, "--output_dir", str(out),
            "--query_max_len", "32", "--passage_max_len", "48", "--num_hard_negatives", "2", "--save_strategy", "no",
            "--disable_tqdm", "true", "--optim", "sgd", "--learning_rate", "1", "--lr_scheduler_type", "constant",
            "--weight_decay", "0", "--max_grad_norm", "0", "--dropout", "0", "--max_steps", "1",
            "--per_device_train_batch_size", "7", "--pooling", pooling, "--lora_r", "4", *extra]


def adapter_update(folder) -> tuple[torch.Tensor, dict]:
    weights = load_file(folder / "adapter_model.safetensors")
    return torch.cat([w.flatten() for _, w in sorted(weights.items())]), weights


@pytest.mark.parametrize("family", ["qwen3", "llama", "bert"])
def test_lora_efficient_step_equals_origin_step(family, decoder_dir, tiny_model_dir, tmp_path):
    """One SGD step on the adapters: GradCache in uneven mini-batches = the whole batch with
    autograd (relative 1e-5, float32); only adapter weights are saved, all of them moved."""
    model_dir = tiny_model_dir if family == "bert" else decoder_dir(family)
    pooling = "cls" if family == "bert" else "lasttoken"
    data = write_jsonl(tmp_path / "d.jsonl", conversation_records(7))
    assert origin_train.main(lora_arguments(model_dir, data, tmp_path / "o", pooling=pooling)) == 0
    assert efficient_train.main(lora_arguments(model_dir, data, tmp_path / "e", "--mini_batch_size", "3",
                                               pooling=pooling)) == 0
    (origin, weights), (efficient, _) = adapter_update(tmp_path / "o"), adapter_update(tmp_path / "e")
    assert weights and all("lora_" in k for k in weights) and not (tmp_path / "e" / "model.safetensors").exists()
    assert not any("pooler" in k for k in weights)  # the unused pooler gets no adapter
    b = torch.cat([w.flatten() for k, w in sorted(weights.items()) if "lora_B" in k])
    assert b.abs().max() > 0  # B starts at zero: the step moved it
    assert ((efficient - origin).norm() / origin.norm()).item() <= 1e-5


def test_lora_late_interaction_step_equals_origin_step(decoder_dir, tmp_path):
    """LoRA with --colbert_dim: the adapters and the token projection make the same SGD step under
    GradCache's uneven mini-batches as with autograd over the whole batch; the folder holds the
    adapter and PyLate's projection, and reads back as a late-interaction model."""
    data = write_jsonl(tmp_path / "d.jsonl", conversation_records(7))
    args = partial(lora_arguments, decoder_dir("qwen3"), data, pooling="lasttoken")
    assert origin_train.main(args(tmp_path / "o", "--colbert_dim", "16")) == 0
    assert efficient_train.main(args(tmp_path / "e", "--colbert_dim", "16", "--mini_batch_size", "3")) == 0
    (origin, weights), (efficient, _) = adapter_update(tmp_path / "o"), adapter_update(tmp_path / "e")
    assert all("lora_" in k for k in weights) and not (tmp_path / "e" / "model.safetensors").exists()
    assert max(w.abs().max() for k, w in weights.items() if "lora_B" in k) > 0  # B starts at zero: MaxSim moved it
    assert ((efficient - origin).norm() / origin.norm()).item() <= 1e-5
    projection_o, projection_e = (read_projection(tmp_path / name).weight for name in ("o", "e"))
    assert ((projection_e - projection_o).norm() / projection_o.norm()).item() <= 1e-5
    model, _ = load_retriever(str(tmp_path / "e"))
    assert model.projection is not None and model.projection.out_features == 16


@pytest.mark.slow
@pytest.mark.parametrize("sharding", [[], ["--fsdp", "--activation_checkpointing"]], ids=["ddp", "fsdp2"])
def test_lora_under_two_processes_equals_one_process(sharding, decoder_dir, tmp_path):
    """Two processes, DDP or FSDP2 (the frozen decoder and its adapters sharded, activation
    checkpointing inside the replays), make the adapter update of one process with the whole batch."""
    data = write_jsonl(tmp_path / "d.jsonl", conversation_records(24))
    model_dir = decoder_dir("qwen3")
    common = ["--max_steps", "2", "--mini_batch_size", "2", "--lora_dropout", "0"]
    stderr = torchrun("efficient_train.py", *lora_arguments(model_dir, data, tmp_path / "ddp", *common, *sharding,
                                                            "--per_device_train_batch_size", "3"))
    assert "contrastive batch 3 x 2 device(s)" in stderr
    assert efficient_train.main(lora_arguments(model_dir, data, tmp_path / "one", *common,
                                               "--per_device_train_batch_size", "6")) == 0
    (one, _), (ddp, _) = adapter_update(tmp_path / "one"), adapter_update(tmp_path / "ddp")
    assert ((ddp - one).norm() / one.norm()).item() <= 1e-5


@pytest.mark.slow
def test_decoder_full_fine_tuning_sharded_over_two_processes_equals_one_process(decoder_dir, tmp_path):
    """A tiny Qwen3, every weight trained: two processes under FSDP2 (each holding half of every
    parameter) make the SGD update of one process with the whole batch; the gathered model is saved whole."""
    data = write_jsonl(tmp_path / "d.jsonl", conversation_records(24))
    model_dir = decoder_dir("qwen3")
    argv = [a for a in lora_arguments(model_dir, data, "OUT", "--max_steps", "2", "--mini_batch_size", "2")
            if a not in ("--lora_r", "4")]
    torchrun("efficient_train.py", *[str(tmp_path / "fsdp") if a == "OUT" else a for a in argv], "--fsdp",
             "--per_device_train_batch_size", "3")
    assert efficient_train.main([str(tmp_path / "one") if a == "OUT" else a for a in argv]
                                + ["--per_device_train_batch_size", "6"]) == 0
    start = load_file(next(Path(model_dir).glob("*.safetensors")))
    one, fsdp = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "fsdp" / "model.safetensors")
    assert one.keys() == fsdp.keys() == start.keys()
    moved = torch.cat([(one[k] - start[k]).flatten() for k in start])
    difference = torch.cat([(fsdp[k] - one[k]).flatten() for k in start])
    assert moved.norm() > 0 and (difference.norm() / moved.norm()).item() <= 1e-5


@pytest.mark.slow  # a whole training run (or several): the full suite runs it
def test_lora_resume_is_bit_exact_and_checkpoints_hold_the_adapter_only(decoder_dir, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", conversation_records(12))
    argv = ["--max_steps", "5", "--per_device_train_batch_size", "4", "--lora_dropout", "0.1", "--optim", "adamw_torch",
            "--learning_rate", "1e-3", "--save_strategy", "steps", "--save_steps", "1", "--save_total_limit", "10",
            "--mini_batch_size", "3"]
    model_dir = decoder_dir("llama")
    assert efficient_train.main(lora_arguments(model_dir, data, tmp_path / "full", *argv)) == 0
    saved = load_file(tmp_path / "full" / "checkpoint-3" / "model.safetensors")
    assert saved and all("lora_" in k for k in saved)
    shutil.copytree(tmp_path / "full" / "checkpoint-3", tmp_path / "resumed" / "checkpoint-3")
    assert efficient_train.main(lora_arguments(model_dir, data, tmp_path / "resumed", *argv, "--resume_from_checkpoint",
                                               str(tmp_path / "resumed" / "checkpoint-3"))) == 0
    (_, full), (_, resumed) = adapter_update(tmp_path / "full"), adapter_update(tmp_path / "resumed")
    assert full.keys() == resumed.keys() and all(torch.equal(full[k], resumed[k]) for k in full)


def test_adapter_and_merged_outputs_embed_alike(decoder_dir, tmp_path):
    """--merge_lora: a plain model in the output folder, the adapter in adapter/; both load in
    SentenceTransformer (the adapter onto its base) and AutoModel and embed like the trained model;
    the Qwen3-Embedding instruction is the saved query prompt; evaluate.py reads the adapter folder."""
    from peft import PeftModel
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel

    model_dir = decoder_dir("qwen3")
    data = write_jsonl(tmp_path / "d.jsonl", conversation_records(7))
    out = tmp_path / "out"
    assert efficient_train.main(lora_arguments(model_dir, data, out, "--merge_lora", "--learning_rate", "0.5",
                                               "--query_prompt", QWEN3_INSTRUCTION)) == 0
    assert (out / "model.safetensors").exists() and not (out / "adapter_config.json").exists()
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == model_dir

    trained = PeftModel.from_pretrained(AutoModel.from_pretrained(model_dir), str(out / "adapter")).eval()
    encoder, tokenizer = encoder_and_tokenizer(model_dir)
    batch = tokenizer(TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = pool(trained(**batch).last_hidden_state, batch["attention_mask"], "lasttoken")
        untrained = pool(encoder(**batch).last_hidden_state, batch["attention_mask"], "lasttoken")
    assert (expected - untrained).abs().max() > 1e-3  # the adapter changed the model
    for folder in (out, out / "adapter"):
        st = SentenceTransformer(str(folder), device="cpu")
        assert st.prompts["query"] == QWEN3_INSTRUCTION
        torch.testing.assert_close(st.encode(TEXTS, convert_to_tensor=True), expected, rtol=0, atol=1e-5)
        automodel = AutoModel.from_pretrained(folder).eval()
        with torch.no_grad():
            got = pool(automodel(**batch).last_hidden_state, batch["attention_mask"], "lasttoken")
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)

    write_set(tmp_path / "sets" / "doc2dial", [item(i, gold=i % 8) for i in range(4)], DOCS)
    result = tmp_path / "eval.json"
    assert evaluate.main(["--model_path", str(out / "adapter"), "--data-folder", str(tmp_path / "sets"),
                          "--eval-dataset", "doc2dial", "--output_file", str(result)]) == 0
    assert json.loads(result.read_text())["results"][str(out / "adapter")]["doc2dial"]["num_items"] == 4


def test_half_precision_base_weights_with_float32_adapters(decoder_dir, tmp_path, caplog):
    data = write_jsonl(tmp_path / "d.jsonl", conversation_records(7))
    with caplog.at_level("INFO"):
        assert efficient_train.main(lora_arguments(decoder_dir("qwen3"), data, tmp_path / "o", "--torch_dtype",
                                                   "bfloat16", "--mini_batch_size", "3")) == 0
    assert "bfloat16 weights, LoRA r=4" in caplog.text
    _, weights = adapter_update(tmp_path / "o")
    assert all(w.dtype == torch.float32 for w in weights.values())
    assert json.loads((tmp_path / "o" / "training_args.json").read_text())["torch_dtype"] == "bfloat16"


@pytest.mark.parametrize("extra, message", [
    (["--deepspeed", "ds.json"], "--deepspeed is not supported by efficient_train.py"),
    (["--fsdp", "full_shard"], "--fsdp shards the model over processes: launch with torchrun"),
    (["--torch_dtype", "bfloat16"], "full fine-tuning keeps float32 weights"),
    (["--merge_lora"], "--merge_lora without --lora_r"),
    (["--lora_r", "4", "--untie_encoders"], "--lora_r with --untie_encoders"),
    (["--lora_r", "4", "--trainable_parameters", "positions"], "--lora_r with --trainable_parameters"),
    (["--lora_r", "4", "--max_position_embeddings", "128"], "the extended position table is not part of the base"),
    (["--lora_r", "4", "--lora_target_modules", "no_such_layer"], "LoRA: "),
    (["--lora_r", "4", "--activation_checkpointing", "--activation_checkpointing_kwargs", '{"use_reentrant": true}'],
     "reentrant activation checkpointing"),
    (["--lora_r", "4", "--torch_dtype", "bfloat16", "--lora_modules_to_save", "pooler"], "needs mixed precision"),
])
def test_refused_combinations_exit_2_with_one_line(extra, message, tiny_model_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", conversation_records(4))
    argv = ["--model_name_or_path", tiny_model_dir, "--train_data", data, "--output_dir", str(tmp_path / "o"),
            "--max_steps", "1", "--save_strategy", "no", "--query_max_len", "32", "--passage_max_len", "48", *extra]
    with pytest.raises(SystemExit) as exit_info:
        efficient_train.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and "Traceback" not in err
    lines = err.strip().splitlines()  # (transformers' loading bar may come first)
    assert lines[-1].startswith("error: ") and sum(line.startswith("error:") for line in lines) == 1
    assert not (tmp_path / "o").exists()


def test_evaluate_loads_half_precision_weights(decoder_dir, tmp_path):
    """evaluate.py --torch_dtype bfloat16: the weights load in bf16 (an 8B embedder in half the memory)
    and the metrics stay those of the float32 model within bf16 rounding."""
    write_set(tmp_path / "sets" / "doc2dial", [item(i, gold=i % 8) for i in range(8)], DOCS)
    model_dir = decoder_dir("qwen3")
    results = {}
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / f"{dtype}.json"
        assert evaluate.main(["--model_path", model_dir, "--data-folder", str(tmp_path / "sets"), "--pooling",
                              "lasttoken", "--eval-dataset", "doc2dial", "--torch_dtype", dtype,
                              "--output_file", str(out)]) == 0
        results[dtype] = json.loads(out.read_text())["results"][model_dir]["doc2dial"]
    assert abs(results["bfloat16"]["mrr@20"] - results["float32"]["mrr@20"]) <= 15  # 8 items: one rank swap moves ~10


def test_load_retriever_honours_the_dtype(decoder_dir):
    from longcontrast.inference import load_retriever

    model, _ = load_retriever(decoder_dir("qwen3"), pooling="lasttoken", dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16
    model, _ = load_retriever(decoder_dir("qwen3"), pooling="lasttoken")
    assert next(model.parameters()).dtype == torch.float32
