"""longcontrast: long-context contrastive training of BERT-style text embedding models.

The package holds everything the two training scripts (``origin_train.py``, ``efficient_train.py``)
and the evaluation share: encoder loading (``modeling``), position extension and shifted
positions (``positions``), the contrastive loss (``loss``), GradCache (``gradcache``), data loading
(``data``), the arguments (``arguments``), the training loop (``training``), checkpoints,
evaluation and hard-negative mining.
"""

__version__ = "0.1.0"


class UserError(Exception):
    """A problem with the user's input (a flag, a file, a record).

    The entry scripts print its message as one line and exit with status 2, without a traceback.
    """
