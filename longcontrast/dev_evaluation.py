"""Evaluation during training: a development set scored by the evaluation harness
(:mod:`.evaluation`) on the model being trained, as ``evaluate.py`` scores a saved one.

The Trainer calls it at ``--eval_strategy`` / ``--eval_steps``; its metrics (``eval_ndcg@10``...)
choose the best checkpoint (``--metric_for_best_model``, ``--load_best_model_at_end``) and stop a
run that no longer improves (``--early_stopping_patience``). Every process evaluates the whole set
with the same weights (the same numbers everywhere, no collective to wait on, and a model sharded
with FSDP2 runs its forwards in step on every process).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from . import UserError
from .eval_arguments import encode_settings
from .evaluation import evaluate
from .multivector import LateInteractionRetriever
from .retrieval_sets import DATASETS, ChatRAGSet, CorpusSet
from .retrievers import DenseRetriever

logger = logging.getLogger(__name__)


def load_dev_sets(folder: str, *, split: str = "test", num_turns: int = 5) -> list:
    """A BEIR folder (``corpus.jsonl``), a ChatRAG set (``test.json`` and ``documents.json``), or a
    folder of ChatRAG sets (``doc2dial/``, ``quac/``, ``qrecc/``: every one present)."""
    if os.path.isfile(os.path.join(folder, "corpus.jsonl")):
        return [CorpusSet(folder, split)]
    if os.path.isfile(os.path.join(folder, "test.json")):
        return [ChatRAGSet.load(folder, os.path.basename(os.path.normpath(folder)), num_turns=num_turns)]
    names = [name for name in DATASETS if os.path.isfile(os.path.join(folder, name, "test.json"))]
    if not names:
        raise UserError(f"--eval_data {folder}: neither a BEIR folder (corpus.jsonl) nor a ChatRAG set (test.json, "
                        f"or {'/, '.join(DATASETS)}/ holding one)")
    return [ChatRAGSet.load(folder, name, num_turns=num_turns) for name in names]


def check_metric(sets: list, name: str | None) -> None:
    """Refuse, before training starts, a ``--metric_for_best_model`` the sets do not report."""
    if name is not None and name.removeprefix("eval_") not in sets[0].metric_names:
        raise UserError(f"--metric_for_best_model {name}: the evaluation set reports {', '.join(sets[0].metric_names)}")


@dataclass
class DevEvaluation:
    """``__call__(model) -> {metric: value}``: each set's ``whole`` reading (percent), averaged over
    the sets, plus ``<set>_<metric>`` when there are several; lengths and prompts as in training."""

    sets: list
    tokenizer: object
    query_max_len: int
    passage_max_len: int
    query_prompt: str = ""
    passage_prompt: str = ""

    def __call__(self, model) -> dict[str, float]:
        device = next(model.parameters()).device
        settings = encode_settings(model, query_max_len=self.query_max_len, passage_max_len=self.passage_max_len,
                                   prompts={"query": self.query_prompt, "document": self.passage_prompt},
                                   device=device)
        kind = DenseRetriever if model.projection is None else LateInteractionRetriever
        was_training = model.training
        model.eval()  # no dropout: the scores of the weights as saved
        try:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                wholes = {data.name: evaluate(kind(model, self.tokenizer, settings), data)["whole"].metrics
                          for data in self.sets}
        finally:
            model.train(was_training)
        metrics = {name: sum(w[name] for w in wholes.values()) / len(wholes) for name in self.sets[0].metric_names}
        if len(wholes) > 1:
            metrics.update({f"{data}_{name}": value for data, w in wholes.items() for name, value in w.items()})
        return metrics
