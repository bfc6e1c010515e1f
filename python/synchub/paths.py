"""Where the shared data is on this PC: the live tree the agent applied last.

The agent keeps each version as a read-only tree under ``DIR/.synchub/trees/<name>/`` and
names the live one in ``DIR/.synchub/live`` (one line), which it replaces atomically. That
file works the same on Linux, macOS and Windows (where ``DIR\\current`` is a junction that
some file systems cannot hold), so this module reads it rather than following ``current``.
With several spaces, each lives in ``DIR/<space>/``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Optional, Union

from .agent import SynchubError

PathLike = Union[str, "os.PathLike[str]"]

# The agent replaces `live` by an atomic rename. On Windows a file being replaced can refuse to
# open for a moment (a sharing violation): retry for up to 2 s, as the agent does.
_READ_ATTEMPTS = 20
_READ_PAUSE = 0.1


class NoData(SynchubError):
    """The agent has not applied any version in this folder yet."""


def default_dir() -> Path:
    """The agent's folder: ``SYNCHUB_DIR`` if set, else the default of the Windows service
    (``%ProgramData%\\synchub\\data``) on Windows, else ``./synchub-data``."""
    env = os.environ.get("SYNCHUB_DIR")
    if env:
        return Path(env)
    if os.name == "nt":
        return Path(os.environ.get("ProgramData", r"C:\ProgramData")) / "synchub" / "data"
    return Path("synchub-data")


def space_root(data_dir: Optional[PathLike] = None, space: Optional[str] = None) -> Path:
    """The folder of ``space`` inside the agent's ``data_dir``: ``DIR/<space>`` when the agent
    follows several spaces, else ``DIR`` itself."""
    root = Path(data_dir) if data_dir is not None else default_dir()
    if space is not None:
        if not space or "/" in space or "\\" in space or space in (".", ".."):
            raise SynchubError(f"not a space name: {space!r}")
        nested = root / space
        if (nested / ".synchub" / "live").is_file():
            return nested
    return root


def live_path(data_dir: Optional[PathLike] = None, space: Optional[str] = None) -> Path:
    """The folder holding the data applied last, e.g.
    ``D:\\synchub\\.synchub\\trees\\42-1a2b3c4d``. Resolve it once per unit of work and read
    everything below it: a live tree never changes, a new version is a different tree.
    Raises :class:`NoData` before the first version is applied."""
    root = space_root(data_dir, space)
    live = root / ".synchub" / "live"
    name = ""
    for attempt in range(_READ_ATTEMPTS):
        try:
            with open(live, encoding="utf-8") as f:
                name = f.read(4096).strip()
            break
        except FileNotFoundError:
            raise NoData(f"no data has been applied in {root} yet") from None
        except PermissionError:
            if attempt + 1 == _READ_ATTEMPTS:
                raise
        time.sleep(_READ_PAUSE)
    if not name or "/" in name or "\\" in name or name in (".", ".."):
        raise SynchubError(f"{live} does not name a tree: {name!r:.100}")
    tree = root / ".synchub" / "trees" / name
    if not tree.is_dir():
        raise NoData(f"{live} names {name}, which is not there")
    return tree
