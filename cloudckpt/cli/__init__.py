"""The ``cloudckpt`` command line (``cloudckpt.cli:main``): the parser and exit codes in
:mod:`.parser`, the commands in :mod:`.metadata` and :mod:`.data`, what they share in
:mod:`.common`."""

from cloudckpt.cli.parser import main, parser

__all__ = ["main", "parser"]
