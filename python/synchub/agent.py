"""The agent's local API on this PC, for desktop programs: its status, waiting until the
shared data may be used, and a subscription to its state changes over server-sent events.

The agent (``synchub-agent run``) serves ``GET /status`` (JSON), ``GET /events`` (one
``event: state`` per change of a space, each carrying the same fields as a space of
``/status``) and ``POST /sync`` on 127.0.0.1 (``status_listen``, by default port 7071). Every
call here has a deadline; nothing blocks forever unless asked to.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional

DEFAULT_URL = "http://127.0.0.1:7071"
"""Where the agent listens unless ``SYNCHUB_AGENT_URL`` or ``url=`` says otherwise."""

# The agent's SSE keep-alive comes every 15 s: a stream silent for longer is dead.
_STREAM_IDLE_SECS = 45.0
# An event is one JSON object of a few hundred bytes; refuse a line that is far longer.
_MAX_LINE = 1 << 20


class SynchubError(Exception):
    """Base of every error this package raises."""


class AgentUnavailable(SynchubError):
    """The agent did not answer (not running, wrong address, or too slow)."""


class ProtocolError(SynchubError):
    """The agent answered something this package does not understand."""


class NotReady(SynchubError, TimeoutError):
    """The data did not become usable before the deadline; ``status`` is the last one seen."""

    def __init__(self, message: str, status: Optional[Status]) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class SpaceStatus:
    """One space as the agent sees it. ``allows_use`` is the only field a program must obey."""

    space: str
    state: str
    """``starting``, ``ready``, ``sync_required``, ``downloading``, ``verifying``,
    ``applying`` or ``failed``."""
    allows_use: bool
    version: int
    """The version of the data held on this PC."""
    target: Optional[int] = None
    """The version being fetched, while one is."""
    hub_version: Optional[int] = None
    bytes_done: int = 0
    bytes_total: int = 0
    files_done: int = 0
    files_total: int = 0
    bytes_per_sec: int = 0
    forced: bool = False
    error: Optional[str] = None
    """Why the last attempt failed (state ``failed``)."""
    retry_at: Optional[str] = None
    last_error: Optional[str] = None
    applied_at: Optional[str] = None
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def progress(self) -> Optional[float]:
        """Fraction of the download done (0.0 to 1.0) while downloading, else ``None``."""
        if self.state != "downloading" or self.bytes_total <= 0:
            return None
        return min(self.bytes_done, self.bytes_total) / self.bytes_total

    @classmethod
    def from_json(cls, obj: Any) -> SpaceStatus:
        if not isinstance(obj, dict):
            raise ProtocolError(f"a space status is not an object: {obj!r:.200}")
        try:
            return cls(
                space=_str(obj, "space"),
                state=_str(obj, "state"),
                allows_use=bool(obj["allows_use"]),
                version=_int(obj.get("version")) or 0,
                target=_int(obj.get("target")),
                hub_version=_int(obj.get("hub_version")),
                bytes_done=_int(obj.get("bytes_done")) or 0,
                bytes_total=_int(obj.get("bytes_total")) or 0,
                files_done=_int(obj.get("files_done")) or 0,
                files_total=_int(obj.get("files_total")) or 0,
                bytes_per_sec=_int(obj.get("bytes_per_sec")) or 0,
                forced=bool(obj.get("forced", False)),
                error=_opt_str(obj, "error"),
                retry_at=_opt_str(obj, "retry_at"),
                last_error=_opt_str(obj, "last_error"),
                applied_at=_opt_str(obj, "applied_at"),
                raw=dict(obj),
            )
        except KeyError as e:
            raise ProtocolError(f"a space status lacks {e}: {obj!r:.200}") from None


@dataclass(frozen=True)
class HubStatus:
    """The agent's link to the hub."""

    url: str
    mode: str
    """``websocket`` while pushes arrive, ``fallback`` while the agent polls over HTTP."""
    connected: bool
    last_head_check: Optional[str] = None
    last_error: Optional[str] = None


@dataclass(frozen=True)
class Status:
    """A snapshot of ``GET /status``."""

    client_id: str
    hub: HubStatus
    spaces: List[SpaceStatus]

    @property
    def allows_use(self) -> bool:
        """True when every space the agent follows may be used."""
        return bool(self.spaces) and all(s.allows_use for s in self.spaces)

    def space(self, name: Optional[str] = None) -> SpaceStatus:
        """The space called ``name``; without a name, the only one (an agent of one space)."""
        if name is None:
            if len(self.spaces) != 1:
                raise SynchubError(
                    f"the agent follows {len(self.spaces)} spaces; name one of "
                    f"{[s.space for s in self.spaces]}"
                )
            return self.spaces[0]
        for s in self.spaces:
            if s.space == name:
                return s
        raise SynchubError(f"the agent does not follow the space {name!r}")

    @classmethod
    def from_json(cls, obj: Any) -> Status:
        if not isinstance(obj, dict) or not isinstance(obj.get("hub"), dict):
            raise ProtocolError(f"not an agent status: {obj!r:.200}")
        hub = obj["hub"]
        spaces = obj.get("spaces")
        if not isinstance(spaces, list):
            raise ProtocolError(f"an agent status without spaces: {obj!r:.200}")
        return cls(
            client_id=str(obj.get("client_id", "")),
            hub=HubStatus(
                url=str(hub.get("url", "")),
                mode=str(hub.get("mode", "")),
                connected=bool(hub.get("connected", False)),
                last_head_check=_opt_str(hub, "last_head_check"),
                last_error=_opt_str(hub, "last_error"),
            ),
            spaces=[SpaceStatus.from_json(s) for s in spaces],
        )


class Agent:
    """The agent on this PC. ``url`` defaults to ``SYNCHUB_AGENT_URL`` or
    ``http://127.0.0.1:7071``; ``timeout`` bounds each plain request in seconds."""

    def __init__(self, url: Optional[str] = None, timeout: float = 5.0) -> None:
        self.url = (url or os.environ.get("SYNCHUB_AGENT_URL") or DEFAULT_URL).rstrip("/")
        parsed = urllib.parse.urlsplit(self.url)
        if parsed.scheme != "http" or not parsed.hostname:
            raise SynchubError(f"the agent's address must be http://HOST:PORT, not {self.url!r}")
        self._host = parsed.hostname
        self._port = parsed.port or 80
        self.timeout = timeout

    def __repr__(self) -> str:
        return f"Agent({self.url!r})"

    def status(self) -> Status:
        """The agent's status now; raises :class:`AgentUnavailable` if it does not answer."""
        return Status.from_json(self._request("GET", "/status"))

    def sync_now(self) -> Status:
        """Starts a pending download, or retries a failed one, at once."""
        return Status.from_json(self._request("POST", "/sync"))

    def wait_ready(self, timeout: float, space: Optional[str] = None) -> Status:
        """Waits until the data may be used (``space``, or every space) and returns that
        status. Raises :class:`NotReady` after ``timeout`` seconds, and
        :class:`AgentUnavailable` when the agent does not answer at all."""
        deadline = time.monotonic() + timeout
        status = self.status()
        if _usable(status, space):
            return status
        spaces = {s.space: s for s in status.spaces}
        try:
            for event in self.events(deadline=deadline):
                spaces[event.space] = event
                current = Status(status.client_id, status.hub, list(spaces.values()))
                if _usable(current, space):
                    return current
        except AgentUnavailable:
            if time.monotonic() < deadline:
                raise
        last = Status(status.client_id, status.hub, list(spaces.values()))
        states = ", ".join(f"{s.space}: {s.state}" for s in last.spaces)
        raise NotReady(f"the shared data is not ready after {timeout:g} s ({states})", last)

    def events(
        self, deadline: Optional[float] = None, stop: Optional[threading.Event] = None
    ) -> Iterator[SpaceStatus]:
        """One :class:`SpaceStatus` per state change, from ``GET /events``; first the
        current state of every space. Ends at ``deadline`` (a ``time.monotonic()`` value)
        or when ``stop`` is set; raises :class:`AgentUnavailable` when the stream breaks."""
        return self._events(deadline, stop, None)

    def _events(
        self,
        deadline: Optional[float],
        stop: Optional[threading.Event],
        opened: Optional[Callable[[http.client.HTTPConnection], None]],
    ) -> Iterator[SpaceStatus]:
        conn = http.client.HTTPConnection(self._host, self._port, timeout=self._wait(deadline))
        if opened is not None:
            opened(conn)
        try:
            try:
                conn.request("GET", "/events", headers={"Accept": "text/event-stream"})
                resp = conn.getresponse()
            except (OSError, http.client.HTTPException) as e:
                raise AgentUnavailable(f"the agent at {self.url} does not answer: {e}") from e
            if resp.status != 200:
                raise AgentUnavailable(f"the agent at {self.url} answered {resp.status} on /events")
            event = ""
            data: List[str] = []
            while not (stop is not None and stop.is_set()):
                wait = self._wait(deadline, idle=_STREAM_IDLE_SECS)
                if wait <= 0:
                    return
                if conn.sock is not None:
                    conn.sock.settimeout(wait)
                try:
                    line = resp.readline(_MAX_LINE + 1)
                except socket.timeout:
                    if deadline is not None and time.monotonic() >= deadline:
                        return
                    raise AgentUnavailable(
                        f"the agent at {self.url} sent nothing for {_STREAM_IDLE_SECS:g} s"
                    ) from None
                except (OSError, http.client.HTTPException) as e:
                    if stop is not None and stop.is_set():
                        return
                    raise AgentUnavailable(f"the event stream from {self.url} broke: {e}") from e
                if not line:
                    if stop is not None and stop.is_set():
                        return
                    raise AgentUnavailable(f"the agent at {self.url} closed the event stream")
                if len(line) > _MAX_LINE:
                    raise ProtocolError("the agent sent an event line of more than 1 MiB")
                text = line.decode("utf-8", errors="replace").rstrip("\r\n")
                if text == "":
                    if event in ("", "state") and data:
                        yield SpaceStatus.from_json(_json("\n".join(data)))
                    event, data = "", []
                elif text.startswith(":"):
                    continue
                else:
                    name, _, value = text.partition(":")
                    value = value[1:] if value.startswith(" ") else value
                    if name == "event":
                        event = value
                    elif name == "data":
                        data.append(value)
        finally:
            conn.close()

    def subscribe(
        self,
        on_change: Callable[[SpaceStatus], None],
        on_down: Optional[Callable[[SynchubError], None]] = None,
        retry_secs: float = 1.0,
    ) -> Subscription:
        """Calls ``on_change`` with every state change on a background thread, starting with
        the current state of every space. While the agent cannot be reached ``on_down`` is
        called (once per outage) and the stream is opened again every ``retry_secs``.
        Stop it with :meth:`Subscription.close` (or use it as a context manager)."""
        return Subscription(self, on_change, on_down, retry_secs)

    def _wait(self, deadline: Optional[float], idle: Optional[float] = None) -> float:
        limit = idle if idle is not None else self.timeout
        if deadline is None:
            return limit
        return min(limit, deadline - time.monotonic())

    def _request(self, method: str, path: str) -> Any:
        conn = http.client.HTTPConnection(self._host, self._port, timeout=self.timeout)
        try:
            conn.request(method, path, headers={"Accept": "application/json"})
            resp = conn.getresponse()
            body = resp.read(_MAX_LINE + 1)
        except (OSError, http.client.HTTPException) as e:
            raise AgentUnavailable(f"the agent at {self.url} does not answer: {e}") from e
        finally:
            conn.close()
        if resp.status >= 300:
            raise AgentUnavailable(f"the agent at {self.url} answered {resp.status} on {path}")
        if len(body) > _MAX_LINE:
            raise ProtocolError(f"the agent's answer on {path} is over 1 MiB")
        return _json(body.decode("utf-8", errors="replace"))


class Subscription:
    """A running :meth:`Agent.subscribe`; its callbacks run on its own daemon thread."""

    def __init__(
        self,
        agent: Agent,
        on_change: Callable[[SpaceStatus], None],
        on_down: Optional[Callable[[SynchubError], None]],
        retry_secs: float,
    ) -> None:
        self._agent = agent
        self._on_change = on_change
        self._on_down = on_down
        self._retry = max(0.05, retry_secs)
        self._stop = threading.Event()
        self._conn: Optional[http.client.HTTPConnection] = None
        self._thread = threading.Thread(target=self._run, name="synchub-events", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 5.0) -> None:
        """Stops the subscription; no callback runs after this returns (unless one is
        running right now and takes longer than ``timeout``)."""
        self._stop.set()
        conn = self._conn
        if conn is not None and conn.sock is not None:
            # Wakes the thread out of its read at once.
            try:
                conn.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _opened(self, conn: http.client.HTTPConnection) -> None:
        self._conn = conn

    def _run(self) -> None:
        down = False
        while not self._stop.is_set():
            try:
                for change in self._agent._events(None, self._stop, self._opened):
                    down = False
                    if self._stop.is_set():
                        return
                    self._on_change(change)
            except SynchubError as e:
                if not down and not self._stop.is_set() and self._on_down is not None:
                    self._on_down(e)
                down = True
                self._stop.wait(self._retry)


def _usable(status: Status, space: Optional[str]) -> bool:
    if space is None:
        return status.allows_use
    return any(s.space == space and s.allows_use for s in status.spaces)


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as e:
        raise ProtocolError(f"the agent sent invalid JSON ({e}): {text[:200]!r}") from None


def _str(obj: Dict[str, Any], key: str) -> str:
    value = obj[key]
    if not isinstance(value, str):
        raise ProtocolError(f"{key} is not a string: {value!r:.100}")
    return value


def _opt_str(obj: Dict[str, Any], key: str) -> Optional[str]:
    value = obj.get(key)
    return value if isinstance(value, str) else None


def _int(value: Any) -> Optional[int]:
    return value if isinstance(value, int) and not isinstance(value, bool) else None
