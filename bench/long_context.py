#!/usr/bin/env python
"""Does a model read long text? Synthetic passkey and needle retrieval from 256 to 8192 tokens.

Built like LongEmbed's synthetic tasks (Zhu et al. 2024), generated here offline and
deterministically. Per length L, 100 documents of L tokens share one corpus and 50 of them are
asked for (Acc@1 = the share of queries whose document ranks first):

- passkey: the filler "The grass is green. The sky is blue. ..." repeated to L tokens, with
  "{name}'s pass key is {key}. Remember it. {key} is the pass key for {name}." at a random
  sentence boundary; query "what is the passkey for {name}?". The documents differ only there.
- needle: the same haystack of natural prose for every document (Doc2Dial dev pages, CC BY 3.0,
  from ../shared/data/doc2dial), with one short fact of this file's own (e.g. "The best thing to do
  in Carrowmore is to swim in the harbour at dawn.") at a random sentence boundary; the query is the
  fact's question.

Lengths count each model's own tokens, special tokens included (every document is checked
against the model's tokenizer and loses filler sentences until it fits, never its fact). Every
model reads each text cut at its own position limit, as LongEmbed does: a 512-position model sees
the first 512 tokens. Ranking follows evaluate.py's rule (:mod:`longcontrast.metrics`): texts a
model reads identically tie, and a tie with the gold counts as a share of a hit (1 / the tied
candidates), never as a hit.

Whole Doc2Dial pages (split by where the answer starts, beside MaxP windows) are evaluate.py's:
``python evaluate.py --model_path MODEL --data-folder ../shared/data/doc2dial/pages/dev
--eval-dataset doc2dial --passage_max_len 8192 --passage_window 512``.

    python bench/long_context.py                                  # the embedded MiniLM at 512 positions
    python bench/long_context.py --models default=default long=outputs/long --lengths 256 512 1024 2048 4096
    python bench/long_context.py --untrained_inits copy interpolate   # the MiniLM extended, before training

Prints a table, writes JSON (``--output``) and a PNG of Acc@1 against length (``--plot``).
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import time

import torch


from longcontrast.cli import one_line_errors, run
from longcontrast.tokenization import special_tokens, tokenize
from longcontrast.readers import read_json
from longcontrast.inference import encode, load_retriever
from longcontrast.metrics import gold_rank, per_item_metrics
from longcontrast.modeling import DualEncoder, default_model_path, load_encoder, read_pooling
from longcontrast.positions import POSITION_INITS, token_positions

logger = logging.getLogger("long_context")
HERE = os.path.dirname(os.path.abspath(__file__))
from common import DOC2DIAL as SHARED, write_json

TASKS = ("passkey", "needle")
LENGTHS = (256, 512, 1024, 2048, 4096)  # the CPU default; add 8192 on a GPU

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
PASSKEY = "{name}'s pass key is {key}. Remember it. {key} is the pass key for {name}."
PASSKEY_QUERY = "what is the passkey for {name}?"
NAMES = (
    "Abigail Ashdown Bartholomew Beatrix Cassius Cordelia Desmond Dorothea Ezekiel Eloise Fitzgerald Florentine "
    "Gideon Guinevere Horatio Henrietta Ignatius Isadora Jasper Josephine Kilian Katarina Leopold Lavinia Montague "
    "Marguerite Nathaniel Ninette Octavius Ophelia Peregrine Philippa Quentin Quintessa Reginald Rosalind Sebastian "
    "Seraphina Thaddeus Theodora Ulysses Ursula Valentine Veronica Wilfred Winifred Xavier Xanthe Yannick Yolanda "
    "Zachariah Zenobia Alaric Annabel Barnaby Bernadette Cornelius Clementine Dashiell Delphine Evander Esmeralda "
    "Ferdinand Francesca Gulliver Georgiana Hamish Hyacinth Ichabod Imogen Jedidiah Juniper Lancelot Leonora "
    "Mortimer Millicent Neville Nerissa Oberon Octavia Percival Penelope Rupert Rosamund Silas Sybilla Tobias "
    "Tabitha Virgil Vivienne Warwick Wilhelmina Ambrose Adelaide Crispin Cressida Lysander Lucasta Magnus Marigold"
).split()
# Needles: (fact, question) templates over subjects that appear nowhere else in a document.
NEEDLES = (
    ("The best thing to do in {s} is to {a}.", "What is the best thing to do in {s}?"),
    ("The oldest bakery in {s} sells bread made with {a}.", "What is the bread of the oldest bakery in {s} made with?"),
    ("Every spring the people of {s} {a}.", "What do the people of {s} do every spring?"),
    ("The secret of the lighthouse keeper of {s} is that he {a}.", "What is the secret of the lighthouse keeper of {s}?"),
)
PLACES = (
    "Carrowmore Ellesby Fenwick Glenmorrow Harrowgate Inverkeld Kilbarron Lindenfall Marrowby Northcombe Oakhurst "
    "Pennington Quarrydale Ravensholme Saltmarsh Thornbury Umberleigh Valemont Wexcombe Yarrowfield Ashbourne "
    "Brackenridge Coldharbour Dunmere Everleigh"
).split()
ACTIVITIES = (
    "swim in the harbour at dawn", "watch the herons on the river", "paint the old stone bridge",
    "climb the clock tower", "race wooden boats on the lake", "plant tulips along the canal",
    "carry lanterns up the hill", "bake honey cakes for strangers", "ring the seven church bells",
    "dance around the apple trees", "fly red kites from the cliffs", "sing to the cows in the meadow",
    "collect sea glass on the shore", "tell ghost stories in the cellar", "feed the swans at the mill",
    "read poems to the fishermen", "knit scarves for the statues", "count the stars from the rooftops",
    "grow giant pumpkins", "keep bees on the roof", "play chess in the square", "ride donkeys to the market",
    "make cheese from goat milk", "juggle oranges at the fair", "walk barefoot on the beach",
)


def word_tokens(tokenizer, words: list[str]) -> list[int]:
    """Tokens of each whitespace-separated word (BERT WordPiece tokenises words independently)."""
    return [len(ids) for ids in tokenizer(words, add_special_tokens=False)["input_ids"]]


def fill(sentences: list[str], counts: list[int], budget: int) -> list[str]:
    """Whole sentences of ``sentences``, cycled from the first, as long as they fit in ``budget``
    tokens (``counts``: tokens per sentence); a document may end up to one sentence short."""
    out, used = [], 0
    while True:
        index = len(out) % len(sentences)
        if used + counts[index] > budget:
            return out
        out.append(sentences[index])
        used += counts[index]


def build_documents(kind: str, length: int, tokenizer, haystack: list[str], count: int, seed: int):
    """``count`` documents of at most ``length`` tokens ([CLS] and [SEP] included) and their queries.

    Returns (documents, queries, depths): ``queries[i]`` asks for ``documents[i]``, whose fact
    starts at token ``depths[i]`` ([CLS] is token 0). Deterministic in ``(kind, length, seed)``.
    """
    rng = random.Random(f"{kind}-{length}-{seed}")
    if kind == "passkey":
        names = rng.sample(NAMES, count)
        facts = [PASSKEY.format(name=n, key=rng.randrange(10_000, 100_000)) for n in names]
        questions = [PASSKEY_QUERY.format(name=n) for n in names]
        sentences = [s.strip() + "." for s in FILLER.split(".") if s.strip()]
    elif kind == "needle":
        pairs = [(t, s, a) for t in range(len(NEEDLES)) for s, a in zip(PLACES, rng.sample(ACTIVITIES, len(PLACES)))]
        chosen = rng.sample(pairs, count)
        facts = [NEEDLES[t][0].format(s=s, a=a) for t, s, a in chosen]
        questions = [NEEDLES[t][1].format(s=s) for t, s, _ in chosen]
        sentences = haystack
    else:
        raise ValueError(kind)
    counts = [sum(word_tokens(tokenizer, s.split())) for s in sentences]
    prefix, suffix = special_tokens(tokenizer)
    documents, depths = [], []
    for fact in facts:
        budget = length - len(prefix) - len(suffix) - sum(word_tokens(tokenizer, fact.split()))
        body = fill(sentences, counts, budget)
        at = rng.randint(0, len(body))  # a sentence boundary: the fact's depth
        before, after = body[:at], body[at:]
        # word counts are exact for WordPiece only: check the whole text with the model's own
        # tokenizer, and drop filler (after the fact first) until it fits; the fact always stays
        while len(tokenizer(" ".join(before + [fact] + after))["input_ids"]) > length:
            (after if after else before).pop()
        documents.append(" ".join(before + [fact] + after))
        depths.append(len(prefix) + len(tokenizer(" ".join(before), add_special_tokens=False)["input_ids"]))
    return documents, questions, depths


def load_haystack(pages_folder: str) -> list[str]:
    """Natural-prose sentences: the Doc2Dial dev pages, in page order, one sentence per line."""
    documents = read_json(os.path.join(pages_folder, "documents.json"))
    sentences = []
    for name in sorted(documents):
        for page in documents[name]:
            for line in page.split("\n"):
                words = line.split()
                if len(words) >= 6 and words[-1][-1] in ".?!":  # sentences; no headings or menu crumbs
                    sentences.append(" ".join(words))
    return sentences


def hits_at_1(scores: torch.Tensor) -> torch.Tensor:
    """(Q,) hits from (Q, C) scores where query i's gold is candidate i, by evaluate.py's rule: 1
    when the gold ranks first alone, 1 / the tied candidates when it ties for first, else 0."""
    ranks = [gold_rank(row, i) for i, row in enumerate(scores)]
    return torch.from_numpy(per_item_metrics(ranks)["recall@1"])  # (Q,)


def load_models(specs: list[str], untrained_inits: list[str], extend_to: int):
    """{label: (DualEncoder, tokenizer)} loader thunks: ``label=path`` or ``path`` ('default' is the
    embedded MiniLM); each untrained init adds the default model extended to ``extend_to`` with it."""
    loaders = {}
    for spec in specs:
        label, _, path = spec.rpartition("=")
        label = label or path
        loaders[label] = (lambda path=path: load_retriever(None if path == "default" else path))
    for init in untrained_inits:
        def extended(init=init):
            torch.manual_seed(0)
            path = default_model_path()
            encoder, tokenizer = load_encoder(path, extend_to, init, dropout=0.0)
            return DualEncoder(encoder.eval(), read_pooling(path) or "cls"), tokenizer
        loaders[f"MiniLM {extend_to} {init}, untrained"] = extended
    return loaders


def run_synthetic(model, tokenizer, kind, length, haystack, args) -> tuple[float, dict]:
    """Acc@1 of one task at one length, and Acc@1 apart for facts starting before / from token 512."""
    limit = token_positions(model.query_encoder)
    documents, questions, depths = build_documents(kind, length, tokenizer, haystack, args.num_documents, args.seed)
    prompt = model.prompts.get("document", "")
    # a prompt's tokens come on top of the document's own length
    extra = len(tokenizer(prompt, add_special_tokens=False)["input_ids"]) if prompt else 0
    doc_ids = tokenize(tokenizer, documents, min(limit, length + extra), "right", prompt)
    query_ids = tokenize(tokenizer, questions[: args.num_queries], min(limit, 128), "left", model.prompts.get("query", ""))
    encoding = {"batch_size": args.batch_size, "pad_token_id": tokenizer.pad_token_id, "device": torch.device(args.device),
                "autocast": torch.bfloat16 if args.bf16 else None}
    docs = encode(model, doc_ids, "passage", desc=f"{kind} {length}", **encoding)
    queries = encode(model, query_ids, "query", desc="queries", **encoding)
    hits = hits_at_1(queries @ docs.T)  # (Q,)
    deep = torch.tensor(depths[: args.num_queries]) >= 512  # (Q,)
    by_depth = {name: {"queries": int(part.sum()), "acc@1": 100 * float(hits[part].mean())}
                for name, part in (("fact<512", ~deep), ("fact>=512", deep)) if part.any()}
    return 100 * float(hits.mean()), by_depth


def format_tables(results: dict, lengths: list[int]) -> str:
    lines = []
    for kind in TASKS:
        if not any(kind in r for r in results.values()):
            continue
        lines += [f"\n{kind} Acc@1 (%)", "| model | " + " | ".join(map(str, lengths)) + " | mean |",
                  "|---|" + "---|" * (len(lengths) + 1)]
        for label, r in results.items():
            cells = [f"{r[kind][str(n)]:.1f}" if str(n) in r.get(kind, {}) else "-" for n in lengths]
            mean = f"{r[kind]['mean']:.1f}" if "mean" in r.get(kind, {}) else "-"
            lines.append(f"| {label} | " + " | ".join(cells) + f" | {mean} |")
        split = {label: r[f"{kind}_by_depth"] for label, r in results.items() if f"{kind}_by_depth" in r}
        if split:  # is a fact past the trained positions found as often as one before them?
            lines += [f"\n{kind} Acc@1 (%) by where the fact starts: before token 512 / from 512 (queries)",
                      "| model | " + " | ".join(map(str, lengths)) + " |", "|---|" + "---|" * len(lengths)]
            for label, by_length in split.items():
                cells = [" / ".join(f"{p['acc@1']:.0f} ({p['queries']})" for p in by_length[str(n)].values())
                         if str(n) in by_length else "-" for n in lengths]
                lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: dict, lengths: list[int], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [k for k in TASKS if any(k in r for r in results.values())]
    if not kinds:
        return  # pages only: the tables say it all
    legend_rows = -(-len(results) // 3)  # one legend under the plots, 3 models a row: lines stay visible
    height = 4.2 + 0.25 * legend_rows  # inches
    figure, axes = plt.subplots(1, len(kinds), figsize=(6 * len(kinds), height), squeeze=False)
    for axis, kind in zip(axes[0], kinds):
        for label, r in results.items():
            points = [(n, r[kind][str(n)]) for n in lengths if str(n) in r.get(kind, {})]
            if points:
                axis.plot(*zip(*points), marker="o", label=label)
        axis.set_xscale("log", base=2)
        axis.set_xticks(lengths, [str(n) for n in lengths])
        axis.set_ylim(-2, 102)
        axis.set_xlabel("document length (tokens)")
        axis.set_ylabel("Acc@1 (%)")
        axis.set_title(kind)
        axis.grid(alpha=0.3)
    handles = {}
    for axis in axes[0]:
        for handle, label in zip(*axis.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    figure.legend(handles.values(), handles.keys(), loc="lower center", ncol=3, fontsize=8, frameon=False)
    figure.tight_layout(rect=(0, 0.25 * legend_rows / height + 0.02, 1, 1))
    figure.savefig(path, dpi=120)
    plt.close(figure)


def parse_args(argv=None):
    parser = one_line_errors(argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    parser.add_argument("--models", nargs="*", default=["MiniLM 512=default"],
                        help="Models as LABEL=PATH or PATH ('default': the embedded all-MiniLM-L6-v2, 512 positions).")
    parser.add_argument("--untrained_inits", nargs="*", default=[], choices=POSITION_INITS,
                        help="Also the embedded MiniLM extended to --extend_to positions with each init, untrained.")
    parser.add_argument("--extend_to", type=int, default=8192)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--lengths", nargs="+", type=int, default=list(LENGTHS),
                        help="Document lengths in tokens (default: up to 4096, the CPU default; add 8192 on a GPU).")
    parser.add_argument("--num_documents", type=int, default=100)
    parser.add_argument("--num_queries", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0, help="Generation seed (names, keys, needles, depths).")
    parser.add_argument("--pages", default=os.path.join(SHARED, "pages", "dev"),
                        help="Whole-page dev set whose sentences are the needle haystack.")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--bf16", action="store_true", help="Encode under bf16 autocast (GPU).")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", default=os.path.join(HERE, "results", "long_context.json"))
    parser.add_argument("--plot", default=None, help="PNG of Acc@1 against length (default: --output with .png).")
    parser.add_argument("--reuse", action="store_true",
                        help="Keep the results already in --output and run only what is missing.")
    args = parser.parse_args(argv)
    if not 0 < args.num_queries <= args.num_documents <= len(NAMES):
        parser.error(f"need 0 < --num_queries <= --num_documents <= {len(NAMES)}")
    if min(args.lengths) < 64:
        parser.error("--lengths must be >= 64 tokens")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_grad_enabled(False)
    haystack = load_haystack(args.pages) if "needle" in args.tasks else []
    results, runs = {}, []
    if args.reuse and os.path.isfile(args.output):
        previous = read_json(args.output)
        results, runs = previous["results"], previous.get("runs", [])
    runs.append({k: v for k, v in vars(args).items() if k != "reuse"})
    for label, load in load_models(args.models, args.untrained_inits, args.extend_to).items():
        model, tokenizer = load()
        model.to(args.device)
        row = results.setdefault(label, {})
        row["positions"] = token_positions(model.query_encoder)
        for kind in (k for k in args.tasks if k in TASKS):
            done = row.setdefault(kind, {})
            for length in args.lengths:
                if str(length) not in done:
                    started = time.perf_counter()
                    done[str(length)], split = run_synthetic(model, tokenizer, kind, length, haystack, args)
                    row.setdefault(f"{kind}_by_depth", {})[str(length)] = split
                    logger.info("%s %s %d: Acc@1 %.1f (%.0f s)", label, kind, length, done[str(length)],
                                time.perf_counter() - started)
            done["mean"] = sum(v for k, v in done.items() if k != "mean") / len([k for k in done if k != "mean"])
            # after every task of a model: an interrupted run keeps what it measured, and --reuse goes on from there
            write_json(args.output, {"runs": runs, "results": results})
    lengths = sorted({int(n) for r in results.values() for k in TASKS for n in r.get(k, {}) if n != "mean"})
    print(format_tables(results, lengths))
    plot_path = args.plot or os.path.splitext(args.output)[0] + ".png"
    plot(results, lengths, plot_path)
    print(f"results written to {args.output}" + (f" and {plot_path}" if os.path.isfile(plot_path) else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(run(main))
