"""synchub for desktop programs: is the shared data usable now, wait until it is, follow the
agent's changes, and find the data on disk. Pure Python, standard library only.

    import synchub

    synchub.wait_ready(timeout=60)          # raises synchub.NotReady after a minute
    tree = synchub.live_path(r"D:\\synchub")  # the folder of the data applied last

The agent on this PC is asked at ``SYNCHUB_AGENT_URL`` (default ``http://127.0.0.1:7071``).
The Tkinter block screen is in :mod:`synchub.tk`.
"""

from __future__ import annotations

from typing import Callable, Optional

from .agent import (
    DEFAULT_URL,
    Agent,
    AgentUnavailable,
    HubStatus,
    NotReady,
    ProtocolError,
    SpaceStatus,
    Status,
    Subscription,
    SynchubError,
)
from .paths import NoData, default_dir, live_path, space_root

__all__ = [
    "DEFAULT_URL",
    "Agent",
    "AgentUnavailable",
    "HubStatus",
    "NoData",
    "NotReady",
    "ProtocolError",
    "SpaceStatus",
    "Status",
    "Subscription",
    "SynchubError",
    "default_dir",
    "live_path",
    "space_root",
    "status",
    "subscribe",
    "wait_ready",
]

__version__ = "0.1.0"


def status(url: Optional[str] = None) -> Status:
    """The agent's status now (see :meth:`Agent.status`)."""
    return Agent(url).status()


def wait_ready(timeout: float, space: Optional[str] = None, url: Optional[str] = None) -> Status:
    """Waits up to ``timeout`` seconds until the data may be used (see :meth:`Agent.wait_ready`)."""
    return Agent(url).wait_ready(timeout, space)


def subscribe(
    on_change: Callable[[SpaceStatus], None],
    on_down: Optional[Callable[[SynchubError], None]] = None,
    url: Optional[str] = None,
) -> Subscription:
    """Calls ``on_change`` on every state change (see :meth:`Agent.subscribe`)."""
    return Agent(url).subscribe(on_change, on_down)
