"""Never a partial output: every file and folder the toolkit writes goes through here.

Each writer fills a temporary name beside the target and renames it into place only when
complete (os.replace / rename are atomic on one filesystem); on any failure the temporary is
removed and the target is left as it was.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import re
import shutil
import signal
import socket
import stat
import sys
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Iterator


def _host() -> str:
    """This host and pid namespace: a pid means one process only within its namespace, and two
    containers sharing a host name (--network host, a set --hostname) and a folder each removed
    the other's live temporaries as stale. A container restarted in a new namespace leaves its
    predecessor's killed temporaries in place: kept, never a live one removed."""
    name = re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:24]
    try:
        ns = os.readlink("/proc/self/ns/pid")  # "pid:[4026531836]"; absent off Linux
    except OSError:
        return name
    return f"{name}n{hashlib.sha256(ns.encode()).hexdigest()[:6]}"


def temp_owner() -> str:
    """This process in a temporary's name (p<pid>h<host>): a later run can tell a temporary whose
    writer was killed (kill -9, a power cut: no cleanup ran) from one another process is still
    writing, and remove it (remove_stale_temps)."""
    return f"p{os.getpid()}h{_host()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process
        return True
    return True


TEMP_STEM_BYTES = 96  # of an output's name in its temporaries' names (NAME_MAX is 255 bytes)


def temp_stem(name: str) -> str:
    """`name` as the temporaries of that output start (after a dot): a name near the 255-byte
    limit is valid, but its temporary, ~45 bytes longer, was not (a raw OSError naming the
    temporary). Longer names keep a prefix and a hash of the whole, so each output has its own."""
    if len(os.fsencode(name)) <= TEMP_STEM_BYTES:  # the bytes on disk (a name that is not UTF-8 holds surrogates)
        return name
    cut = name
    while len(os.fsencode(cut)) > TEMP_STEM_BYTES - 9:
        cut = cut[:-1]
    return f"{cut}~{hashlib.sha256(os.fsencode(name)).hexdigest()[:8]}"


def remove_stale_temps(folder: Path, name: str) -> None:
    """Remove the temporaries of output `name` in `folder` whose writer on this host is gone, with
    a warning naming each: a killed writer's (full-size) temporary was otherwise never removed."""
    owner = re.compile(rf"^\.{re.escape(temp_stem(name))}\..*p(\d+)h{_host()}[.-]")  # written on this host
    with contextlib.suppress(OSError):
        for entry in folder.iterdir():
            m = owner.match(entry.name)
            if m is None or _alive(int(m.group(1))):
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            warnings.warn(f"removed {entry}, a temporary left by an earlier run (process {m.group(1)}) that was "
                          "killed before it finished", stacklevel=3)


def _output_mode(target: Path) -> int:
    """The mode a finished output file gets: an existing file's own (as `cp` and the shell's `>`
    keep it: a private 0600 result stayed private), else 0666 less the umask (mkstemp makes 0600;
    outputs are meant to be shared)."""
    try:
        return stat.S_IMODE(os.stat(target).st_mode)
    except OSError:
        return 0o666 & ~_umask()


def _umask() -> int:
    """The process's umask, read without setting it where Linux shows it: os.umask(0) and back
    left a window in which another thread's new files got mode 0666 under a private umask 077."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Folders _make_parent created in this process, outermost first: a command that fails removes
# those still empty (remove_created_folders), so a failed `export gguf out/sub/x.gguf` leaves no
# empty out/sub behind.
_created: list[Path] = []


def _make_parent(path: Path) -> None:
    from .errors import OutputPathError

    missing = [p for p in (path.parent, *path.parent.parents) if not p.exists()]  # deepest first
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a parent is a regular file, or no permission
        blocking = next((p for p in (path.parent, *path.parent.parents) if p.exists() and not p.is_dir()), None)
        if blocking is not None:  # mkdir says only "File exists" (or "Not a directory")
            raise OutputPathError(f"cannot write {path}: {blocking} is a file, not a folder; choose an output path "
                                  f"under a folder (or move {blocking} away)") from e
        raise OutputPathError(f"cannot create the folder for {path}: {e.strerror or e}; "
                              "choose an output path under a writable folder") from e
    _created.extend(reversed(missing))
    check_writable(path.parent, f"{path.parent} is not writable", "choose an output path under a writable folder")


def remove_created_folders(keep: bool = False) -> None:
    """Removes the folders output-path checks created that are still empty, deepest first (after
    a failed command: a folder holding anything, a finished output included, stays); keep=True
    only forgets them (after a command that succeeded)."""
    while _created:
        folder = _created.pop()
        if not keep:
            with contextlib.suppress(OSError):  # not empty, or gone
                folder.rmdir()


def check_writable(folder: Path, what: str, fix: str) -> None:
    """OutputPathError "{what} (reason); {fix}" unless a file can be created in `folder`: a real
    probe, since os.access says yes to root even on read-only mounts such as /proc."""
    from .errors import OutputPathError

    try:
        fd, probe = tempfile.mkstemp(prefix=".probe.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputPathError(f"{what} ({e.strerror or e}); {fix}") from e


def output_path(path) -> Path:
    """An output path as given, with `~` expanded as load_model does for inputs (else `~/out`
    became a folder named `~` in the working directory)."""
    from .errors import OutputPathError

    if not isinstance(path, (str, os.PathLike)):  # os.fspath's TypeError named no argument
        raise OutputPathError(f"the output path must be a file or folder name (str or Path), got "
                              f"{type(path).__name__} {path!r:.60}")
    if os.fspath(path) == "":  # Path("") is ".": the message would have been about the current folder
        raise OutputPathError("the output path is empty; give a file or folder name (\".\" for the current folder)")
    return Path(os.fspath(path)).expanduser()


def prepare_output_file(path, example: str = "model.gguf") -> Path:
    """Check up front, before any long work, that `path` can be written as a file. `example`:
    the file name suggested when `path` names a folder."""
    from .errors import OutputPathError

    folder_like = isinstance(path, str) and path.endswith(("/", os.sep))  # Path() drops the slash
    path = output_path(path)
    if path.is_dir() or folder_like:
        raise OutputPathError(f"output {path}{os.sep if folder_like else ''} names a folder; give a file name "
                              f"(e.g. {path / example})")
    if write_in_place(path):  # nothing is created beside it: its folder (/dev) need not be writable
        if not os.access(path, os.W_OK):
            raise OutputPathError(f"output {path} is not writable; choose another output path")
        return path
    _make_parent(link_target(path))  # the folder the file is renamed into, where a link points
    return path


# a file descriptor's own name: /proc/self/fd/N (what /dev/stdout links to), /dev/fd/N, /proc/PID/fd/N
_FD_NAME = re.compile(r"^/(?:proc/(self|thread-self|\d+)|dev)/fd/(\d+)$")


def own_descriptor(path) -> int | None:
    """N when `path`, or a link on the way to its file, names this process's descriptor N
    (/dev/stdout -> /proc/self/fd/1), else None. Opening that name opens the descriptor's file
    anew, at offset 0 and truncated (`--json /dev/stdout > log` wiped what the log held), and a
    rename over it replaces a link or a file that the descriptor never sees: such an output is
    written through the descriptor itself, after what this process printed."""
    p = os.path.abspath(path)
    for _ in range(40):  # the kernel's own limit on the links one lookup follows
        m = _FD_NAME.match(p)
        if m:
            mine = m.group(1) in (None, "self", "thread-self") or int(m.group(1)) == os.getpid()
            return int(m.group(2)) if mine else None
        try:
            target = os.readlink(p)
        except OSError:  # not a link: the end of the chain
            return None
        p = os.path.normpath(os.path.join(os.path.dirname(p), target))
    return None


def write_in_place(path: Path) -> bool:
    """Must `path` be written where it is, with no temporary renamed over it? So for an existing
    file that is not a regular file (a FIFO, /dev/null, a terminal), which a rename would replace
    by a regular one, and for this process's descriptors (own_descriptor). Such an output cannot
    be atomic, and needs not be: nothing reads it back as a file."""
    try:
        mode = os.stat(path).st_mode  # through links: what the name opens
    except OSError:  # absent, or a link to nothing: created by the rename
        return False
    return not stat.S_ISREG(mode) or own_descriptor(path) is not None


def link_target(path: Path, error_cls=None) -> Path:
    """Where an output written to `path` lands: a symbolic link's final target (also when it is
    missing), so that the link stays a link and its target is replaced, as `cp` and the shell's
    `>` do (a rename onto the link itself would replace the link by a regular file); any other
    path as it is. error_cls (OutputPathError): a loop of links."""
    if not path.is_symlink():
        return path
    try:
        return path.resolve()
    except (RuntimeError, OSError) as e:  # a loop (RuntimeError before Python 3.13)
        from .errors import OutputPathError

        raise (error_cls or OutputPathError)(f"output {path} is a symbolic link that never reaches a file ({e}); "
                                             "fix the link or choose another output path") from e


def refuse_input_file(out, inputs, flag: str, example: str) -> None:
    """OutputPathError when the output file `out` is an existing file among `inputs` (paths, or
    anything else, ignored), or lies in an input folder: a slip of the path (`--json
    model/config.json`) would replace a file the command reads. A new file there is fine. An input
    given as its folder's config.json or model.onnx stands for that folder; a GGUF file for the
    tokenizer files beside it, which its loaders read."""
    from .checkpoint import CONFIG_FILES
    from .tokenizer_files import TOKENIZER_FILES
    from .errors import OutputPathError

    out = output_path(out)
    if not out.is_file():
        return
    target = out.resolve()
    for src in inputs:
        if not isinstance(src, (str, os.PathLike)):
            continue
        p = output_path(src).resolve()
        folder = p.parent if p.is_file() and p.name in (*CONFIG_FILES, "model.onnx") else p
        beside = p.is_file() and target.parent == p.parent and target.name in TOKENIZER_FILES
        if target == p or folder in target.parents or beside:
            raise OutputPathError(f"{flag} {out} is a file of {src}, an input of this command, which it would "
                                  f"replace; write to a new path (e.g. {example})")


def prepare_output_dir(out, error_cls=FileExistsError) -> Path:
    """Check up front that `out` can become the output folder: absent, or empty and writable
    (error_cls otherwise), with a writable parent."""
    out = link_target(output_path(out), error_cls)  # a link's target gets the folder; the link stays
    if out.exists() and not out.is_dir():
        raise error_cls(f"output folder {out} is an existing file; choose a new path for the folder")
    if out.is_dir():
        finish_killed_moves(out, out.absolute().name)
        remove_stale_temps(out, out.absolute().name)  # a killed earlier writer's, filled in place
        if any(out.iterdir()):
            raise error_cls(f"output folder {out} exists and is not empty; choose a new path or delete it")
        check_writable(out, f"output folder {out} is not writable", "choose a new path under a writable folder")
    _make_parent(out)
    return out


# A full disk or a file-size limit, as each writer reports it: OSError's errno; numpy's tofile
# ("N requested and M written", no errno); safetensors ("os error 28"); torch.save's zip writer
# ("file write failed", or "unexpected pos" after a short write)
_DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}
_DISK_FULL_TEXT = ("No space left", "File too large", "Disk quota exceeded", "os error 28", "os error 27",
                   "os error 122", "file write failed", "unexpected pos")
_NUMPY_SHORT_WRITE = re.compile(r"\d+ requested and \d+ written")


def _disk_full(e: BaseException) -> bool:
    if isinstance(e, OSError) and e.errno in _DISK_FULL_ERRNOS:
        return True
    # any Exception: safetensors' SafetensorError derives from Exception alone
    return isinstance(e, Exception) and (any(t in str(e) for t in _DISK_FULL_TEXT)
                                         or _NUMPY_SHORT_WRITE.search(str(e)) is not None)


def out_of_space(e: BaseException, path) -> BaseException:
    """`e` as an OutputPathError naming `path` when it says the disk (or a file-size limit) is
    full; any other failure unchanged. One raised for an inner temporary (a file inside a folder
    being written) is named again for `path`, so the user reads the output they asked for."""
    from .errors import OutputPathError

    cause = e.__cause__ if isinstance(e, OutputPathError) and e.__cause__ is not None else e
    if not _disk_full(cause):
        return e
    reason = cause.strerror if isinstance(cause, OSError) and cause.strerror else str(cause).splitlines()[0][:200]
    err = OutputPathError(f"no space left to write {path} ({reason}); it was not written (an earlier one there is "
                          "kept). Free space on that disk, or choose an output path on another one")
    err.__cause__ = cause
    return err


def raise_out_of_space(e: BaseException, path) -> None:
    """Re-raise `e`, as out_of_space names it (call from an except block)."""
    err = out_of_space(e, path)
    if err is e:
        raise e
    raise err from err.__cause__


@contextlib.contextmanager
def atomic_file(path) -> Iterator[Path]:
    """with atomic_file(p) as tmp: write tmp  -> renamed to p when the block succeeds. A symbolic
    link p stays a link: its target is replaced. A pipe, a device or a file descriptor's name
    (--json /dev/stdout; see write_in_place) is itself what the block writes."""
    path = prepare_output_file(path)
    if write_in_place(path):
        with _written_in_place(path) as where:
            yield where
        return
    target = link_target(path)
    remove_stale_temps(target.parent, target.name)
    fd, tmp = tempfile.mkstemp(prefix=f".{temp_stem(target.name)}.{temp_owner()}.", suffix=".tmp",
                               dir=target.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, _output_mode(target))
        os.replace(tmp, target)
    except BaseException as e:  # noqa: BLE001 - re-raised, named for the output when the disk is full
        Path(tmp).unlink(missing_ok=True)
        raise_out_of_space(e, path)


@contextlib.contextmanager
def _written_in_place(path: Path) -> Iterator[Path]:
    """atomic_file's block for an output that write_in_place: written to a scratch file, which is
    copied to the pipe, device or descriptor of this process once the block ends (a writer may
    seek back to fill a header, which a pipe refuses; and a failed write sends nothing)."""
    fd = own_descriptor(path)
    try:
        with scratch_file(path, "out") as tmp:
            yield tmp
            if fd is not None:
                _copy_to_descriptor(tmp, fd)
            else:
                with open(tmp, "rb") as f, open(path, "wb") as out:
                    shutil.copyfileobj(f, out)
    except BaseException as e:  # noqa: BLE001 - re-raised, named for the output when the disk is full
        raise_out_of_space(e, path)


def _copy_to_descriptor(src: Path, fd: int) -> None:
    """src's bytes written to descriptor fd at its own offset, after what Python has buffered for
    stdout / stderr (a report printed before the JSON stays before it)."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # closed, or replaced by something without flush
            stream.flush()
    with open(src, "rb") as f, os.fdopen(os.dup(fd), "wb") as out:  # closing the copy leaves fd open
        shutil.copyfileobj(f, out)


def write_bytes(path, data: bytes) -> Path:
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)
    return output_path(path)


def write_text(path, text: str) -> Path:
    return write_bytes(path, text.encode())


def _finite_or_none(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_none(v) for v in obj]
    return obj


def json_text(obj, indent: int | None = 2) -> str:
    """Strict JSON (RFC 8259) for result files and --json output: NaN and infinities, which
    json.dumps writes as bare NaN / Infinity that other parsers (JavaScript's, jq) refuse,
    become null. They appear exactly when an artifact is broken (verify's errors, eval's ppl)."""
    return json.dumps(_finite_or_none(obj), indent=indent, allow_nan=False)


def write_json(path, obj, indent: int = 2) -> Path:
    return write_text(path, json_text(obj, indent))


def read_json_object(path) -> dict:
    """A JSON object file as a dict; {} when it is absent, unreadable or not an object (for
    optional metadata whose absence only means "recompute" or "use the default")."""
    try:
        if not Path(path).is_file():  # a FIFO would block the read for good
            return {}
        data = json.loads(Path(path).read_text(encoding="utf-8"))  # not the locale's (a C locale: ASCII)
    except (OSError, ValueError, RecursionError):  # RecursionError: nesting deeper than the parser's stack
        return {}
    return data if isinstance(data, dict) else {}


def read_tagged_json(path, fmt: str, kind: str, fix: str) -> dict:
    """A JSON file this project wrote with {"format": fmt}; ExportError naming the file, what it
    should be (kind) and the fix when it is not valid JSON or carries another format."""
    from .errors import ExportError

    path = Path(path)
    try:
        if path.exists() and not path.is_file():  # a FIFO would block the read for good
            raise ExportError(f"{path} is not a regular file; {fix}")
        obj = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:  # not JSON, or not UTF-8
        raise ExportError(f"{path} is not valid JSON ({e}); {fix}") from e
    except OSError as e:  # a folder, or unreadable
        raise ExportError(f"cannot read {path} ({e.strerror or e}); {fix}") from e
    if not isinstance(obj, dict) or obj.get("format") != fmt:
        found = obj.get("format") if isinstance(obj, dict) else type(obj).__name__
        raise ExportError(f"{path} is not a mamba-deploy {kind} (format={found!r}); {fix}")
    return obj


@contextlib.contextmanager
def atomic_dir(out, error_cls=FileExistsError) -> Iterator[Path]:
    """with atomic_dir(out) as tmp: fill tmp  -> `out` when the block succeeds.
    `out` must not exist or be an empty folder (error_cls otherwise). A new `out` is the
    temporary renamed; an existing empty one (a mount point, the current folder, a shared folder
    with its own mode and group) stays and the finished entries are moved into it."""
    out = prepare_output_dir(out, error_cls)
    in_place = out.is_dir()
    name = out.absolute().name  # "." has no name of its own
    parent = out if in_place else out.parent
    remove_stale_temps(parent, name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{temp_stem(name)}.tmp-{temp_owner()}-", dir=parent))
    try:
        yield tmp
        mask = _umask()
        os.chmod(tmp, 0o777 & ~mask)  # mkdtemp makes 0700; outputs are meant to be shared
        for f in tmp.rglob("*"):  # and so are files that writers made 0600 (safetensors' save_file)
            if f.is_file():
                os.chmod(f, 0o666 & ~mask)
        try:
            if in_place:
                _move_into(tmp, out, name)
            else:
                tmp.rename(out)  # fails, never merges, when another writer filled `out` meanwhile
        except OSError as e:
            raise error_cls(f"output folder {out} was written by another process or thread while this one ran "
                            f"({e.strerror or e}); its contents are kept: choose a new path, or delete it and "
                            "run again") from e
    except BaseException as e:  # noqa: BLE001 - re-raised, named for the output when the disk is full
        shutil.rmtree(tmp, ignore_errors=True)
        raise_out_of_space(e, out)


def _move_into(tmp: Path, out: Path, name: str) -> None:
    """Move tmp's entries into the folder out, which holds nothing but temporaries (OSError
    ENOTEMPTY when another writer has put something there meanwhile); then remove tmp. The check
    and the moves hold out's lock, and a Ctrl-C waits for the last move: the folder gets one
    writer's whole set, never a mix or a part. A move that fails puts the moved ones back."""
    ours = re.compile(rf"^\.{re.escape(temp_stem(name))}\.tmp-")
    with _folder_lock(out), renames_together() as hold:
        hold()
        if any(p != tmp and not ours.match(p.name) for p in out.iterdir()):
            raise OSError(errno.ENOTEMPTY, os.strerror(errno.ENOTEMPTY))
        # a kill -9 between two moves is finished by the next writer (finish_killed_moves): the
        # journal names the temporary (bytes: a name need not be UTF-8)
        journal = out / f".{temp_stem(name)}.tmp-{temp_owner()}-moving"
        journal.write_bytes(os.fsencode(tmp.name))
        moved = []
        try:
            for entry in list(tmp.iterdir()):
                entry.rename(out / entry.name)
                moved.append(entry.name)
        except BaseException:
            for done in moved:  # back where they were: `out` as it was found, empty
                with contextlib.suppress(OSError):
                    (out / done).rename(tmp / done)
            raise
        finally:
            journal.unlink(missing_ok=True)
    tmp.rmdir()


def finish_killed_moves(out: Path, name: str) -> None:
    """Complete the move into `out` of a writer killed while it moved its finished entries in
    (its journal names its temporary folder, which holds the rest; see _move_into): the output
    was whole, only not all in place. Without this the stale temporary, and the rest with it,
    was removed and `out` kept a part of the set."""
    stem = re.escape(temp_stem(name))
    journal = re.compile(rf"^\.{stem}\.tmp-p(\d+)h{_host()}-moving$")
    with contextlib.suppress(OSError, ValueError), _folder_lock(out):
        for entry in list(out.iterdir()):
            m = journal.match(entry.name)
            if m is None or _alive(int(m.group(1))):
                continue
            src = out / os.fsdecode(entry.read_bytes().strip())
            # only that writer's own temporary folder (not a link, not elsewhere)
            own = re.match(rf"^\.{stem}\.tmp-p{m.group(1)}h{_host()}-", src.name) and src.parent == out
            if own and src.is_dir() and not src.is_symlink():
                for left in src.iterdir():
                    if not (out / left.name).exists():
                        left.rename(out / left.name)
                shutil.rmtree(src, ignore_errors=True)
                warnings.warn(f"finished moving the output of an earlier run into {out} (process {m.group(1)} was "
                              "killed while moving it into place); it is complete", stacklevel=3)
            else:
                warnings.warn(f"{out} may hold a part of an earlier run's output (process {m.group(1)} was killed "
                              "while moving it into place, and the rest is gone); delete what it holds and run "
                              "again", stacklevel=3)
            entry.unlink()


@contextlib.contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """An exclusive flock on `folder` for the block. Two writers moving into one existing empty
    folder take turns, so the second finds the first's files instead of both finding it empty.
    The kernel releases it when the process dies. Where there is no flock (Windows, a network
    mount without locks) the block runs unguarded."""
    fd = None
    try:
        import fcntl
        fd = os.open(folder, os.O_RDONLY)
    except (ImportError, OSError):
        pass  # (the block runs outside this handler: its errors carry no "during handling of" context)
    if fd is None:
        yield
        return
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # and with it the lock


# what renames_together holds: Ctrl-C, a process manager's stop, a closed terminal
HELD_SIGNALS = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, n))


@contextlib.contextmanager
def renames_together() -> Iterator:
    """with renames_together() as hold: ... hold(*targets) ...  From hold() to the block's end a
    Ctrl-C, SIGTERM or SIGHUP waits and is delivered after (also when the block raises), so
    renames that belong together (a GGUF and its Modelfile, a folder's entries) all happen or none
    does. Call hold() once the files are written, just before the renames (the block's inner
    `with`s exit). A second signal while held is delivered at once: a rename that hangs (a full
    network mount) can still be stopped. Targets that are written in place (a pipe, a FIFO,
    /dev/stdout: their copy, which may block on a reader, runs in the exit) hold nothing. The
    handlers are swapped, not the signal mask: any thread may take a process's signal. A no-op
    off the main thread, where handlers cannot be set."""
    old: dict = {}
    got: list = []

    def record(signum, frame) -> None:
        got.append((signum, frame))
        if len(got) > 1:  # asked twice: now
            release()
            deliver()

    def hold(*targets) -> None:
        if old or threading.current_thread() is not threading.main_thread():
            return
        if any(write_in_place(output_path(t)) for t in targets):
            return
        for sig in HELD_SIGNALS:
            handler = signal.getsignal(sig)
            if handler not in (None, signal.SIG_IGN):  # None: set from C, cannot be put back
                old[sig] = handler
                signal.signal(sig, record)

    def release() -> None:
        for sig, handler in old.items():
            signal.signal(sig, handler)

    def deliver() -> None:
        for signum, frame in got[:1]:  # the first one decides, as it would have
            del got[:]
            if callable(old[signum]):
                old[signum](signum, frame)  # Python's SIGINT handler raises KeyboardInterrupt; the CLI's, Terminated
            else:
                signal.raise_signal(signum)  # SIG_DFL: the default action, now

    try:
        yield hold
    finally:
        release()
        deliver()  # raised over the block's own error, if any (chained to it): a stop is never lost


@contextlib.contextmanager
def scratch_file(beside, tag: str = "scratch") -> Iterator[Path]:
    """with scratch_file(p) as tmp: an intermediate file with a unique name beside `p` (concurrent
    writers of one output never share it), removed when the block ends, whatever happens."""
    beside = output_path(beside)
    # in the folder prepare_output_file checked: a link's target's; never in /dev beside /dev/null
    folder = Path(tempfile.gettempdir()) if write_in_place(beside) else link_target(beside).parent
    remove_stale_temps(folder, beside.name)
    fd, tmp = tempfile.mkstemp(prefix=f".{temp_stem(beside.name)}.{tag}.{temp_owner()}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        yield Path(tmp)
    finally:
        Path(tmp).unlink(missing_ok=True)


def write_files(folder, files: dict) -> dict:
    """Several files ({name: bytes}) into `folder` as one set -> {name: path}. A new folder appears
    only complete (atomic_dir); into an existing one, every file is first written in full under a
    temporary name and the renames follow, so a failure while writing leaves the previous set whole."""
    from .errors import OutputPathError

    folder = output_path(folder)
    if not folder.exists():
        with atomic_dir(folder, OutputPathError) as tmp:
            for name, data in files.items():
                (tmp / name).write_bytes(data)
        return {name: folder / name for name in files}
    # every atomic_file renames on leaving the stack, after all were written; a failure unlinks them all
    with renames_together() as hold, contextlib.ExitStack() as stack:
        for name, data in files.items():
            stack.enter_context(atomic_file(folder / name)).write_bytes(data)
        hold(*(folder / name for name in files))
    return {name: folder / name for name in files}
