"""The package against a real hub and agent: status, wait_ready, the event subscription and
the live data path follow a publish; a blocked agent makes wait_ready time out and a retry
unblocks it; an agent that is not running, or restarts, is reported and followed again."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import List

import pytest

import synchub
from conftest import AgentProc, Hub, free_port, wait_until


def test_status_wait_ready_events_and_live_path_follow_a_publish(
    hub: Hub, agent: AgentProc
) -> None:
    hub.publish({"clase.json": b'{"clasa": "IX A"}'})
    agent.start()
    status = agent.api.wait_ready(timeout=20)
    space = status.space()
    assert space.state == "ready" and space.allows_use
    assert status.allows_use
    tree = synchub.live_path(agent.dir)
    assert (tree / "clase.json").read_bytes() == b'{"clasa": "IX A"}'
    # The module-level functions ask the agent named by SYNCHUB_AGENT_URL.
    assert synchub.status(agent.url).space().version == space.version

    seen: List[synchub.SpaceStatus] = []
    new_version = threading.Event()

    def on_change(s: synchub.SpaceStatus) -> None:
        seen.append(s)
        if s.allows_use and s.version > space.version:
            new_version.set()

    with agent.api.subscribe(on_change) as sub:
        wait_until("the subscription's first event", lambda: bool(seen))
        assert seen[0].version == space.version, "first the current state"
        hub.publish({"clase.json": b'{"clasa": "X B"}'})
        assert new_version.wait(20), f"no ready event for the new version: {seen}"
    assert not sub.running, "close() stops the thread"
    count = len(seen)
    hub.publish({"clase.json": b'{"clasa": "XI C"}'})
    agent.api.wait_ready(timeout=20)
    time.sleep(0.3)
    assert len(seen) == count, "no callback after close()"

    newer = synchub.live_path(agent.dir)
    assert newer != tree, "a new version is a new tree"
    assert (newer / "clase.json").read_bytes() == b'{"clasa": "XI C"}'


def test_wait_ready_times_out_while_blocked_and_a_retry_unblocks(
    hub: Hub, agent: AgentProc
) -> None:
    good = b'{"elevi": 28}'
    hub.publish({"elevi.json": good})
    # The blob is damaged on the hub's disk: the agent's download fails its hash check.
    hub.blob_path(good).write_bytes(b'{"elevi": 99}')
    agent.start()
    started = time.monotonic()
    with pytest.raises(synchub.NotReady) as err:
        agent.api.wait_ready(timeout=2)
    assert 1.9 <= time.monotonic() - started < 5
    assert err.value.status is not None
    assert not err.value.status.allows_use
    with pytest.raises(synchub.NoData):
        synchub.live_path(agent.dir)
    wait_until("the agent reporting the failure",
               lambda: agent.api.status().space().state == "failed")
    failed = agent.api.status().space()
    assert "hash" in (failed.error or "").lower() or "mismatch" in (failed.error or "").lower()

    hub.blob_path(good).write_bytes(good)
    agent.api.sync_now()
    ready = agent.api.wait_ready(timeout=20)
    assert ready.space().allows_use
    assert (synchub.live_path(agent.dir) / "elevi.json").read_bytes() == good


def test_an_agent_that_is_not_running_is_reported_and_followed_again(
    hub: Hub, agent: AgentProc
) -> None:
    nobody = synchub.Agent(f"http://127.0.0.1:{free_port()}", timeout=2)
    started = time.monotonic()
    with pytest.raises(synchub.AgentUnavailable):
        nobody.status()
    with pytest.raises(synchub.AgentUnavailable):
        nobody.wait_ready(timeout=5)
    assert time.monotonic() - started < 5

    hub.publish({"a.txt": b"a"})
    agent.start()
    agent.api.wait_ready(timeout=20)
    changes: List[synchub.SpaceStatus] = []
    downs: List[synchub.SynchubError] = []
    with agent.api.subscribe(changes.append, downs.append, retry_secs=0.2):
        wait_until("the first event", lambda: len(changes) == 1)
        agent.stop()
        wait_until("the outage reported", lambda: len(downs) == 1)
        agent.start()
        wait_until("the events after the restart", lambda: len(changes) >= 2, timeout=20)
    assert len(downs) == 1, "one report per outage"
    assert isinstance(downs[0], synchub.AgentUnavailable)


def test_live_path_before_any_data(tmp_path: Path) -> None:
    with pytest.raises(synchub.NoData):
        synchub.live_path(tmp_path)
    with pytest.raises(synchub.SynchubError):
        synchub.live_path(tmp_path, space="../x")
