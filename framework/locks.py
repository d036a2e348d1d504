"""One `sae` process at a time per output directory.

Two processes writing the same directory corrupt each other's files (a training CSV log with two
writers, two harvests renaming the same `.partial` shards). The CLI takes an advisory lock
(`fcntl.flock`, non-blocking) on `LOCK_FILE` inside each directory a command writes, for as long
as the command runs. The kernel drops it when the process exits, crashed or killed, so a stale lock
never blocks a re-run; the file itself stays (empty of meaning once unlocked) and records the pid
of the last holder for the message a second process prints.

Under torchrun every rank runs the stage: only global rank 0 locks, so one job's ranks do not
refuse each other.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from framework.errors import FrameworkError

# Hidden, and matching no pattern a stage lists (shards, `.*.partial`, `.*.tmp`, COMPLETE).
LOCK_FILE = ".sae.lock"


class LockedError(FrameworkError):
    """Another process is writing the output directory."""


def _is_rank_zero() -> bool:
    return os.environ.get("RANK", "0") in ("", "0")


@contextlib.contextmanager
def output_locks(directories: list[Path], command: str) -> Iterator[None]:
    """Hold the lock of every directory in `directories` (created if missing) while the body runs.

    A directory that cannot be created (a file in its place) is not locked: the stage reports that
    itself, with a message for its own setting."""
    with contextlib.ExitStack() as stack:
        if _is_rank_zero():
            seen: set[Path] = set()
            for directory in directories:
                key = Path(os.path.abspath(directory))
                if key not in seen:
                    seen.add(key)
                    stack.enter_context(_lock(key, command))
        yield


@contextlib.contextmanager
def _lock(directory: Path, command: str) -> Iterator[None]:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
            raise LockedError(
                f"{directory} is being written by another sae process ({holder or 'pid unknown'}; "
                f"lock file {directory / LOCK_FILE}). Wait for it to finish, or point this command at "
                f"another directory (workdir=... or the stage's output_dir=...)"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}, `sae {command}`\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock
