"""longcontrast: long-context contrastive training of text embedding models.

The package holds everything the two training scripts (``origin_train.py``, ``efficient_train.py``),
``evaluate.py`` and the miner share: training records in every format (``records``), batches and
the collator (``data``), encoder loading (``modeling``), position extension and shifted positions
(``positions``), the contrastive loss (``loss``), GradCache (``gradcache``), the arguments
(``arguments``), the training loop (``training``), checkpoints, loading and encoding a trained
retriever (``inference``), exact top-k search (``search``), metrics and the ranking rule
(``metrics``), ChatRAG and BEIR evaluation (``evaluation``, ``beir``), BM25 (``bm25``) and
hard-negative mining (``mining``).
"""

__version__ = "0.1.0"


class UserError(Exception):
    """A problem with the user's input (a flag, a file, a record).

    The entry scripts print its message as one line and exit with status 2, without a traceback.
    """
