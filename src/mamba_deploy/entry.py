"""The `mamba-deploy` console script. Importing the CLI imports torch, which takes a second or
more; a Ctrl-C then was a KeyboardInterrupt traceback. Nothing has been written at that point, so
it is one line and the shell's 130, as cli.main reports interrupts later on.

After the command, the interpreter's shutdown runs the libraries' exit callbacks (thread pools,
progress-bar monitors, runtimes freeing their models). A Ctrl-C there raised KeyboardInterrupt
inside one of them: Python printed "Exception ignored in atexit callback ... KeyboardInterrupt"
and the process still exited 0. The command's work is done by then, so a signal in that window
ends the process at once, quietly, with the command's own exit status."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading


def main(argv=None) -> int:
    try:
        from .cli import main as cli_main
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    code = cli_main(argv)
    _exit_on_signals(code)
    return code


def _exit_on_signals(code: int) -> None:
    """From here to the end of the process, SIGINT / SIGTERM / SIGHUP end it with `code`
    (stdout and stderr flushed first) instead of raising into an exit callback."""
    if threading.current_thread() is not threading.main_thread():
        return

    def leave(signum, frame):
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)

    for name in ("SIGINT", "SIGTERM", "SIGHUP"):
        s = getattr(signal, name, None)
        if s is not None and signal.getsignal(s) is not signal.SIG_IGN:  # nohup's SIGHUP stays ignored
            signal.signal(s, leave)
