"""MaxSim parity with PyLate: a late-interaction folder saved by this project scores texts in PyLate
as it does here. Two steps, each in its own environment (PyLate 1.6 pins sentence-transformers 5.3
and transformers <= 5.3, which this project's environment does not hold):

    python bench/pylate_parity.py write OUTPUT_DIR parity.json            # this project's venv
    PYLATE_VENV/bin/python bench/pylate_parity.py check parity.json       # PyLate's venv

``write`` scores Doc2Dial dev queries against their documents' chunks with this project
(:mod:`longcontrast.multivector`); ``check`` loads the same folder with
``pylate.models.ColBERT(model_name_or_path=...)``, scores the same texts with
``pylate.scores.colbert_scores`` and prints the largest difference (the issue's bound: 1e-5)."""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def write(args) -> None:
    import torch

    from common import DOC2DIAL, write_json
    from longcontrast.inference import load_retriever
    from longcontrast.multivector import encode_tokens, maxsim_scores, padded_queries, TokenIndex
    from longcontrast.tokenization import tokenize

    items = json.load(open(os.path.join(DOC2DIAL, "dev", "test.json")))[: args.queries]
    documents = json.load(open(os.path.join(DOC2DIAL, "dev", "documents.json")))
    queries = [next(t["content"] for t in reversed(item["messages"]) if t["role"] == "user") for item in items]
    passages = list(dict.fromkeys(chunk for item in items for chunk in documents[item["document"]][: args.passages]))
    model, tokenizer = load_retriever(args.model)
    config = json.load(open(os.path.join(args.model, "config_sentence_transformers.json")))
    cpu = dict(batch_size=8, pad_token_id=tokenizer.pad_token_id, device=torch.device("cpu"), out_dtype=torch.float32)
    query_vectors = encode_tokens(model, tokenize(tokenizer, queries, config["query_length"], "right"), "query", **cpu)
    passage_vectors = encode_tokens(model, tokenize(tokenizer, passages, config["document_length"], "right"), "passage", **cpu)
    block, mask = padded_queries(query_vectors)
    index = TokenIndex.build(passage_vectors, list(range(len(passages))), len(passages))
    scores = maxsim_scores(block, mask, index)  # (Q, P)
    write_json(args.output, {"model": os.path.abspath(args.model), "queries": queries, "passages": passages,
                             "scores": scores.tolist()})
    print(f"{len(queries)} queries x {len(passages)} passages scored; now run `check` in PyLate's environment")


def check(args) -> None:
    import torch
    import pylate
    from pylate import models, scores as pylate_scores

    saved = json.load(open(args.parity))
    model = models.ColBERT(model_name_or_path=saved["model"], device="cpu")
    queries = model.encode(saved["queries"], is_query=True, convert_to_tensor=False)
    passages = model.encode(saved["passages"], is_query=False, convert_to_tensor=False)
    # each pair unpadded, as PyLate's rerank and index searches score: a padded batch under
    # colbert_scores' documents_mask gives masked tokens a similarity of 0, not none
    theirs = torch.tensor([[pylate_scores.colbert_scores(torch.as_tensor(q)[None], torch.as_tensor(p)[None]).item()
                            for p in passages] for q in queries])  # (Q, P)
    ours = torch.tensor(saved["scores"])
    difference = (theirs - ours).abs().max().item()
    same_order = bool((theirs.argsort(dim=1, descending=True) == ours.argsort(dim=1, descending=True)).all())
    print(f"| PyLate {pylate.__version__} | queries | passages | max abs difference | max relative | same rankings |")
    print("|---|---|---|---|---|---|")
    print(f"| {saved['model']} | {len(queries)} | {len(passages)} | {difference:.2e} | "
          f"{difference / ours.abs().max().item():.2e} | {same_order} |")
    if difference > 1e-5 * max(1.0, ours.abs().max().item()):
        raise SystemExit(f"error: PyLate's MaxSim differs by {difference:.2e}")


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    steps = parser.add_subparsers(dest="step", required=True)
    one = steps.add_parser("write", help="this project's scores (its own environment)")
    one.add_argument("model", help="a late-interaction folder saved by efficient_train.py --colbert_dim")
    one.add_argument("output", help="the JSON of texts and scores that `check` reads")
    one.add_argument("--queries", type=int, default=20)
    one.add_argument("--passages", type=int, default=10, help="chunks of each query's document")
    two = steps.add_parser("check", help="PyLate's scores of the same texts (PyLate's environment)")
    two.add_argument("parity", help="the JSON `write` made")
    args = parser.parse_args()
    write(args) if args.step == "write" else check(args)


if __name__ == "__main__":
    main()
