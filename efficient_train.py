#!/usr/bin/env python
"""Contrastive training of a dual encoder with GradCache (--mini_batch_size).

Same training as origin_train.py, with memory bounded by the mini-batch instead of the contrastive
batch. `python efficient_train.py --help` lists the flags.
"""

from longcontrast.training import main as _main


def main(argv=None) -> int:
    return _main(argv, gradcache=True)


if __name__ == "__main__":
    raise SystemExit(main())
