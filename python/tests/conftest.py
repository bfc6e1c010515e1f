"""Fixtures that start the real programs on loopback: a hub (``synchub init`` + ``serve`` on
its embedded SQLite and blob folder) and agents (``synchub-agent run``), from the binaries in
``SYNCHUB_BIN_DIR`` (default: the repository's ``target/debug``), and an X server (Xvfb) for
the Tkinter tests. Every process started here is stopped at the end of its test.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional

import pytest

import synchub

REPO = Path(__file__).resolve().parents[2]


def bin_path(name: str) -> Path:
    folder = Path(os.environ.get("SYNCHUB_BIN_DIR", REPO / "target" / "debug"))
    path = folder / name
    if not path.is_file():
        pytest.fail(
            f"{path} is missing: build it with `cargo build -p synchub-hub -p synchub-client` "
            "(scripts/test does), or point SYNCHUB_BIN_DIR at a folder holding synchub and "
            "synchub-agent",
            pytrace=False,
        )
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_until(what: str, check: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"{what} did not happen within {timeout} s")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@dataclass
class Hub:
    url: str
    data_dir: Path
    agent_token: str
    publish_token: str
    work: Path
    proc: subprocess.Popen[bytes]

    def publish(self, files: Dict[str, bytes]) -> None:
        """Makes `files` the whole content of the space (`publish --mirror`)."""
        src = self.work / f"publish-{time.monotonic_ns()}"
        for name, body in files.items():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            (src / name).write_bytes(body)
        subprocess.run(
            [str(bin_path("synchub-agent")), "publish", "--hub", self.url, "--token",
             self.publish_token, "--user", "pytest", "--mirror", str(src)],
            check=True, capture_output=True, timeout=60,
        )
        shutil.rmtree(src)

    def blob_path(self, body: bytes) -> Path:
        """Where the hub's blob folder keeps the blob of `body`."""
        sha = hashlib.sha256(body).hexdigest()
        return self.data_dir / "blobs" / sha[0:2] / sha[2:4] / sha


@dataclass
class AgentProc:
    url: str
    dir: Path
    port: int
    hub: Hub
    procs: List[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def api(self) -> synchub.Agent:
        return synchub.Agent(self.url, timeout=5)

    def start(self) -> None:
        """Starts the agent (again, on the same folder and port) and waits for its local API."""
        log = open(self.dir.parent / f"{self.dir.name}.log", "ab")
        self.procs.append(subprocess.Popen(
            [str(bin_path("synchub-agent")), "run", "--hub", self.hub.url, "--token",
             self.hub.agent_token, "--dir", str(self.dir),
             "--status-listen", f"127.0.0.1:{self.port}"],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "RUST_LOG": "warn"},
        ))
        log.close()

        def answers() -> bool:
            try:
                synchub.Agent(self.url, timeout=1).status()
                return True
            except synchub.AgentUnavailable:
                return False

        wait_until("the agent's local API answering", answers)

    def stop(self) -> None:
        for p in self.procs:
            stop(p)


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[Hub]:
    synchub_bin = str(bin_path("synchub"))
    data = tmp_path / "hub"
    env = {**os.environ, "RUST_LOG": "warn"}
    subprocess.run([synchub_bin, "init", "--data-dir", str(data)], check=True,
                   capture_output=True, env=env, timeout=60)
    port = free_port()
    log = open(tmp_path / "hub.log", "ab")
    proc = subprocess.Popen(
        [synchub_bin, "serve", "--data-dir", str(data), "--listen", f"127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT, env=env,
    )
    log.close()
    url = f"http://127.0.0.1:{port}"
    try:
        def token(name: str) -> str:
            out = subprocess.run(
                [synchub_bin, "token", "create", "--data-dir", str(data), "--name", name,
                 "--role", "agent"], check=True, capture_output=True, env=env, timeout=60)
            return out.stdout.decode().strip()

        agent_token, publish_token = token("pc-pytest"), token("publisher")

        def knows_tokens() -> bool:
            req = urllib.request.Request(
                f"{url}/api/v1/spaces", headers={"Authorization": f"Bearer {publish_token}"})
            try:
                with urllib.request.urlopen(req, timeout=2) as r:
                    return bool(r.status == 200)
            except (urllib.error.URLError, OSError):
                return False

        wait_until("the hub answering with the new tokens", knows_tokens)
        yield Hub(url, data, agent_token, publish_token, tmp_path, proc)
    finally:
        stop(proc)


@pytest.fixture
def agent(hub: Hub, tmp_path: Path) -> Iterator[AgentProc]:
    """An agent of `hub`, not started yet (call `.start()`), stopped after the test."""
    port = free_port()
    a = AgentProc(f"http://127.0.0.1:{port}", tmp_path / "pc", port, hub)
    try:
        yield a
    finally:
        a.stop()


@pytest.fixture
def display() -> Iterator[str]:
    """A private X display from Xvfb, set as DISPLAY for the test."""
    xvfb = shutil.which("Xvfb")
    if xvfb is None:
        pytest.fail("Xvfb is missing: run scripts/install-test-deps (Debian package xvfb)",
                    pytrace=False)
    read, write = os.pipe()
    proc = subprocess.Popen([xvfb, "-displayfd", str(write), "-nolisten", "tcp",
                             "-screen", "0", "1024x768x24"],
                            pass_fds=(write,), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    os.close(write)
    try:
        number = b""
        deadline = time.monotonic() + 20
        while not number.endswith(b"\n") and time.monotonic() < deadline:
            chunk = os.read(read, 16)
            if not chunk:
                break
            number += chunk
        os.close(read)
        if not number.strip():
            pytest.fail("Xvfb did not start", pytrace=False)
        old: Optional[str] = os.environ.get("DISPLAY")
        os.environ["DISPLAY"] = f":{number.decode().strip()}"
        try:
            yield os.environ["DISPLAY"]
        finally:
            if old is None:
                os.environ.pop("DISPLAY", None)
            else:
                os.environ["DISPLAY"] = old
    finally:
        stop(proc)
