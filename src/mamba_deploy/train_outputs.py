"""What `mamba-deploy train` writes to disk besides the training state: the --out folder, checked
before any work and replaced whole at each save (snapshot), and the work folder beside it.

A save renames the previous --out aside (`.OUT.old`), renames the new snapshot in, then removes
the old one. A process killed between the two renames leaves no --out but `.OUT.old`: the next
run (or save) renames it back first, so the files a user keeps in --out are never lost."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from .atomic import (check_writable, json_text, prepare_output_dir, prepare_output_file, raise_out_of_space,
                     remove_stale_temps, temp_owner, temp_stem)
from .errors import OutputPathError

NAME_BYTES = 255  # a file name's limit on the usual filesystems (ext4, xfs, btrfs, tmpfs)


def save_snapshot(model, out: Path, dtype, metrics: dict) -> None:
    """Replace `out` with an fp16/bf16 HF folder (config, weights, tokenizer, train_log.json).
    A symlinked `out` is written where it points (the link stays a link)."""
    from .checkpoint import save_checkpoint

    out = Path(os.path.realpath(out))  # else the first save renamed the link aside, the second failed
    out.parent.mkdir(parents=True, exist_ok=True)
    recover_snapshot(out)
    remove_stale_temps(out.parent, out.name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{temp_stem(out.name)}.snap-{temp_owner()}-", dir=out.parent))
    shutil.rmtree(tmp)
    try:  # from the first write on: an interrupt while writing train_log.json left the whole snapshot
        save_checkpoint(model, tmp, dtype=dtype)
        (tmp / "train_log.json").write_text(json_text(metrics))
        _swap_in(tmp, out)
    except BaseException as e:  # noqa: BLE001 - re-raised, named for the output when the disk is full
        shutil.rmtree(tmp, ignore_errors=True)
        raise_out_of_space(e, out)


def _old(out: Path) -> Path:
    """Where a save puts the previous `out` while the new one is renamed in (a short enough name
    for an `out` near the 255-byte limit)."""
    return out.with_name(f".{temp_stem(out.name)}.old")


def recover_snapshot(out: Path) -> None:
    """`out` back from `.OUT.old` when a kill came between _swap_in's two renames (no `out`)."""
    out = Path(os.path.realpath(out))
    old = _old(out)
    if not os.path.lexists(out) and old.is_dir() and not old.is_symlink():
        old.rename(out)


def _remove(path: Path) -> None:
    if path.is_symlink():
        path.unlink()
    else:
        shutil.rmtree(path, ignore_errors=True)


def _swap_in(tmp: Path, out: Path) -> None:
    """Rename the folder `tmp` to `out`, replacing a previous `out`. What the previous `out`
    holds beside the snapshot's own files (a README, notes, an exported GGUF) is carried into
    the new one, as hard links where the filesystem allows (no copy of a large file)."""
    old = _old(out)
    if out.exists():
        for entry in out.iterdir():
            if not (tmp / entry.name).exists():
                try:
                    _link_or_copy(entry, tmp / entry.name)
                except PermissionError as e:  # an unreadable file: the previous snapshot stays as it is
                    raise OutputPathError(f"cannot carry {entry} into the new snapshot of --out {out} "
                                          f"({e.strerror or e}); it is kept where it is. Make it readable or move it "
                                          "out of --out, then --resume") from e
        _remove(old)
        out.rename(old)
    try:
        tmp.rename(out)
    except BaseException:  # interrupted between the two renames: the previous snapshot goes back
        if old.exists() and not out.exists():
            old.rename(out)
        raise
    _remove(old)


def _link_or_copy(src: Path, dst: Path) -> None:
    def link(a, b):
        try:
            os.link(a, b)
        except OSError:  # another filesystem, or one without hard links
            shutil.copy2(a, b)

    if src.is_dir() and not src.is_symlink():
        shutil.copytree(src, dst, symlinks=True, copy_function=link)
    elif src.is_symlink():
        os.symlink(os.readlink(src), dst)
    else:
        link(src, dst)


def check_outputs(args) -> Path:
    """Before any data loading or training: --out must be creatable (absent or empty), or a
    previous `train` output (it holds train_log.json) or the --tokenizer folder, which each save
    replaces (other files there are kept: see _swap_in). A model already there is replaced only
    by --resume or --overwrite. Its parent and the work folder, which must lie outside --out,
    must be writable. Returns the work folder."""
    out = Path(args.out)
    recover_snapshot(out)
    if out.exists() and not out.is_dir():
        raise OutputPathError(f"--out {out} is a file, not a folder; choose a folder path for the model")
    if out.is_dir() and any(out.iterdir()):
        ours = (out / "train_log.json").exists() or out.resolve() == Path(args.tokenizer).resolve()
        if not ours:
            raise OutputPathError(f"--out {out} is a non-empty folder that is not a `mamba-deploy train` output "
                                  "(no train_log.json); each save would replace it: choose a new path or delete it")
        if (out / "config.json").exists() and not (args.resume or getattr(args, "overwrite", False)):
            raise OutputPathError(f"--out {out} holds a model, which a fresh run would replace; pass --resume to "
                                  "continue the run that made it, --overwrite to replace it, or choose a new --out")
        real = Path(os.path.realpath(out))  # each save renames into the folder the link's target is in
        check_writable(real.parent, f"{real.parent} is not writable", "choose an output path under a writable folder")
    else:
        prepare_output_dir(out, OutputPathError)
    work = work_dir(args)
    if work.exists() and not work.is_dir():
        raise OutputPathError(f"--work-dir {work} is a file, not a folder; choose a folder path (default: OUT.work)")
    w, o = Path(os.path.realpath(work)), Path(os.path.realpath(out))  # a symlinked --out: where it points
    if w == o or o in w.parents:
        raise OutputPathError(f"--work-dir {work} lies inside --out {out}, which each save replaces (the training "
                              f"state would go with it); choose a folder outside it (default: {out}.work)")
    prepare_output_file(work / "train_state.pt")  # creates the folder and probes that it is writable
    return work


def work_dir(args) -> Path:
    """--work-dir, else OUT.work beside --out; OutputPathError when that default name is too long."""
    if args.work_dir:
        return Path(args.work_dir)
    out = Path(args.out)  # "runs/m/" is runs/m: its default work folder is runs/m.work, beside it
    out = out if out.name else out.absolute()  # "." has no name to extend
    work = out.with_name(out.name + ".work")
    if len(os.fsencode(work.name)) > NAME_BYTES:
        raise OutputPathError(f"--out {out.name[:40]}... is too long a name for its default work folder "
                              f"(OUT.work, {len(os.fsencode(work.name))} bytes, over {NAME_BYTES}); pass --work-dir "
                              "or a shorter --out")
    return work


def missing_dirs(*paths) -> list[Path]:
    """The folders among `paths` and their parents that do not exist yet, deepest first."""
    missing: list[Path] = []
    for p in paths:
        p = Path(p).absolute()
        while not p.exists() and p not in missing:
            missing.append(p)
            p = p.parent
    return sorted(missing, key=lambda p: len(p.parts), reverse=True)


def remove_empty(folders: list[Path]) -> None:
    for folder in folders:  # deepest first, so a parent is empty by the time its turn comes
        try:
            folder.rmdir()
        except OSError:  # gone, or holds a snapshot / training state worth keeping
            pass
