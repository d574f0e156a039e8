"""What several test modules share (a test module never imports another): training-script flags
and weights, a torchrun launcher, evaluation sets written to disk, GradCache's reference batch and
gradient comparisons, and the evaluation shorthands (one model on one set through the package's
harness, its result in the JSON layout ``evaluate.py`` writes)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from longcontrast.batching import pad
from longcontrast.evaluation import ModelResults, evaluate
from longcontrast.loss import LossSettings, contrastive_loss
from longcontrast.modeling import DualEncoder, load_encoder
from longcontrast.retrieval_sets import ChatRAGSet, CorpusSet
from longcontrast.retrievers import DenseRetriever, EncodeSettings
from longcontrast.step import contrastive_step

ROOT = Path(__file__).resolve().parents[1]


@dataclass(kw_only=True)
class EvalConfig:
    """The reading settings a test picks (tokens, batch) and the readings it asks for."""

    query_max_len: int = 256
    passage_max_len: int = 1024
    batch_size: int = 8
    passage_window: int | None = None
    late_chunking: bool = False
    qrecc_answer_rule: bool = True

    def retriever(self, model, tokenizer, **kwargs) -> DenseRetriever:
        settings = EncodeSettings(query_max_len=self.query_max_len, passage_max_len=self.passage_max_len,
                                  batch_size=self.batch_size, query_prompt=getattr(model, "prompts", {}).get("query", ""),
                                  passage_prompt=getattr(model, "prompts", {}).get("document", ""))
        return DenseRetriever(model, tokenizer, settings, window=self.passage_window, late_chunking=self.late_chunking,
                              **kwargs)


def evaluate_dataset(model, tokenizer, folder: str, dataset: str, config: EvalConfig, device=None) -> dict:
    """A ChatRAG-layout set's results: the whole reading with the others (``maxp@W``, ``late@W``) nested."""
    data = ChatRAGSet.load(folder, dataset, qrecc_answer_rule=config.qrecc_answer_rule)
    return ModelResults({dataset: evaluate(config.retriever(model, tokenizer), data)}).to_json()[dataset]


def evaluate_beir(model, tokenizer, beir, config: EvalConfig, device=None, **kwargs) -> dict:
    """A BEIR folder's results (``beir``: a :class:`.readers.BeirSet` or its folder): the whole
    reading, or with ``passage_window`` the MaxP reading."""
    data = CorpusSet(str(Path(beir.corpus_file).parent) if hasattr(beir, "corpus_file") else beir)
    readings = evaluate(config.retriever(model, tokenizer, **{"use_faiss": False, **kwargs}), data)
    return readings[f"maxp@{config.passage_window}" if config.passage_window else "whole"].to_json()


# the training scripts: common flags, saved weights, error exits
def common(model_dir, data, out, *extra):
    return ["--model_name_or_path", model_dir, "--train_data", data, "--output_dir", str(out),
            "--max_position_embeddings", "128", "--query_max_len", "32", "--passage_max_len", "48",
            "--per_device_train_batch_size", "6", "--num_hard_negatives", "2", "--save_strategy", "no",
            "--disable_tqdm", "true", *extra]


def weights(folder):
    return load_file(Path(folder) / "model.safetensors")


def update(model_dir, folder) -> torch.Tensor:
    """The flattened change of the encoder's weights from ``model_dir`` to the trained ``folder``
    (the position table grows, so it is left out)."""
    from transformers import AutoModel

    start, trained = AutoModel.from_pretrained(model_dir).state_dict(), weights(folder)
    keys = [k for k in trained if k in start and "position_embeddings" not in k]
    return torch.cat([(trained[k] - start[k]).flatten() for k in keys])


def run_main(module, argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        module.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert "Traceback" not in err
    return err


def data_script(name: str):
    """A script of data/ (``data/<name>.py``) imported as a module, to call its ``main``."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "data" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# several processes


WORLD = 2


ENV = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")


def torchrun(*args, timeout=180) -> str:
    """Run ``torchrun --standalone --nproc_per_node 2 ARGS``; returns its stderr. On a timeout the
    whole process group (launcher and workers) is killed."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD),
               *map(str, args)]
    process = subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # torchrun's workers may sit in process groups of their own and hold the pipes open
        for child in psutil.Process(process.pid).children(recursive=True):
            child.kill()
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"torchrun timed out after {timeout} s: {stderr[-3000:]}")
    assert process.returncode == 0, stdout[-3000:] + stderr[-3000:]
    return stderr


# evaluation sets on disk
def write_set(folder, items, documents):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "test.json").write_text(json.dumps(items))
    (folder / "documents.json").write_text(json.dumps(documents))


def item(i, doc="d", gold=0, answers=("the answer",)):
    messages = [{"role": "user", "content": f"how can i apply {i}"}, {"role": "assistant", "content": "at the office"},
                {"role": "user", "content": f"what does it cost {i}"}]
    return {"id": f"x{i}", "messages": messages, "document": doc, "ground_truth_ctx": {"index": gold}, "answers": list(answers)}


DOCS = {"d": [f"the fee of permit {i} is {i} and the office is open {i} days" for i in range(8)]}



def write_beir(folder, corpus, queries, qrels, split="test"):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in corpus))
    (folder / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    (folder / "qrels").mkdir(exist_ok=True)
    (folder / "qrels" / f"{split}.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t{s}\n" for q, d, s in qrels))
    return str(folder)


# GradCache: a reference batch, the step under test, gradient comparisons
def split_into_mini_batches(sequences, size, pad_token_id):
    """Consecutive mini-batches of ``size`` texts (None: one), each padded to its own longest."""
    size = size or len(sequences)
    return [pad(sequences[i : i + size], pad_token_id) for i in range(0, len(sequences), size)]


NUM_QUERIES, NUM_PASSAGES = 5, 12  # 5 positives + 7 hard negatives (uneven per query)


def sequences(count, low, high, seed):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, high, (count,), generator=g)
    return [[2] + torch.randint(5, 60, (int(n),), generator=g).tolist() + [3] for n in lengths]


def make_model(model_dir, dropout, untie=False, pooling="cls"):
    torch.manual_seed(0)
    encoder, _ = load_encoder(model_dir, max_position_embeddings=None, dropout=dropout)
    # float64: the parity checks then test the mathematics, not float32 rounding (a random tiny
    # model maps all texts to nearly the same vector, which makes float32 gradients noisy).
    return (DualEncoder.untied if untie else DualEncoder)(encoder.double(), pooling).train()


def batch():
    queries = sequences(NUM_QUERIES, 3, 20, seed=1)
    passages = sequences(NUM_PASSAGES, 5, 40, seed=2)
    passages[8] = list(passages[1])  # a hard negative identical to query 1's positive
    text_ids = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 1, 8, 9, 10])
    return queries, passages, partial(contrastive_loss, temperature=0.05, passage_text_ids=text_ids)


def gradients(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(a, b, rtol=1e-9):
    """Equal up to float64 rounding. Some gradients are zero in exact arithmetic (attention key
    biases: softmax ignores a shift shared by all keys), so the tolerance is relative to the
    largest gradient as well as to each entry."""
    assert a.keys() == b.keys() and a
    scale = max(g.abs().max().item() for g in b.values())
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=rtol, atol=rtol * scale)


def max_relative_difference(a, b):
    return max(((a[n] - b[n]).norm() / b[n].norm().clamp(min=1e-12)).item() for n in a)


def step_inputs():
    """A collator-style batch with copies on both sides: query 4 repeats query 2, hard negative 8
    repeats positive 1 (masked by the loss) and hard negative 11 repeats hard negative 9."""
    queries, passages, _ = batch()
    queries[4] = list(queries[2])
    passages[11] = list(passages[9])
    text_ids = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 1, 8, 9, 8])
    return {"query_ids": queries, "passage_ids": passages, "passage_text_ids": text_ids}


def run_step(model, inputs, mini_batch_size, deduplicate=True):
    """contrastive_step's loss and gradients, and how many texts the encoder saw."""
    rows = []
    forward = model.forward
    model.forward = lambda **kw: (rows.append(kw["input_ids"].size(0)), forward(**kw))[1]
    model.zero_grad()
    try:
        out = contrastive_step(model, inputs, loss=LossSettings(0.05), pad_token_id=0, device=torch.device("cpu"),
                               mini_batch_size=mini_batch_size, deduplicate=deduplicate)
    finally:
        del model.forward
    return out, gradients(model), sum(rows)
