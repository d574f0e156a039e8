"""Okapi BM25 as a sparse (texts x vocabulary) weight matrix: the miner's keyword scorer and the
evaluation's baseline. Its scores are Lucene's (bm25s, method "lucene") times ``k1 + 1``: the same
ranking; the matrix lets the miner score any pool of texts and a query's own positive.

Two variants (:data:`VARIANTS`): ``anserini`` (k1 0.9, b 0.4, every lower-cased word: Anserini's
defaults) and ``mteb`` (k1 1.5, b 0.75, words of two characters or more, Lucene's English stop
words dropped, Snowball-stemmed: bm25s as MTEB runs its BM25 baseline)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import torch
from scipy import sparse

_WORD = re.compile(r"\w+")
# Lucene's EnglishAnalyzer stop set (bm25s's "en" list)
ENGLISH_STOPWORDS = frozenset(
    "a an and are as at be but by for if in into is it no not of on or such that the their then there these they "
    "this to was will with".split())


def words(text: str) -> list[str]:
    """The ``anserini`` variant's tokens: lower-cased runs of letters and digits."""
    return _WORD.findall(text.lower())


@lru_cache(maxsize=1)
def _stemmer():
    try:
        import Stemmer
    except ImportError as err:
        from . import UserError

        raise UserError("the mteb BM25 variant stems with PyStemmer: pip install PyStemmer") from err
    return Stemmer.Stemmer("english")


@dataclass(frozen=True)
class Variant:
    """How BM25 reads a text and weighs its words."""

    k1: float
    b: float
    pattern: str = r"\w+"
    stopwords: frozenset = field(default_factory=frozenset)
    stem: bool = False

    def words(self, text: str) -> list[str]:
        tokens = [w for w in re.findall(self.pattern, text.lower()) if w not in self.stopwords]
        return _stemmer().stemWords(tokens) if self.stem and tokens else tokens


VARIANTS = {"anserini": Variant(0.9, 0.4),
            "mteb": Variant(1.5, 0.75, pattern=r"(?u)\b\w\w+\b", stopwords=ENGLISH_STOPWORDS, stem=True)}
DEFAULT_VARIANT = "anserini"


class BM25:
    """Okapi BM25 over a fixed list of texts, as a sparse (texts x vocabulary) weight matrix.

    ``score(t, d) = idf(t) * tf (k1 + 1) / (tf + k1 (1 - b + b |d| / avgdl))`` summed over the
    query's distinct words, with Lucene's ``idf = ln(1 + (N - df + 0.5) / (df + 0.5))``; k1, b and
    the words as ``variant`` (a name of :data:`VARIANTS`) says.
    """

    def __init__(self, texts: list[str], variant: str = DEFAULT_VARIANT, chunk: int = 20_000):
        self.variant = VARIANTS[variant]
        k1, b = self.variant.k1, self.variant.b
        self.vocabulary: dict[str, int] = {}
        lengths = np.zeros(len(texts))  # (N,) words per text
        parts = []  # term counts, ``chunk`` texts at a time: memory stays near the index's own size
        for start in range(0, len(texts), chunk):
            columns, counts = [], []
            for row, text in enumerate(texts[start: start + chunk]):
                tokens = self.variant.words(text)
                lengths[start + row] = len(tokens)
                columns.extend(self.vocabulary.setdefault(w, len(self.vocabulary)) for w in tokens)
                counts.append(len(tokens))
            rows = np.repeat(np.arange(len(counts)), counts)
            columns = np.asarray(columns, dtype=np.int64)
            # one entry per token: the sparse matrix sums a text's repeats into its term counts
            parts.append(sparse.csr_matrix((np.ones(len(columns)), (rows, columns)),
                                           shape=(len(counts), len(self.vocabulary))))
        df = np.zeros(len(self.vocabulary), dtype=np.int64)  # (V,)
        for part in parts:
            df += np.bincount(part.indices, minlength=len(self.vocabulary))
        idf = np.log(1 + (len(texts) - df + 0.5) / (df + 0.5))  # (V,)
        norm = k1 * (1 - b + b * lengths / max(lengths.mean() if len(texts) else 0, 1e-9))  # (N,)
        offset = 0
        for part in parts:  # counts -> weights, one part at a time (the temporaries stay small)
            part.resize((part.shape[0], len(self.vocabulary)))
            rows = offset + np.repeat(np.arange(part.shape[0]), np.diff(part.indptr))  # (nnz,)
            part.data = idf[part.indices] * part.data * (k1 + 1) / (part.data + norm[rows])
            offset += part.shape[0]
        self.weights = sparse.vstack(parts, format="csr") if parts else sparse.csr_matrix((0, 0))  # (N, V)

    def query_matrix(self, queries: list[str]) -> sparse.csr_matrix:
        """(Q, V) indicator of each query's distinct known words."""
        rows, cols = [], []
        for row, query in enumerate(queries):
            known = {self.vocabulary[w] for w in self.variant.words(query) if w in self.vocabulary}
            rows.extend([row] * len(known))
            cols.extend(known)
        return sparse.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(queries), len(self.vocabulary)))

    def scores(self, queries: sparse.csr_matrix, texts: np.ndarray) -> torch.Tensor:
        """(Q, C) scores of the query rows against the texts at indices ``texts``."""
        return torch.from_numpy((queries @ self.weights[texts].T).toarray())

    def top_k(self, queries: list[str], k: int, *, block: int = 1 << 24) -> list[tuple[np.ndarray, np.ndarray]]:
        """Each query's best ``k`` texts: ``(indices, scores)``, best first, only texts sharing a word
        with the query (a score above 0); equal scores in index order.

        The (Q, N) scores are never dense: queries go ``block // N`` at a time through one sparse
        product with the (V, N) transposed weights, whose rows hold only the texts with a score.
        """
        transposed = self.weights.T.tocsr()  # (V, N)
        step = max(1, block // max(self.weights.shape[0], 1))
        out = []
        for start in range(0, len(queries), step):
            scores = (self.query_matrix(queries[start: start + step]) @ transposed).tocsr()  # (b, N) sparse
            for row in range(scores.shape[0]):
                found = scores.indices[scores.indptr[row]: scores.indptr[row + 1]]  # (n,) texts with a score
                values = scores.data[scores.indptr[row]: scores.indptr[row + 1]]  # (n,)
                best = np.lexsort((found, -values))[:k]  # by score, then by index
                out.append((found[best], values[best]))
        return out
