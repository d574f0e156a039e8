"""Synthetic long-document retrieval sets: passkey and needle documents of a given length in a
model's own tokens, built like LongEmbed's synthetic tasks (Zhu et al. 2024), offline and
deterministically, as :class:`.retrieval_sets.ChatRAGSet` values that :func:`.evaluation.evaluate` scores.

- passkey: the filler "The grass is green. The sky is blue. ..." repeated to the length, with
  "{name}'s pass key is {key}. Remember it. {key} is the pass key for {name}." at a random
  sentence boundary; the query "what is the passkey for {name}?". The documents differ only there.
- needle: one haystack of natural prose for every document (:func:`load_haystack`), with one
  short fact of this module's own (e.g. "The best thing to do in Carrowmore is to swim in the
  harbour at dawn.") at a random sentence boundary; the query is the fact's question.

Each item records where its fact starts (``gold_start_token``), so results come apart by whether
the fact starts before or from token 512.
"""

from __future__ import annotations

import os
import random

from . import UserError
from .readers import read_json
from .retrieval_sets import ChatRAGSet, Item
from .tokenization import special_tokens

TASKS = ("passkey", "needle")
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


def _word_tokens(tokenizer, words: list[str]) -> list[int]:
    """Tokens of each whitespace-separated word (BERT WordPiece tokenises words independently)."""
    return [len(ids) for ids in tokenizer(words, add_special_tokens=False)["input_ids"]]


def _fill(sentences: list[str], counts: list[int], budget: int) -> list[str]:
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
    """``count`` documents of at most ``length`` tokens (special tokens included) and their queries.

    Returns (documents, queries, depths): ``queries[i]`` asks for ``documents[i]``, whose fact
    starts at token ``depths[i]`` (token 0 is the first special token). Deterministic in
    ``(kind, length, seed)``; ``haystack``: the needle's sentences.
    """
    if not 0 < count <= len(NAMES):
        raise UserError(f"a synthetic task holds 1 to {len(NAMES)} documents, not {count}")
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
        if not sentences:
            raise UserError("the needle task needs a haystack of sentences (--pages: a page set with prose)")
    else:
        raise ValueError(kind)
    counts = [sum(_word_tokens(tokenizer, s.split())) for s in sentences]
    prefix, suffix = special_tokens(tokenizer)
    documents, depths = [], []
    for fact in facts:
        budget = length - len(prefix) - len(suffix) - sum(_word_tokens(tokenizer, fact.split()))
        body = _fill(sentences, counts, budget)
        at = rng.randint(0, len(body))  # a sentence boundary: the fact's depth
        before, after = body[:at], body[at:]
        # word counts are exact for WordPiece only: check the whole text with the model's own
        # tokenizer, and drop filler (after the fact first) until it fits; the fact always stays
        while len(tokenizer(" ".join(before + [fact] + after))["input_ids"]) > length:
            if not before + after:
                raise UserError(f"a {kind} document of {length} tokens cannot hold its fact ({fact!r}): "
                                "ask for longer documents")
            (after if after else before).pop()
        documents.append(" ".join(before + [fact] + after))
        depths.append(len(prefix) + len(tokenizer(" ".join(before), add_special_tokens=False)["input_ids"]))
    return documents, questions, depths


def synthetic_set(kind: str, length: int, tokenizer, *, haystack: list[str], documents: int, queries: int,
                  seed: int) -> ChatRAGSet:
    """``documents`` documents of one task at ``length`` tokens, the first ``queries`` of them asked
    for: a set whose items all rank the same candidates (the queries are the bare questions)."""
    if not 0 < queries <= documents:
        raise UserError(f"{queries} queries of {documents} documents: ask for 1 to {documents}")
    texts, questions, depths = build_documents(kind, length, tokenizer, haystack, documents, seed)
    name = f"{kind}@{length}"
    items = [Item(str(i), questions[i], name, i, [], depths[i], name) for i in range(queries)]
    return ChatRAGSet(name, items, {name: texts})


def load_haystack(pages_folder: str) -> list[str]:
    """Natural-prose sentences of a ChatRAG-layout page set (``documents.json``; the Doc2Dial dev
    pages), in page order: lines of at least 6 words that end a sentence (no headings or menu crumbs)."""
    documents = read_json(os.path.join(pages_folder, "documents.json"))
    sentences = []
    for name in sorted(documents):
        for page in documents[name]:
            for line in page.split("\n"):
                words = line.split()
                if len(words) >= 6 and words[-1][-1] in ".?!":
                    sentences.append(" ".join(words))
    return sentences
