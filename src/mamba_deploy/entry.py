"""The `mamba-deploy` console script. Importing the CLI imports torch, which takes a second or
more; a Ctrl-C then was a KeyboardInterrupt traceback. Nothing has been written at that point, so
it is one line and the shell's 130, as cli.main reports interrupts later on.

After the command, the interpreter's shutdown runs the libraries' exit callbacks (thread pools,
progress-bar monitors, runtimes freeing their models). A Ctrl-C there raised KeyboardInterrupt
inside one of them: Python printed "Exception ignored in atexit callback ... KeyboardInterrupt"
and the process still exited 0. The command's work is done by then, so a signal in that window
ends the process at once, quietly, with the command's own exit status (and after the exit
callbacks, while modules are torn down, it is ignored: see _LEFT_TO_IGNORE)."""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import sys
import threading
import traceback


def main(argv=None) -> int:
    try:
        from .cli import main as cli_main
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    try:
        code = cli_main(argv)
    except Exception:
        if not _tp_rank():
            raise
        # a bug's traceback (cli_main reports the errors users cause): under tensor parallelism
        # the process ends here too, its group never torn down (see below and tp._abandon_group)
        from .cli import launcher_rank

        if launcher_rank() is not None:
            print(f"rank {launcher_rank()}: unexpected error", file=sys.stderr)
        traceback.print_exc()
        code = 1
    if _tp_rank():
        # a tensor-parallel rank: C++ teardown at interpreter exit aborted some finished runs
        # (tp.close_group), so the process ends here, its output flushed. Only a rank whose
        # command succeeded waits for the others; a failed one leaves at once, and torchrun
        # stops the ranks still waiting for it in an all-reduce
        if code == 0:
            sys.modules["mamba_deploy.tp"].close_group()
        _flush()
        os._exit(code)
    _exit_on_signals(code)
    return code


def _tp_rank() -> bool:
    """This process joined a tensor-parallel group (tp.init_distributed)."""
    tp = sys.modules.get("mamba_deploy.tp")
    return tp is not None and tp.joined()


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


def _exit_on_signals(code: int) -> None:
    """From here to the end of the process, SIGINT / SIGTERM / SIGHUP end it with `code`
    (stdout and stderr flushed first) instead of raising into an exit callback."""
    if threading.current_thread() is not threading.main_thread():
        return

    def leave(signum, frame):
        _flush()
        os._exit(code)

    sigs = [getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name)]
    for s in sigs:
        if signal.getsignal(s) is not signal.SIG_IGN:  # nohup's SIGHUP stays ignored
            signal.signal(s, leave)
            _LEFT_TO_IGNORE.append(s)


# signals _exit_on_signals handles, ignored by the last exit callback: right after the exit
# callbacks Python puts every signal it handles back to its default, which kills the process (a
# Ctrl-C while modules were torn down exited 130 after a complete write); one it ignores stays
# ignored. Registered when this module is imported, before the CLI imports any library, so it
# runs after their exit callbacks (last in, first out), which a signal still cuts short.
_LEFT_TO_IGNORE: list = []


def _ignore_late_signals() -> None:
    for s in _LEFT_TO_IGNORE:
        signal.signal(s, signal.SIG_IGN)


atexit.register(_ignore_late_signals)
