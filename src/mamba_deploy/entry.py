"""The `mamba-deploy` console script. Importing the CLI imports torch, which takes a second or
more; a Ctrl-C then was a KeyboardInterrupt traceback. Nothing has been written at that point, so
it is one line and the shell's 130, as cli.main reports interrupts later on."""

from __future__ import annotations

import sys


def main(argv=None) -> int:
    try:
        from .cli import main as cli_main
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return cli_main(argv)
