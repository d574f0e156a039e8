"""Shorthands the evaluation tests share: one model on one set through the package's harness
(:func:`longcontrast.evaluation.evaluate`), its result in the JSON layout ``evaluate.py`` writes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from longcontrast.evaluation import ModelResults, evaluate
from longcontrast.retrieval_sets import ChatRAGSet, CorpusSet
from longcontrast.retrievers import DenseRetriever, EncodeSettings


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
    data = ChatRAGSet(folder, dataset, qrecc_answer_rule=config.qrecc_answer_rule)
    return ModelResults({dataset: evaluate(config.retriever(model, tokenizer), data)}).to_json()[dataset]


def evaluate_beir(model, tokenizer, beir, config: EvalConfig, device=None, **kwargs) -> dict:
    """A BEIR folder's results (``beir``: a :class:`.readers.BeirSet` or its folder): the whole
    reading, or with ``passage_window`` the MaxP reading."""
    data = CorpusSet(str(Path(beir.corpus_file).parent) if hasattr(beir, "corpus_file") else beir)
    readings = evaluate(config.retriever(model, tokenizer, **{"use_faiss": False, **kwargs}), data)
    return readings[f"maxp@{config.passage_window}" if config.passage_window else "whole"].to_json()
