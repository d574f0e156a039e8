"""longcontrast: long-context contrastive training of text embedding models.

The package behind the two training scripts (``origin_train.py``, ``efficient_train.py``),
``evaluate.py`` and the data tools, in layers that import only downward:

1. reading and tokens: ``readers`` (every file format), ``tokenization``, ``batching``;
2. data: ``records`` (training-record formats), ``collator``, ``pairs``;
3. models: ``positions`` (position extension), ``modeling`` (encoders, pooling, the dual encoder),
   ``lora``, ``inference`` (loading a retriever, encoding);
4. training: ``loss``, ``gradcache``, ``step``, ``distributed``, ``checkpoints``, ``trainer``,
   ``arguments``, ``training`` (the driver);
5. retrieval and evaluation: ``search``, ``bm25``, ``metrics``, ``results``, ``retrieval_sets``, ``retrievers``,
   ``evaluation``, ``comparison``, ``eval_arguments``; mining: ``mining`` (the algorithm), ``miner`` (its driver);
6. entry points' shell: ``cli``; training checks: ``validation``.
"""

__version__ = "0.1.0"


class UserError(Exception):
    """A problem with the user's input (a flag, a file, a record).

    The entry scripts print its message as one line and exit with status 2, without a traceback.
    """
