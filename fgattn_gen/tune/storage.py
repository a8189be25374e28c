"""Where Optuna keeps the studies: ``--storage`` URLs, the default journal file, and what keeps a study
whole when a tuning process dies.

Default: a journal file next to the tuned output, ``<out>/.studies/<device-slug>/<model>.journal``
(``optuna.storages.JournalStorage`` over ``JournalFileBackend``): local, persistent, safe for several
processes on one host (``--gpus``), and a rerun with the same ``--out`` resumes every study in it.

``--storage`` forms:

- ``journal:PATH``: a journal file elsewhere (one host; not on NFS).
- ``sqlite:///PATH``: a local SQLite file (one process at a time is the safe use); its folder must exist.
- ``postgresql[+driver]://...``, ``mysql[+driver]://...``: a database server, for workers on several hosts.

Surviving a killed process (SIGKILL, OOM killer, power loss):

- Journal appends are serialised by ``flock`` on ``<journal>.flock`` (``FlockLock``), which the kernel
  releases when its holder dies; Optuna's default symlink lock would stay behind and stall the next run.
- A journal that cannot be replayed (a truncated or garbage line) is reported by ``check_journal`` with its
  path, the line and the ways out: ``--repair`` (``repair_journal``: the file is copied to
  ``<journal>.bak-<UTC time>`` and cut before the first bad line; every later line is in the copy) or a new
  study file (``--storage journal:NEW``). Nothing is dropped without that.
- A trial whose process died stays RUNNING in the storage. Every tuning process holds a ``StorageLease``
  (a shared POSIX lock on ``<storage file>.live``) for its lifetime, and ``study.recover_stale_trials`` fails
  the trials no live process can own (see there); their variants are enqueued again with the same params.
  RDB storages also send Optuna heartbeats (``HEARTBEAT_S``, or ``FGATTN_HEARTBEAT_S``), so a server database
  fails the trials of a dead worker on another host after the grace period (twice the interval), and its
  retry callback (``RetryHeartbeatStaleTrialCallback(max_retry=1)``) enqueues each such trial once again with
  the same params; a surviving worker picks it up (``study.run_study`` waits for other workers' RUNNING
  trials).
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import re
import shutil
import socket
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import optuna

from ..environment import writable_dir_problem

_RDB_URL = re.compile(r"^(sqlite:///.+|(postgresql|mysql)(\+\w+)?://.+)$")
HEARTBEAT_S = 60  # RDB heartbeat interval; FGATTN_HEARTBEAT_S overrides it (tests); grace period twice that
_PARTIAL_LINE_WAIT_S = 0.5  # a last line without its newline may be another process's append in flight


class StorageError(ValueError):
    """A ``--storage`` URL of a form this tool does not take, or a storage that cannot be opened or read."""


class JournalError(StorageError):
    """A journal file that Optuna cannot replay; the message names the file, the line and the ways out."""


@dataclass(frozen=True)
class StorageSpec:
    """A parsed ``--storage``: ``kind`` is ``"journal"`` (``target`` is a file path) or ``"rdb"`` (a URL)."""

    kind: str
    target: str

    @property
    def url(self) -> str:
        """The ``--storage`` form of this spec (passed on to ``--gpus`` workers)."""
        return f"journal:{self.target}" if self.kind == "journal" else self.target

    @property
    def local_file(self) -> Path | None:
        """The file that holds the studies when it is on this host (journal, SQLite), else None."""
        if self.kind == "journal":
            return Path(self.target)
        if self.target.startswith("sqlite:///"):
            return Path(self.target[len("sqlite:///"):])
        return None


def studies_dir(out: Path, device_slug: str) -> Path:
    """``<out>/.studies/<device_slug>``: the default journals and the ``--gpus`` worker logs."""
    return Path(out) / ".studies" / device_slug


def default_journal(out: Path, device_slug: str, model: str) -> StorageSpec:
    """``<out>/.studies/<device_slug>/<model>.journal``."""
    return StorageSpec("journal", str(studies_dir(out, device_slug) / f"{model}.journal"))


def parse_storage(url: str) -> StorageSpec:
    """Parse a ``--storage`` URL (see the module docstring); raises StorageError for any other form, or a
    journal / SQLite file whose folder cannot be written (a SQLite folder must exist)."""
    if url.startswith("journal:"):
        path = url[len("journal:"):]
        if not path:
            raise StorageError("--storage journal:PATH needs a file path after 'journal:'")
        spec = StorageSpec("journal", str(Path(path).absolute()))
    elif _RDB_URL.match(url):
        spec = StorageSpec("rdb", url)
    else:
        raise StorageError(f"--storage {url!r}: expected journal:PATH, sqlite:///PATH, postgresql://... or mysql://...")
    local = spec.local_file
    if local is not None:
        if local.exists() and not local.is_file():
            raise StorageError(f"--storage {url}: {local} is not a regular file")
        problem = writable_dir_problem(local.parent, create=spec.kind == "journal")
        if problem:
            raise StorageError(f"--storage {url}: {problem}")
    return spec


class FlockLock:
    """Journal append lock: ``flock`` on ``<journal>.flock``; the kernel releases it when its process dies.
    (``JournalFileBackend`` only calls ``acquire`` and ``release`` of its ``lock_obj``.)"""

    def __init__(self, journal: str):
        self._path = journal + ".flock"
        self._fd: int | None = None

    def acquire(self) -> bool:
        fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return True

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


def _bad_line(path: Path) -> tuple[int, str, int] | None:
    """``(line number, what is wrong, number of lines)`` of the first line Optuna cannot replay, or None."""
    data = path.read_bytes()
    lines = data.split(b"\n")
    complete, tail = lines[:-1], lines[-1]
    for number, line in enumerate(complete, start=1):
        try:
            log = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return number, "not a JSON record (garbage or a torn write)", len(complete) + bool(tail)
        if not isinstance(log, dict) or "op_code" not in log:
            return number, "not an Optuna journal record", len(complete) + bool(tail)
    if tail:
        return len(complete) + 1, "truncated (no end of line)", len(complete) + 1
    return None


def check_journal(path: str | os.PathLike) -> None:
    """Raise JournalError, naming ``path``, its first bad line and the ways out, when the journal has a line
    Optuna would stop at (``JSONDecodeError``) or silently skip and later corrupt (a last line without its
    newline; re-read once after ``_PARTIAL_LINE_WAIT_S`` in case another process is appending it)."""
    path = Path(path)
    if not path.exists():
        return
    bad = _bad_line(path)
    if bad is not None and bad[1].startswith("truncated"):
        time.sleep(_PARTIAL_LINE_WAIT_S)
        bad = _bad_line(path)
    if bad is None:
        return
    number, what, total = bad
    raise JournalError(
        f"study journal {path}: line {number} of {total} is {what}. Rerun with --repair to copy the file to "
        f"{path}.bak-<time> and cut it before line {number} ({total - number + 1} line(s) dropped; the trials they "
        f"recorded are run again), or start new studies with --storage journal:NEW.journal")


def repair_journal(path: str | os.PathLike) -> tuple[Path, int] | None:
    """Cut the journal before its first bad line after copying it to ``<path>.bak-<UTC time>``; returns
    ``(backup, lines dropped)``, or None when nothing is wrong. The cut is a prefix of the log, so the studies
    stay consistent (trials recorded only in dropped lines are measured again)."""
    path = Path(path)
    if not path.exists():
        return None
    bad = _bad_line(path)
    if bad is None:
        return None
    number, _, total = bad
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
    backup = path.with_name(f"{path.name}.bak-{stamp}")
    shutil.copy2(path, backup)
    keep = b"".join(line + b"\n" for line in path.read_bytes().split(b"\n")[: number - 1])
    with open(path, "r+b") as f:
        f.truncate(len(keep))
        f.flush()
        os.fsync(f.fileno())
    return backup, total - number + 1


def heartbeat_s() -> int:
    """The RDB heartbeat interval in seconds: ``FGATTN_HEARTBEAT_S`` (an int >= 1) or ``HEARTBEAT_S``."""
    text = os.environ.get("FGATTN_HEARTBEAT_S", "")
    try:
        value = int(text)
    except ValueError:
        return HEARTBEAT_S
    return value if value >= 1 else HEARTBEAT_S


def open_storage(spec: StorageSpec) -> optuna.storages.BaseStorage:
    """The Optuna storage for ``spec`` (creates the journal's directory; connects to a database); raises
    JournalError for a journal that cannot be replayed and StorageError for one that cannot be opened."""
    if spec.kind == "journal":
        try:
            Path(spec.target).parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"--storage {spec.url}: cannot create its folder: {exc}") from None
        check_journal(spec.target)
        try:
            return optuna.storages.JournalStorage(
                optuna.storages.journal.JournalFileBackend(spec.target, lock_obj=FlockLock(spec.target)))
        except (ValueError, KeyError, TypeError, AssertionError) as exc:
            raise JournalError(f"study journal {spec.target}: cannot be replayed ({type(exc).__name__}: {exc}); "
                               f"start new studies with --storage journal:NEW.journal") from None
        except OSError as exc:
            raise StorageError(f"--storage {spec.url}: {exc}") from None
    try:
        heartbeat = heartbeat_s()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            if hasattr(optuna.storages, "RetryHeartbeatStaleTrialCallback"):  # Optuna >= 4.9
                retry = {"heartbeat_stale_trial_callback":
                         optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1)}
            else:
                retry = {"failed_trial_callback": optuna.storages.RetryFailedTrialCallback(max_retry=1)}
            return optuna.storages.RDBStorage(spec.target, heartbeat_interval=heartbeat, grace_period=2 * heartbeat,
                                              **retry)
    except Exception as exc:  # SQLAlchemy's OperationalError, a missing driver (ImportError), ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise StorageError(f"--storage {spec.url}: cannot open it ({type(exc).__name__}: {first})") from None


# ---------------------------------------------------------------------------------------- process liveness
def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def process_token(pid: int) -> str | None:
    """What identifies process ``pid`` beyond its number (its start time since this boot), so that a reused
    PID is not taken for the old process; None when there is no such live process. Without ``/proc``: the
    PID alone (``os.kill(pid, 0)``)."""
    if not isinstance(pid, int) or pid <= 0:
        return None
    if os.path.isdir("/proc/self"):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            return None
        except (OSError, IndexError):
            pass
        else:
            if fields[0] in ("Z", "X"):  # a zombie has exited
                return None
            return f"{_boot_id()}:{fields[19]}"  # field 22 of stat: start time in clock ticks after boot
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return f"pid:{pid}"


def this_process() -> dict:
    """User attrs that name the process running a trial (``worker_pid`` is what bench/tune_checks.py reads)."""
    return {"worker_pid": os.getpid(), "worker_host": socket.gethostname(),
            "worker_token": process_token(os.getpid())}


def process_alive(attrs: dict) -> bool | None:
    """Whether the process named by ``this_process()`` attrs runs; None when it cannot be told (another host,
    or no owner recorded)."""
    if attrs.get("worker_host") != socket.gethostname() or "worker_pid" not in attrs:
        return None
    token = process_token(int(attrs["worker_pid"]))
    return token is not None and token == attrs.get("worker_token", token)


class StorageLease:
    """A shared POSIX lock on ``<storage file>.live`` held by every tuning process for its lifetime (for a
    local journal or SQLite file; a server database has none). ``alone()`` tells whether any other process
    holds it: if none does, no RUNNING trial of the storage can have a live owner. The lock goes with the
    process (the kernel drops it on any death, SIGKILL included)."""

    def __init__(self, spec: StorageSpec):
        local = spec.local_file
        self.path = None if local is None else local.with_name(local.name + ".live")
        self._fd = None
        if self.path is not None:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            fcntl.lockf(self._fd, fcntl.LOCK_SH)

    def alone(self) -> bool:
        """True when no other process holds the lease (then this one holds it exclusively until ``shared()``)."""
        if self._fd is None:
            return False
        try:
            fcntl.lockf(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a POSIX lock converts in place
        except OSError:
            return False
        return True

    def shared(self) -> None:
        """Back to the shared lock after ``alone()`` returned True."""
        if self._fd is not None:
            fcntl.lockf(self._fd, fcntl.LOCK_SH)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
