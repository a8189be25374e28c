"""Where Optuna keeps the studies: ``--storage`` URLs and the default journal file.

Default: a journal file next to the tuned output, ``<out>/.studies/<device-slug>/<model>.journal``
(``optuna.storages.JournalStorage`` over ``JournalFileBackend``): local, persistent, safe for several
processes on one host (``--gpus``), and a rerun with the same ``--out`` resumes every study in it.

``--storage`` forms:

- ``journal:PATH``: a journal file elsewhere (one host; not on NFS).
- ``sqlite:///PATH``: a local SQLite file (one process at a time is the safe use).
- ``postgresql[+driver]://...``, ``mysql[+driver]://...``: a database server, for workers on several hosts.
  Workers send heartbeats, so a trial of a worker that died is marked FAIL instead of staying RUNNING.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import optuna

_RDB_URL = re.compile(r"^(sqlite:///.+|(postgresql|mysql)(\+\w+)?://.+)$")
HEARTBEAT_S = 60


class StorageError(ValueError):
    """A ``--storage`` URL of a form this tool does not take."""


@dataclass(frozen=True)
class StorageSpec:
    """A parsed ``--storage``: ``kind`` is ``"journal"`` (``target`` is a file path) or ``"rdb"`` (a URL)."""

    kind: str
    target: str

    @property
    def url(self) -> str:
        """The ``--storage`` form of this spec (passed on to ``--gpus`` workers)."""
        return f"journal:{self.target}" if self.kind == "journal" else self.target


def studies_dir(out: Path, device_slug: str) -> Path:
    """``<out>/.studies/<device_slug>``: the default journals and the ``--gpus`` worker logs."""
    return Path(out) / ".studies" / device_slug


def default_journal(out: Path, device_slug: str, model: str) -> StorageSpec:
    """``<out>/.studies/<device_slug>/<model>.journal``."""
    return StorageSpec("journal", str(studies_dir(out, device_slug) / f"{model}.journal"))


def parse_storage(url: str) -> StorageSpec:
    """Parse a ``--storage`` URL (see the module docstring); raises StorageError for any other form."""
    if url.startswith("journal:"):
        path = url[len("journal:"):]
        if not path:
            raise StorageError("--storage journal:PATH needs a file path after 'journal:'")
        return StorageSpec("journal", str(Path(path).absolute()))
    if _RDB_URL.match(url):
        return StorageSpec("rdb", url)
    raise StorageError(f"--storage {url!r}: expected journal:PATH, sqlite:///PATH, postgresql://... or mysql://...")


def open_storage(spec: StorageSpec) -> optuna.storages.BaseStorage:
    """The Optuna storage for ``spec`` (creates the journal's directory; connects to a database)."""
    if spec.kind == "journal":
        Path(spec.target).parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(spec.target))
    return optuna.storages.RDBStorage(spec.target, heartbeat_interval=HEARTBEAT_S, grace_period=2 * HEARTBEAT_S)
