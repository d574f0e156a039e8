"""The entry points' shell: logging set-up, flags parsed into dataclasses by ``HfArgumentParser``,
and a :class:`UserError` (a bad flag, file or record) reported as one ``error:`` line with exit
status 2, never a traceback. Every script calls :func:`run`."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from . import UserError

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def parser_for(*types, description: str | None = None, **kwargs):
    """An ``HfArgumentParser`` of ``types`` whose errors raise :class:`UserError` (one line, not
    argparse's usage block and exit, nor a traceback for an unknown flag), and whose every flag,
    aliases included, also takes dashes for underscores."""
    from transformers import HfArgumentParser

    class Parser(HfArgumentParser):
        def parse_args_into_dataclasses(self, *args, **kw):
            try:
                return super().parse_args_into_dataclasses(*args, **kw)
            except ValueError as err:  # unknown flags, or a dataclass's own check
                raise UserError(f"{err} (see --help)") from err

    parser = Parser(types, description=description, formatter_class=kwargs.pop(
        "formatter_class", argparse.RawDescriptionHelpFormatter), **kwargs)
    for action in list(parser._actions):
        for option in list(action.option_strings):
            dashed = option[:2] + option[2:].replace("_", "-")
            if option.startswith("--") and dashed not in parser._option_string_actions:
                action.option_strings.append(dashed)
                parser._option_string_actions[dashed] = action
    return one_line_errors(parser)


def one_line_errors(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``parser`` with its errors (an unknown flag, a bad value) raised as :class:`UserError`."""
    def error(message):
        raise UserError(f"{message} (see --help)")
    parser.error = error
    return parser


def run(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> int:
    """``main(argv)`` with logging set up; a :class:`UserError` ends it as ``error: <message>`` on
    stderr and exit status 2."""
    logging.basicConfig(format=LOG_FORMAT, level=logging.INFO)
    try:
        return main(argv) or 0
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
