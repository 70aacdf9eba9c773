"""One run per run directory: a lock held for the run, and what a fresh or resumed run finds.

The lock is ``fcntl.flock`` on ``run.lock``, which the kernel releases when the holder
exits, however it exits; the file keeps the holder's pid for the error a second run gets.
A fresh run refuses a directory holding another run's files unless told to clear them, so
a report never mixes two runs. ``--resume`` finds ``state.pt`` (the last completed epoch),
or, when a run was killed before completing its first epoch, starts it again from epoch 1.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .errors import RunError

log = logging.getLogger(__name__)

LOCK_NAME = "run.lock"
STATE_NAME = "state.pt"
#: Every file a run writes (besides the lock); ``overwrite`` removes exactly these.
RUN_FILES = (
    STATE_NAME,
    "log.jsonl",
    "report.json",
    "best.safetensors",
    "latest.safetensors",
    "swa.safetensors",
)


@dataclass
class RunDirectory:
    """A locked run directory; ``state`` is the training state to resume from, if any."""

    path: Path
    state: Path | None = None
    lock_existed: bool = False  # a run has locked it before (and may have died in epoch 1)
    _fd: int | None = None


# Directories this process holds, per thread, so that the CLI can lock before loading data
# and ``train`` inside it takes the same lock instead of deadlocking on it.
_HELD: dict[tuple[Path, int], RunDirectory] = {}


@contextmanager
def run_directory(
    out_dir: str | Path, *, resume: bool = False, overwrite: bool = False
) -> Iterator[RunDirectory]:
    """Lock ``out_dir`` for one run and prepare it; a nested call in the same thread reuses it.

    Raises ``RunError`` when another process holds the directory, when a fresh run finds
    another run's files (unless ``overwrite``, which removes them), or when ``resume``
    finds no trace of a run. Stale ``*.tmp`` files of a killed run are removed. Only rank 0
    of a distributed run locks and prepares; the other ranks just look for the state.
    """
    if resume and overwrite:
        raise RunError("give resume or overwrite, not both")
    path = Path(out_dir)
    if int(os.environ.get("RANK", "0")) != 0:
        yield RunDirectory(path, path / STATE_NAME if (path / STATE_NAME).is_file() else None)
        return
    path.mkdir(parents=True, exist_ok=True)
    key = (path.resolve(), threading.get_ident())
    if key in _HELD:
        yield _HELD[key]
        return
    run = _lock(path)
    _HELD[key] = run
    try:
        _prepare(run, resume=resume, overwrite=overwrite)
        yield run
    finally:
        del _HELD[key]
        os.close(run._fd)  # releases the flock


def _lock(path: Path) -> RunDirectory:
    lock = path / LOCK_NAME
    existed = lock.exists()
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise RunError(
            f"run directory {path} is in use by another run (pid {holder}, holding {lock}); "
            "wait for it to end or choose another directory"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return RunDirectory(path, lock_existed=existed, _fd=fd)


def _prepare(run: RunDirectory, *, resume: bool, overwrite: bool) -> None:
    path = run.path
    stale = sorted(p.name for p in path.iterdir() if p.name.endswith(".tmp"))
    for name in stale:
        (path / name).unlink(missing_ok=True)
    if stale:
        log.info("%s: removed temporary files of an interrupted write: %s", path, stale)
    present = [name for name in RUN_FILES if (path / name).exists()]
    if resume:
        if (path / STATE_NAME).is_file():
            run.state = path / STATE_NAME
            return
        if not present and not stale and not run.lock_existed:
            (path / LOCK_NAME).unlink()  # so that a retry with the same typo fails again
            raise RunError(
                f"{path}: nothing to resume: no training state ({STATE_NAME}) and no other "
                f"file of a run ({', '.join(RUN_FILES[1:])}); start the run without resuming"
            )
        log.warning(
            "%s: the run ended before completing its first epoch (no %s; found %s); "
            "starting it again from epoch 1",
            path,
            STATE_NAME,
            ", ".join(present + stale) or LOCK_NAME,
        )
        _remove(path, present)
    elif present:
        if not overwrite:
            raise RunError(
                f"run directory {path} holds another run ({', '.join(present)}); "
                "resume it (--resume), replace it (--overwrite) or choose another directory"
            )
        log.info("%s: removing the previous run's files %s", path, present)
        _remove(path, present)


def _remove(path: Path, names: list[str]) -> None:
    for name in names:
        (path / name).unlink(missing_ok=True)
