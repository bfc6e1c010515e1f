"""The Tkinter block screen: what it says for each state (no display needed), and on a real
X display (Xvfb) against a real agent, that it covers the window and takes the input while a
sync has failed, offers "Try again now", and goes away when the data is ready."""

from __future__ import annotations

import time
import tkinter as tk
from typing import Any, Callable, Dict, List

import synchub
from conftest import AgentProc, Hub
from synchub.tk import BlockScreen, describe


def space(**fields: Any) -> synchub.SpaceStatus:
    obj: Dict[str, Any] = {"space": "global_version", "version": 3, "allows_use": False}
    obj.update(fields)
    return synchub.SpaceStatus.from_json(obj)


def test_what_the_screen_says_for_each_state() -> None:
    ready = describe([space(state="ready", allows_use=True)])
    assert not ready.blocked

    downloading = describe([space(state="downloading", target=4, bytes_done=2_100_000,
                                  bytes_total=5_400_000, files_done=1, files_total=3)])
    assert downloading.blocked
    assert "2.1 of 5.4 MB (38%)" in downloading.headline
    assert downloading.progress is not None and abs(downloading.progress - 2.1 / 5.4) < 1e-9
    assert not downloading.retry

    failed = describe([space(state="failed", target=4, error="hash mismatch")], lang="ro")
    assert failed.blocked and failed.retry and failed.progress is None
    assert "hash mismatch" in failed.detail and "Actualizarea" in failed.headline

    stale = describe([space(state="failed", target=4, error="x", allows_use=True,
                            stale_allowed=True)])
    assert not stale.blocked, "unblock_stale: the agent allows use, so does the screen"

    # One space blocked of two blocks the program.
    both = describe([space(state="ready", allows_use=True),
                     space(space="qr", state="sync_required", target=9, forced=True)])
    assert both.blocked and "administrator" in both.headline

    down = describe([space(state="ready", allows_use=True)], agent_error="connection refused")
    assert down.blocked and "not running" in down.headline
    lenient = describe([space(state="ready", allows_use=True)], agent_error="refused",
                       block_when_agent_down=False)
    assert not lenient.blocked
    assert describe([]).blocked, "nothing known yet: blocked"


def pump(root: tk.Tk, until: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        root.update()
        if until():
            return
        time.sleep(0.02)
    raise AssertionError("the block screen did not get there in time")


def test_the_block_screen_covers_the_window_until_the_data_is_ready(
    display: str, hub: Hub, agent: AgentProc
) -> None:
    good = b"cod,nume\n1,Cluj\n"
    hub.publish({"orase.csv": good})
    hub.blob_path(good).write_bytes(b"damaged\n")
    agent.start()

    root = tk.Tk()
    try:
        root.geometry("600x400")
        entry = tk.Entry(root)
        entry.pack(fill="both", expand=True)
        readies: List[synchub.SpaceStatus] = []
        screen = BlockScreen(root, agent.api, on_ready=readies.append)

        def covered_by_failure() -> bool:
            return screen.blocked and "did not finish" in screen.screen.headline

        pump(root, covered_by_failure)
        pump(root, lambda: root.grab_current() is screen.frame)
        assert screen.frame.winfo_ismapped()
        # What is under the middle of the window is the cover, not the program's entry.
        x = root.winfo_rootx() + root.winfo_width() // 2
        y = root.winfo_rooty() + root.winfo_height() // 2
        assert root.winfo_containing(x, y) is not entry
        assert screen._button.winfo_ismapped(), "a failed sync offers Try again now"
        assert readies == []

        hub.blob_path(good).write_bytes(good)
        screen._button.invoke()
        pump(root, lambda: not screen.blocked)
        root.update()
        assert not screen.frame.winfo_ismapped()
        assert root.grab_current() is None
        assert root.winfo_containing(x, y) is entry
        assert len(readies) == 1 and readies[0].allows_use
        assert (synchub.live_path(agent.dir) / "orase.csv").read_bytes() == good

        # A new version: on_ready again, once, with the new version.
        hub.publish({"orase.csv": good + b"2,Iasi\n"})
        pump(root, lambda: len(readies) == 2)
        assert readies[1].version > readies[0].version
        screen.close()
    finally:
        root.destroy()
