#!/usr/bin/env python
"""Plain contrastive training of a dual encoder: the whole batch is encoded with autograd.

The baseline that efficient_train.py must match. `python origin_train.py --help` lists the flags.
"""

from longcontrast.training import main as _main


def main(argv=None) -> int:
    return _main(argv, gradcache=False)


if __name__ == "__main__":
    raise SystemExit(main())
