"""One `sae` process at a time per output directory.

Two processes writing the same directory corrupt each other's files (a training CSV log with two
writers, two harvests renaming the same `.partial` shards). The CLI takes an advisory lock
(`fcntl.flock`, non-blocking) on a lock file beside each directory a command writes
(`lock_path`: `.NAME.sae.lock` in its parent, so that a refused or failing stage still leaves
no output directory behind), for as long as the command runs. The kernel drops it when the process exits, crashed or killed, so a stale lock
never blocks a re-run; the file itself stays (empty of meaning once unlocked) and records the pid
of the last holder for the message a second process prints.

Under torchrun every rank runs the stage: only global rank 0 locks, so one job's ranks do not
refuse each other (nor do the processes Lightning starts itself for `train.devices` > 1, which
carry LOCAL_RANK but no RANK: `distributed.current_rank`). `sae sweep --point N` (one SLURM array task per point) waits for the shared
LM and store's locks instead of refusing them (`wait=True`): the first task makes them.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from framework.distributed import current_rank
from framework.errors import FrameworkError

log = logging.getLogger(__name__)


def lock_path(directory: Path) -> Path:
    """The lock file of `directory`: hidden, beside it, matching no pattern a stage lists."""
    return directory.parent / f".{directory.name}.sae.lock"


class LockedError(FrameworkError):
    """Another process is writing the output directory."""


def _is_rank_zero() -> bool:
    return current_rank().is_main


@contextlib.contextmanager
def output_locks(directories: list[Path], command: str, wait: bool = False) -> Iterator[None]:
    """Hold the lock of every directory in `directories` while the body runs (their parents are
    created if missing; the directories themselves are the stages' to create). A directory
    another process holds is refused, or with `wait`, waited for (saying so in the log).

    Where the lock file cannot be made (a file where a parent should be), nothing is locked: the
    stage reports the problem itself, with a message for its own setting."""
    with contextlib.ExitStack() as stack:
        if _is_rank_zero():
            seen: set[Path] = set()
            for directory in directories:
                key = Path(os.path.abspath(directory))
                if key not in seen:
                    seen.add(key)
                    stack.enter_context(_lock(key, command, wait))
        yield


@contextlib.contextmanager
def lock_file(path: Path, mode: int = 0o644) -> Iterator[int | None]:
    """The open lock file `path` (made, with its parents, if missing) for `fcntl.flock`, or None
    where it cannot be made. Closing it on leaving releases whatever lock was taken on it."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, mode)
    except OSError:
        yield None
        return
    try:
        yield fd
    finally:
        os.close(fd)


@contextlib.contextmanager
def _lock(directory: Path, command: str, wait: bool = False) -> Iterator[None]:
    path = lock_path(directory)
    with lock_file(path) as fd:
        if fd is None:
            yield
            return
        if not _try_lock(fd):
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
            if not wait:
                raise LockedError(
                    f"{directory} is being written by another sae process ({holder or 'pid unknown'}; "
                    f"lock file {path}). Wait for it to finish, or point this command at "
                    f"another directory (workdir=... or the stage's output_dir=...)"
                )
            log.info("waiting for another sae process (%s) to finish writing %s", holder or "pid unknown", directory)
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}, `sae {command}`\n".encode(), 0)
        yield


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True
