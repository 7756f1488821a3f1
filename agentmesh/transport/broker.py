"""`LocalBroker`: a throwaway mosquitto on a free 127.0.0.1 port, for tests, benchmarks and demos.

    with LocalBroker() as broker:                      # anonymous
        link = MqttLink(broker.url, graph="g")
    with LocalBroker(username="edge", password="s3cret") as broker:   # password file
        ...
    broker.restart(down_s=0.5)                         # stop, wait, start again on the same port

It listens on 127.0.0.1 only, keeps its config, password file, persistence database and log in a
private temporary directory, and persists sessions (so queued QoS 1 messages survive `restart()`).
"""
from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from agentmesh.errors import TransportError

HOST = "127.0.0.1"
_SEARCH = ("/usr/sbin", "/usr/local/sbin", "/usr/bin", "/usr/local/bin", "/opt/homebrew/sbin")


def find_mosquitto(program: str = "mosquitto") -> str:
    """Path of a mosquitto executable, or `TransportError` saying how to install it."""
    found = shutil.which(program) or next(
        (str(Path(d) / program) for d in _SEARCH if os.access(Path(d) / program, os.X_OK)), None)
    if found is None:
        raise TransportError(f"{program} is not installed; install it with `apt-get install -y mosquitto` "
                             "(or your system's mosquitto package)")
    return found


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class LocalBroker:
    """A mosquitto process bound to 127.0.0.1 on a free port (or `port`)."""

    def __init__(self, *, port: int | None = None, username: str | None = None,
                 password: str | None = None, persistence: bool = True,
                 startup_timeout: float = 10.0) -> None:
        if (username is None) != (password is None):
            raise TransportError("LocalBroker needs both username and password, or neither")
        self.username, self._password = username, password
        self.persistence = persistence
        self.startup_timeout = startup_timeout
        self._fixed_port = port
        self.port = port or 0
        self._dir: tempfile.TemporaryDirectory[str] | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        return HOST

    @property
    def url(self) -> str:
        return f"mqtt://{HOST}:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def log_path(self) -> Path:
        return self._workdir / "mosquitto.log"

    @property
    def _workdir(self) -> Path:
        if self._dir is None:
            self._dir = tempfile.TemporaryDirectory(prefix="agentmesh-mosquitto-")
        return Path(self._dir.name)

    def start(self) -> "LocalBroker":
        if self.running:
            return self
        binary = find_mosquitto()
        tries = 1 if self._fixed_port or self.port else 5
        for attempt in range(tries):
            if not self.port:
                self.port = free_port()
            try:
                self._launch(binary)
                return self
            except TransportError:
                # Another process took the port between probing and binding: pick a new one.
                if attempt == tries - 1 or self._fixed_port:
                    raise
                self.port = 0
        raise AssertionError("unreachable")

    def _launch(self, binary: str) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            # Without this a broker already on the port would answer our readiness check.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((HOST, self.port))
            except OSError as exc:
                raise TransportError(f"cannot start mosquitto on {HOST}:{self.port}: {exc}") from None
        work = self._workdir
        lines = [f"listener {self.port} {HOST}", f"user {getpass.getuser()}",
                 f"log_dest file {work / 'mosquitto.log'}", "log_type error", "log_type warning",
                 "log_type notice", "max_queued_messages 100000", "max_inflight_messages 64"]
        if self.persistence:
            (work / "data").mkdir(exist_ok=True)
            lines += ["persistence true", f"persistence_location {work / 'data'}/"]
        if self.username is not None:
            passwd = work / "passwd"
            passwd.touch(mode=0o600)
            tool = find_mosquitto("mosquitto_passwd")
            done = subprocess.run([tool, "-b", str(passwd), self.username, self._password or ""],
                                  capture_output=True, text=True, timeout=30)
            if done.returncode != 0:
                raise TransportError(f"mosquitto_passwd failed: {done.stderr.strip() or done.stdout.strip()}")
            lines += ["allow_anonymous false", f"password_file {passwd}"]
        else:
            lines += ["allow_anonymous true"]
        conf = work / "mosquitto.conf"
        conf.write_text("\n".join(lines) + "\n")
        # stderr goes to a file: a pipe nobody reads could fill up and stall the broker.
        with open(work / "stderr.log", "ab") as err:
            self._proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL,
                                          stderr=err, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self._proc = None
                raise TransportError(f"mosquitto exited while starting on {HOST}:{self.port}: "
                                     f"{self._log_tail()}")
            try:
                with socket.create_connection((HOST, self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.02)
        self.stop()
        raise TransportError(f"mosquitto did not accept connections on {HOST}:{self.port} within "
                             f"{self.startup_timeout:.1f} s: {self._log_tail()}")

    def _log_tail(self) -> str:
        text = ""
        for name in ("stderr.log", "mosquitto.log"):
            try:
                text += (self._workdir / name).read_text(errors="replace")
            except OSError:
                pass
        return " ".join(text.split())[-300:] or "(no log)"

    def stop(self) -> None:
        """Stop mosquitto (SIGTERM, so it saves its persistence database; SIGKILL after 5 s)."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)

    def restart(self, down_s: float = 0.0) -> None:
        """Stop, stay down `down_s` seconds, and start again on the same port, keeping sessions
        and queued messages when `persistence` is on (without it, a restart loses all of them)."""
        self.stop()
        if down_s > 0:
            time.sleep(down_s)
        self._launch(find_mosquitto())

    def cleanup(self) -> None:
        self.stop()
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def __enter__(self) -> "LocalBroker":
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.cleanup()
