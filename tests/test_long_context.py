"""longcontrast.synthetic and bench/long_context.py: the documents are deterministic, of the asked
length, hold their fact once at a sentence boundary, and Acc@1 never counts a tie as a hit."""

import importlib.util
import re
from pathlib import Path

import pytest
import torch

from longcontrast import UserError, synthetic
from longcontrast.evaluation import evaluate
from longcontrast.modeling import DualEncoder, load_encoder
from longcontrast.retrievers import DenseRetriever, EncodeSettings

spec = importlib.util.spec_from_file_location("long_context", Path(__file__).parents[1] / "bench" / "long_context.py")
long_context = importlib.util.module_from_spec(spec)
spec.loader.exec_module(long_context)

HAYSTACK = ["The office is open on weekdays.", "You can apply for a permit online.", "A fee is due when you renew."]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.mark.parametrize("kind", ["passkey", "needle"])
def test_documents_have_the_length_and_their_fact_once(kind, tokenizer):
    documents, questions, depths = synthetic.build_documents(kind, 300, tokenizer, HAYSTACK, 20, seed=0)
    again, _, _ = synthetic.build_documents(kind, 300, tokenizer, HAYSTACK, 20, seed=0)
    other, _, _ = synthetic.build_documents(kind, 300, tokenizer, HAYSTACK, 20, seed=1)
    assert documents == again and documents != other
    assert len(documents) == len(questions) == len(set(questions)) == 20
    lengths = [len(tokenizer(d)["input_ids"]) for d in documents]  # [CLS] and [SEP] included
    assert max(lengths) <= 300 and min(lengths) >= 300 - 40  # at most one sentence short
    for document, question, depth in zip(documents, questions, depths):
        if kind == "passkey":  # "{name}'s pass key is {key}. Remember it. {key} is the pass key for {name}."
            subject, times = question.split("for ")[1].rstrip("?"), 2
        else:
            (subject,), times = [p for p in synthetic.PLACES if p in question], 1
        assert document.count(subject) == times
        sentences = re.split(r"(?<=[.?!]) ", document)
        if kind == "needle":  # every other sentence is the haystack's, whole
            (fact,) = [x for x in sentences if x not in HAYSTACK]
            assert subject in fact
        else:
            fact = f"{subject}'s pass key is"
            assert any(x.startswith(fact) for x in sentences)  # at a sentence boundary
        before = document[: document.index(fact)].strip()
        assert depth == 1 + len(tokenizer(before, add_special_tokens=False)["input_ids"])  # [CLS] is token 0
    assert len(set(depths)) > 5  # facts at many depths


def test_synthetic_sets_refuse_what_they_cannot_build(tokenizer):
    with pytest.raises(UserError, match="1 to 100 documents, not 101"):
        synthetic.build_documents("passkey", 300, tokenizer, [], 101, seed=0)
    with pytest.raises(UserError, match="6 queries of 5 documents"):
        synthetic.synthetic_set("passkey", 300, tokenizer, haystack=[], documents=5, queries=6, seed=0)
    with pytest.raises(UserError, match="needs a haystack"):
        synthetic.build_documents("needle", 300, tokenizer, [], 5, seed=0)


def byte_level_bpe(folder):
    """A tiny byte-level BPE tokenizer (RoBERTa / Qwen style: a word's tokens depend on the space
    before it, so counting words one by one is not exact), trained here offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    text = HAYSTACK + list(synthetic.NAMES) + list(synthetic.PLACES) + [synthetic.FILLER]
    bpe.train_from_iterator(text, trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>", "<pad>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bpe.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


@pytest.mark.parametrize("kind", ["passkey", "needle"])
def test_lengths_are_the_models_own_tokens_and_the_fact_is_kept(kind, tmp_path):
    tokenizer = byte_level_bpe(tmp_path)
    documents, questions, depths = synthetic.build_documents(kind, 200, tokenizer, HAYSTACK, 20, seed=0)
    for document, question, depth in zip(documents, questions, depths):
        ids = tokenizer(document)["input_ids"]
        assert len(ids) <= 200  # cut at 200 tokens, nothing of it is lost
        subject = question.split("for ")[1].rstrip("?") if kind == "passkey" else next(
            p for p in synthetic.PLACES if p in question)
        assert subject in document
        if kind == "needle":
            (fact,) = [x for x in re.split(r"(?<=[.?!]) ", document) if x not in HAYSTACK]
        else:
            fact = f"{subject}'s pass key"
        before = document[: document.index(fact)].strip()
        assert depth == 1 + len(tokenizer(before, add_special_tokens=False)["input_ids"])


def test_a_collapsed_model_scores_chance_not_hits(tiny_model_dir):
    """A model with every weight zero reads every document alike: each query ties its gold with all
    20 documents, so Acc@1 is chance (100 / 20), never a hit. The trained-shape model beats chance,
    and the parts by fact depth hold every query."""
    encoder, tokenizer = load_encoder(tiny_model_dir, 512, dropout=0.0)  # its letters are tokens: 300 fit a fact
    data = synthetic.synthetic_set("passkey", 300, tokenizer, haystack=[], documents=20, queries=10, seed=0)
    settings = EncodeSettings(passage_max_len=300)
    whole = evaluate(DenseRetriever(DualEncoder(encoder.eval(), "mean"), tokenizer, settings), data)["whole"]
    assert whole.metrics["recall@1"] > 100 / 20
    assert sum(part.num_items for name, part in whole.parts.items() if name.startswith("gold_start")) == 10
    with torch.no_grad():
        for parameter in encoder.parameters():
            parameter.zero_()
    collapsed = evaluate(DenseRetriever(DualEncoder(encoder, "mean"), tokenizer, settings), data)["whole"]
    assert collapsed.metrics["recall@1"] == pytest.approx(100 / 20)
    with pytest.raises(UserError, match="cannot hold its fact"):
        synthetic.build_documents("passkey", 40, tokenizer, [], 5, seed=0)


def test_tables_and_plot(tmp_path):
    results = {"512": {"positions": 512, "passkey": {"256": 90.0, "1024": 40.0, "mean": 65.0},
                       "passkey_by_depth": {"1024": {"fact<512": {"queries": 25, "acc@1": 80.0},
                                                     "fact>=512": {"queries": 25, "acc@1": 0.0}}}},
               "long": {"positions": 8192, "passkey": {"256": 96.0, "1024": 70.0, "mean": 83.0}}}
    table = long_context.format_tables(results, [256, 1024])
    assert "| long | 96.0 | 70.0 | 83.0 |" in table and "| 512 | - | 80 (25) / 0 (25) |" in table
    long_context.plot(results, [256, 1024], str(tmp_path / "plot.png"))
    assert (tmp_path / "plot.png").read_bytes()[:4] == b"\x89PNG"
    pages_only = {"512": {"positions": 512, "pages": {"recall@1": 60.0}}}
    long_context.plot(pages_only, [], str(tmp_path / "none.png"))  # no synthetic task: no plot, no error
    assert not (tmp_path / "none.png").exists()


def test_mixed_page_chunks_asks_each_dialogue_for_its_page_and_its_chunk():
    spec = importlib.util.spec_from_file_location("mixed", Path(__file__).resolve().parents[1] / "data" / "mixed_page_chunks.py")
    mixed = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mixed)
    turns = [{"role": "user", "content": "how do i renew"}]
    pages = [{"messages": turns, "document": "d", "positive": "the whole page", "hard_negatives": ["another page"]},
             {"messages": [{"role": "user", "content": "unmatched"}], "document": "d", "positive": "p", "hard_negatives": []}]
    chunks = [{"messages": turns, "document": "d", "positive": "the chunk", "hard_negatives": ["a chunk"], "id": "x"}]
    records = mixed.mixed_records(pages, chunks)
    assert [r["positive"] for r in records] == ["the whole page", "the chunk"]
    assert all(r["messages"] == turns and set(r) == {"messages", "document", "positive", "hard_negatives"} for r in records)


def test_chunks_in_page_find_the_chunk_and_keep_it_within_the_window(tiny_model_dir):
    """--chunks_in_page: the chunk found in its page across other spacing, and a page cut so that the
    chunk ends within the window keeps the chunk's characters (checked by the collator's own count)."""
    from transformers import AutoTokenizer

    from longcontrast.tokenization import span_tokens

    spec = importlib.util.spec_from_file_location("mixed", Path(__file__).resolve().parents[1] / "data" / "mixed_page_chunks.py")
    mixed = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mixed)
    page = "the office is open.\n\nbring proof of address and the fee.  " + "the library is open 3 days. " * 12
    chunk = "bring proof of address\nand the fee."
    start, end = mixed.locate(page, chunk)
    assert page[start:end] == "bring proof of address and the fee."
    assert mixed.locate(page, "ring proof") is None and mixed.locate(page, "proof of addr") is None
    assert mixed.locate(page, "parking") is None
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert mixed.chunk_in_page(page, (start, end), tokenizer, 64) == (page, [start, end])  # ends inside: whole page
    late = "the library is open 3 days. " * 12 + page
    span = mixed.locate(late, chunk)
    text, cut = mixed.chunk_in_page(late, span, tokenizer, 24)
    assert text[cut[0] : cut[1]] == late[span[0] : span[1]] and text != late and late.endswith(text)
    first, last = span_tokens(tokenizer, text, tuple(cut), 24)
    assert last <= 24 - 1 and tokenizer.decode(tokenizer(text)["input_ids"][first:last]) == "bring proof of address and the fee."


def test_seeds_averages_each_item_over_seeds_before_pairing(tmp_path, caplog):
    """bench/seeds.py: per-seed R@1, and the paired difference of the seed-averaged items (here
    computed by hand on four items: late chunks win item 0 in both seeds, item 1 in one)."""
    import json

    spec = importlib.util.spec_from_file_location("seeds", Path(__file__).resolve().parents[1] / "bench" / "seeds.py")
    seeds = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(seeds)

    def reading(values):
        part = {"per_item": {"recall@1": values}}
        return {**part, "gold_start>=512": part, "split=report": {"gold_start>=512": part},
                "split=selection": {"gold_start>=512": part}}

    files = []
    for seed, late in enumerate([[100, 100, 0, 0], [100, 0, 0, 0]]):
        model = {**reading([0, 0, 100, 0]), "maxp@512": reading([0, 0, 100, 0]), "late@512": reading(late)}
        path = tmp_path / f"seed{seed}.json"
        path.write_text(json.dumps({"results": {"default": {"doc2dial": {"maxp@512": reading([0, 0, 0, 0])}},
                                                "m": {"doc2dial": model}}}))
        files.append(str(path))
    out = tmp_path / "table.json"
    with caplog.at_level("INFO"):
        assert seeds.main([*files, "--output", str(out)]) == 0
    table = json.loads(out.read_text())
    assert table["recall@1"]["late chunks"]["all"] == [50.0, 25.0]
    paired = table["paired"]["late chunks - own MaxP"]["all"]
    assert paired["difference"] == pytest.approx((100 + 50 - 100 + 0) / 4)  # per item: mean late - own
    assert table["paired"]["whole - MiniLM MaxP"]["all"]["difference"] == pytest.approx(25.0)
    assert "| late chunks | 50.0 / 25.0 (mean 37.5, sd 17.7)" in caplog.text

    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps({"results": {"default": {"doc2dial": {}}, "m": {"doc2dial": {"recall@1": 1.0}}}}))
    with pytest.raises(UserError, match="needs --passage_window 512 --late_chunking --per_item"):
        seeds.main([str(bare)])
