#!/usr/bin/env python
"""Generate the sample data sets in data/ (deterministic; outputs committed).

- ``sample_train.jsonl``: the default training set of the training scripts;
- ``chatrag_sample/{doc2dial,quac,qrecc}/{test.json,documents.json}``: the default evaluation set
  of evaluate.py and eval.sh, in the ChatRAG-Bench layout, over other (held-out) services.

Multi-turn dialogues over generated documents about fictional public services. Each document is
cut into sections (the passages); each user turn asks about one section, the agent answers from it.
A training example is the dialogue up to a user turn (``messages``), the section it asks about
(``positive``) and hard negatives: the other sections of the same document, most word overlap with
the query first. The format is that of ``../shared/data/doc2dial/train_triples.jsonl``.

    python data/make_sample_data.py            # rewrites the files above
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

SERVICES = [
    "resident parking permit", "library membership", "small business licence", "bulky waste collection",
    "community garden plot", "dog licence", "street festival permit", "home energy grant",
    "youth sports subsidy", "market stall booking", "tree removal permit", "senior transport pass",
]
ASPECTS = {
    "eligibility": ("Who can apply for the {s}", [
        "Anyone who has lived in the district for at least {n} months can apply for the {s}.",
        "Applicants must be at least {age} years old and registered at an address in the district.",
        "Households with more than {k} members may hold two {s}s at the same time.",
        "Students living in university housing are not eligible unless they pay council tax.",
    ]),
    "documents": ("What you need to bring", [
        "To apply for the {s} you need a photo ID and a proof of address dated within {n} weeks.",
        "A utility bill, a bank statement or a tenancy agreement is accepted as proof of address.",
        "If you apply on behalf of someone else you also need a signed letter of authority.",
        "Copies are fine for online applications; bring the originals to the {office} office.",
    ]),
    "fees": ("How much it costs", [
        "The {s} costs {fee} euros a year, paid when you apply.",
        "People receiving housing benefit pay a reduced fee of {low} euros.",
        "You can pay by card online or at the {office} office; cash is no longer accepted.",
        "The fee is refunded in part if you cancel within the first {n} weeks.",
    ]),
    "processing": ("How long it takes", [
        "Most {s} applications are processed within {days} working days.",
        "You will receive an email with a reference number as soon as your application is logged.",
        "Applications missing a document are put on hold until the document arrives.",
        "In August processing can take up to {late} working days because of holidays.",
    ]),
    "renewal": ("Renewing or changing your {s}", [
        "The {s} must be renewed every {years} years; we send a reminder {n} weeks before it expires.",
        "You can renew online with your reference number, without new documents if nothing changed.",
        "If you move within the district, update your address within {days} days to keep the {s} valid.",
        "A lost {s} can be replaced for {low} euros at the {office} office.",
    ]),
    "complaints": ("Problems and complaints", [
        "If your {s} application is refused you can ask for a review within {n} days.",
        "Write to the {office} office and explain why you think the decision is wrong.",
        "A different officer reviews the case and replies within {days} working days.",
        "If you are still unhappy you can contact the district ombudsman free of charge.",
    ]),
}
QUESTIONS = {
    "eligibility": ["Can I apply for a {s}?", "Who is eligible for the {s}?", "Am I allowed to get a {s} if I just moved here?"],
    "documents": ["What documents do I need for the {s}?", "What should I bring to apply?", "Is a bank statement ok as proof of address?"],
    "fees": ["How much does the {s} cost?", "Is there a reduced fee?", "Can I pay in cash?"],
    "processing": ["How long does the {s} take to process?", "When will I hear back about my application?", "Why is my application on hold?"],
    "renewal": ["How do I renew my {s}?", "What if I move house?", "I lost my {s}, what now?"],
    "complaints": ["My {s} application was refused, what can I do?", "How do I complain about a decision?", "Who reviews my complaint?"],
}
FOLLOW_UPS = ["And what about {a}?", "One more thing: {q}", "Thanks. {q}", "ok, {q}"]
EVAL_SERVICES = {  # held out of training: evaluation documents are new to the model
    "doc2dial": ["water connection request", "noise complaint registration", "allotment waiting list",
                 "disabled parking badge"],
    "quac": ["school meal voucher", "bicycle storage locker", "burial plot reservation", "wedding venue booking"],
    "qrecc": ["building extension permit", "foster care allowance", "street trading licence", "pest control visit"],
}
OFFICES = ["Town Hall", "North Civic Centre", "Harbour Street", "Riverside Service Point"]


def make_document(service: str, rng: random.Random) -> dict[str, str]:
    values = {
        "s": service, "n": rng.randint(2, 12), "age": rng.choice([16, 18, 21]), "k": rng.randint(3, 6),
        "office": rng.choice(OFFICES), "fee": rng.choice([15, 25, 40, 60, 85, 120]), "low": rng.choice([5, 8, 10]),
        "days": rng.randint(5, 20), "late": rng.randint(25, 40), "years": rng.randint(1, 5),
    }
    sections = {}
    for aspect, (title, sentences) in ASPECTS.items():
        chosen = sentences[:2] + rng.sample(sentences[2:], rng.randint(1, 2))
        sections[aspect] = (title + "\n" + " ".join(chosen)).format(**values)
    return sections


def words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


def make_examples(seed: int = 13, dialogues_per_service: int = 9, services=SERVICES, documents=None) -> list[dict]:
    """Training examples; ``documents``, if given, receives each service's sections in order."""
    rng = random.Random(seed)
    examples = []
    for service in services:
        sections = make_document(service, rng)
        if documents is not None:
            documents[service] = list(sections.values())
        for dialogue in range(dialogues_per_service):
            messages = []
            aspects = rng.sample(list(ASPECTS), rng.randint(1, 3))
            for turn, aspect in enumerate(aspects):
                question = rng.choice(QUESTIONS[aspect]).format(s=service)
                if turn:
                    question = rng.choice(FOLLOW_UPS).format(q=question[0].lower() + question[1:], a=aspect)
                messages.append({"role": "user", "content": question})
                positive = sections[aspect]
                query_words = words(" ".join(m["content"] for m in messages))
                others = [a for a in ASPECTS if a != aspect]
                others.sort(key=lambda a: (-len(query_words & words(sections[a])), a))
                answer = positive.split("\n", 1)[1].split(". ")[0].rstrip(".") + "."
                examples.append({
                    "id": f"{service.replace(' ', '_')}-{dialogue}-{turn}",
                    "messages": [dict(m) for m in messages],
                    "document": service,
                    "positive": positive,
                    "positive_index": list(ASPECTS).index(aspect),
                    "hard_negatives": [sections[a] for a in others[:3]],
                    "answer": answer,
                })
                messages.append({"role": "assistant", "content": answer})
    return examples


def write_chatrag_sample(folder: Path, seed: int) -> None:
    """Three small ChatRAG-Bench-layout sets. Each is one handbook document of 4 services x 6
    sections (24 chunks) that all its items are ranked against."""
    for offset, (dataset, services) in enumerate(EVAL_SERVICES.items()):
        sections: dict[str, list[str]] = {}
        examples = make_examples(seed + 1 + offset, dialogues_per_service=4, services=services, documents=sections)
        name = f"{dataset}-handbook"
        documents = {name: [chunk for service in services for chunk in sections[service]]}
        items = [{
            "id": e["id"],
            "messages": e["messages"],
            "document": name,
            "ground_truth_ctx": {"index": services.index(e["document"]) * len(ASPECTS) + e["positive_index"],
                                 "ctx": e["positive"]},
            "answers": [e["answer"]],
        } for e in examples]
        assert all(documents[name][i["ground_truth_ctx"]["index"]] == i["ground_truth_ctx"]["ctx"] for i in items)
        (folder / dataset).mkdir(parents=True, exist_ok=True)
        (folder / dataset / "test.json").write_text(json.dumps(items, indent=1) + "\n")
        (folder / dataset / "documents.json").write_text(json.dumps(documents, indent=1) + "\n")
        print(f"wrote {len(items)} items over {len(documents)} documents to {folder / dataset}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default=str(Path(__file__).parent))
    parser.add_argument("--seed", type=int, default=13)
    args = parser.parse_args(argv)
    output_dir = Path(args.output_dir)
    train = output_dir / "sample_train.jsonl"
    examples, seen = [], set()
    for example in make_examples(args.seed):
        example.pop("answer")
        # Dialogues of one service may open with the same question: write such an example once
        # (training would drop the repeat anyway).
        key = json.dumps([example["messages"], example["positive"], example["hard_negatives"]])
        if key not in seen:
            seen.add(key)
            examples.append(example)
    with open(train, "w", encoding="utf-8") as handle:
        for example in examples:
            handle.write(json.dumps(example) + "\n")
    print(f"wrote {len(examples)} examples to {train}")
    write_chatrag_sample(output_dir / "chatrag_sample", args.seed)


if __name__ == "__main__":
    main()
