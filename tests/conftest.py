"""Shared fixtures: a tiny BERT (2 layers, hidden 32) and tokenizer built offline in a temp folder."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import string
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The training-data cache of this test session (longcontrast.training_set), not the user's
os.environ["LONGCONTRAST_CACHE"] = tempfile.mkdtemp(prefix="longcontrast-cache-")
atexit.register(shutil.rmtree, os.environ["LONGCONTRAST_CACHE"], ignore_errors=True)
# The one place that edits the path: the repository's scripts (evaluate.py) and the benchmarks'
# shared module (bench/common.py) import as they do when run from the repository.
sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[1] / "bench")]

import pytest  # noqa: E402
import torch  # noqa: E402

TINY_MAX_POSITIONS = 64
WORDS = (
    "the a an of to and in is for on with what how can i my you your do does apply permit fee cost "
    "days office document proof address renew user agent question answer passage library parking"
).split()


def make_tiny_model(folder: Path, dropout: float = 0.1, seed: int = 0) -> str:
    """A randomly initialised 2-layer BERT with a character-level WordPiece vocabulary."""
    from transformers import BertConfig, BertModel, BertTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    letters = list(string.ascii_lowercase + string.digits)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ":", ".", ",", "?", "!", "'", "-"]
    vocab += WORDS + letters + ["##" + c for c in letters]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizer(vocab=str(folder / "vocab.txt"))
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=37, max_position_embeddings=TINY_MAX_POSITIONS,
        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
        # With BERT's usual 0.02 a random tiny model maps every text to nearly the same unit vector
        # (cosines > 0.9999), and float32 gradient comparisons drown in cancellation; 0.3 gives
        # distinct embeddings (cosines down to ~0.6), as a trained model has.
        initializer_range=0.3,
    )
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    return make_tiny_model(tmp_path_factory.mktemp("tiny_bert"))


def write_jsonl(path: Path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def conversation_records(n: int = 10, negatives: int = 2) -> list[dict]:
    """Format (a) records whose passages repeat across examples (to exercise duplicate masking)."""
    records = []
    for i in range(n):
        records.append({
            "messages": [
                {"role": "user", "content": f"how can i apply for permit {i}?"},
                {"role": "assistant", "content": f"you apply at the office {i % 3}."},
                {"role": "user", "content": f"what does it cost {i}?"},
            ],
            "positive": f"the permit {i % 7} fee is {i % 7} and the office is open {i} days.",
            "hard_negatives": [f"the library {i}{j} document proof address {j}." for j in range(negatives)],
        })
    return records


@pytest.fixture
def tiny_train_file(tmp_path) -> str:
    return write_jsonl(tmp_path / "train.jsonl", conversation_records(12))


# Decoder embedders as users bring them, each with its tokenizer's habits:
# - qwen3: Qwen3-Embedding's tokenizer closes every text with <|endoftext|>, which is also its pad
#   token, while its eos_token is <|im_end|>;
# - llama: a Llama/Mistral base (e5-mistral): <s> before every text, nothing after, no pad token;
# - gemma3: <bos> before, nothing after, a pad token of its own.
DECODER_SPECIALS = {
    "qwen3": (["<|endoftext|>", "<|im_end|>", "<unk>"], "$A <|endoftext|>",
              dict(pad_token="<|endoftext|>", eos_token="<|im_end|>", unk_token="<unk>")),
    "llama": (["<unk>", "<s>", "</s>"], "<s> $A", dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>")),
    "gemma3": (["<pad>", "<eos>", "<bos>", "<unk>"], "<bos> $A",
               dict(pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>")),
}
DECODERS = list(DECODER_SPECIALS)


def decoder_config(family: str, vocab_size: int, ids: dict, dropout: float = 0.0):
    import transformers as tf

    small = dict(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=16, intermediate_size=37, max_position_embeddings=128,
                 initializer_range=0.3, attention_dropout=dropout, **ids)
    if family == "qwen3":
        return tf.Qwen3Config(**small)
    if family == "llama":
        return tf.LlamaConfig(**small)
    if family == "gemma3":
        return tf.Gemma3TextConfig(**small, sliding_window=16, layer_types=["sliding_attention", "full_attention"])
    raise ValueError(family)


def make_decoder(folder: Path, family: str, dropout: float = 0.0, seed: int = 0) -> str:
    """A random 2-layer decoder of ``family`` and a word-level tokenizer with that family's special
    tokens (:data:`DECODER_SPECIALS`), written to ``folder``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import AutoModel, PreTrainedTokenizerFast

    specials, template, named = DECODER_SPECIALS[family]
    vocab = specials + [":", ".", ",", "?", "!", "'", "-"] + WORDS + list(string.ascii_lowercase)
    vocab += [str(i) for i in range(100)] + ["instruct", "query", "passage", "user", "assistant"]
    vocab = list(dict.fromkeys(vocab))
    index = {token: i for i, token in enumerate(vocab)}
    backend = Tokenizer(models.WordLevel(index, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[(t, index[t]) for t in specials if t in template])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **named)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(folder)
    ids = {f"{kind}_token_id": index[named[f"{kind}_token"]] if f"{kind}_token" in named else None
           for kind in ("pad", "bos", "eos")}
    torch.manual_seed(seed)
    AutoModel.from_config(decoder_config(family, len(vocab), ids, dropout)).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def decoder_dir(tmp_path_factory):
    made = {}

    def make(family: str) -> str:
        if family not in made:
            made[family] = make_decoder(tmp_path_factory.mktemp(family), family)
        return made[family]

    return make


FAMILY_POSITIONS = 64  # real positions of the tiny models of each family (family_dir)


FAMILY_LONG = 128  # what they are extended to, or read natively


FAMILY_SIZES = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37, initializer_range=0.3)


def family_config(family: str, vocab_size: int):
    """A tiny config of each family; [CLS] = 0, [PAD] = 1, [SEP] = 2 (RoBERTa's and MPNet's layout:
    MPNet hard-codes padding index 1)."""
    import transformers as tf

    ids = dict(vocab_size=vocab_size, pad_token_id=1, bos_token_id=0, eos_token_id=2)
    if family == "bert":
        return tf.BertConfig(**FAMILY_SIZES, **ids, max_position_embeddings=FAMILY_POSITIONS)
    if family == "distilbert":
        return tf.DistilBertConfig(dim=32, n_layers=2, n_heads=2, hidden_dim=37, initializer_range=0.3, **ids,
                                   max_position_embeddings=FAMILY_POSITIONS)
    if family == "electra":
        return tf.ElectraConfig(embedding_size=16, **FAMILY_SIZES, **ids, max_position_embeddings=FAMILY_POSITIONS)
    if family == "roberta":
        return tf.RobertaConfig(**FAMILY_SIZES, **ids, max_position_embeddings=FAMILY_POSITIONS + 2)
    if family == "xlm-roberta":
        return tf.XLMRobertaConfig(**FAMILY_SIZES, **ids, max_position_embeddings=FAMILY_POSITIONS + 2)
    if family == "mpnet":
        return tf.MPNetConfig(**FAMILY_SIZES, **ids, max_position_embeddings=FAMILY_POSITIONS + 2)
    if family == "deberta-v2":  # DeBERTa-v3's layout: relative positions only
        return tf.DebertaV2Config(**FAMILY_SIZES, **ids, max_position_embeddings=FAMILY_LONG, position_biased_input=False,
                                  relative_attention=True, pos_att_type=["p2c", "c2p"], position_buckets=16)
    if family == "modernbert":
        return tf.ModernBertConfig(**FAMILY_SIZES, **ids, cls_token_id=0, sep_token_id=2, max_position_embeddings=FAMILY_LONG,
                                   global_attn_every_n_layers=2, local_attention=16)
    raise ValueError(family)


@pytest.fixture(scope="module")
def family_dir(tmp_path_factory):
    from transformers import AutoModel, BertTokenizer

    made = {}

    def make(family: str) -> str:
        if family in DECODERS and family not in made:
            made[family] = make_decoder(tmp_path_factory.mktemp(family), family)
        if family not in made:
            folder = tmp_path_factory.mktemp(family)
            letters = list(string.ascii_lowercase + string.digits)
            vocab = ["[CLS]", "[PAD]", "[SEP]", "[UNK]", "[MASK]", ":", ".", ",", "?", "!", "'", "-"]
            vocab += WORDS + letters + ["##" + c for c in letters]
            (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
            BertTokenizer(vocab=str(folder / "vocab.txt")).save_pretrained(folder)
            torch.manual_seed(0)
            AutoModel.from_config(family_config(family, len(vocab))).save_pretrained(folder)
            made[family] = str(folder)
        return made[family]

    return make
