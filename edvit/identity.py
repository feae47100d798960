"""A stable default id for a service started without `--id`.

The id names the service's retained topics (its status and stats) and labels its
Prometheus series, so it must survive a restart: a process id would start new topics and
new series each time. It must also be unique among the instances running at once, since
several aggregators elect one of them by id (edvit/lease.py). `HostSlot` gives both:
`{hostname}-{n}`, the lowest n that no other running process on this host holds for the
same kind, held with an flock on a file in the temporary directory until `release` or the
end of the process. A restarted instance gets its number back; a second one running beside
it gets the next.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import tempfile
from pathlib import Path

from edvit.errors import ConfigError

MAX_SLOTS = 1000


class HostSlot:
    """Holds `{hostname}-{n}` for `kind` (e.g. `aggregator`) while this object lives."""

    def __init__(self, kind: str, directory: Path | None = None) -> None:
        folder = directory or Path(tempfile.gettempdir())
        host = socket.gethostname().split(".")[0] or "host"
        for n in range(1, MAX_SLOTS + 1):
            fd = _open(folder / f"edvit-{kind}-{n}.lock")
            if fd is None:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                continue
            self._fd: int | None = fd
            self.id = f"{host}-{n}"
            return
        raise ConfigError(f"no free default id for a {kind} on this host: pass --id")

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the file drops the lock
            self._fd = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # at interpreter exit the process ends anyway
            self.release()


def _open(path: Path, tries: int = 3) -> int | None:
    """A read-only descriptor of the lock file, made if missing (None: not usable). Another
    user's file in a sticky temporary directory opens read-only without O_CREAT, which the
    kernel refuses there (fs.protected_regular); a read-only descriptor takes an flock."""
    try:
        return os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        pass
    except OSError:
        return None
    try:
        return os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:  # made by another process meanwhile
        return _open(path, tries - 1) if tries > 1 else None
    except OSError:
        return None
