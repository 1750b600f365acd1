"""Lifecycle of the embedded MongoDB-wire server (SecantusDB) as its own process.

The server runs detached from the command that started it, so workers, ``lpad`` and
notebooks share it. Its pid and log files live in the run directory; its WiredTiger files
in the storage directory (an absolute path). It is started in standalone mode (no oplog
replication cost per write) and with sync-on-commit (an acknowledged write survives a
SIGKILL of the server; ``settings.db_commit_sync`` chooses whether each commit also waits
for the disk).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pymongo
from pymongo.errors import OperationFailure, PyMongoError

from matcouple.errors import PortInUseError, ServerStartError
from matcouple.settings import get_settings

LAUNCHER_MODULE = "matcouple.store.secantus_launcher"


@dataclass(frozen=True)
class ServerStatus:
    """What `matcouple db status` reports."""

    running: bool
    pid: int | None
    host: str
    port: int
    storage_path: Path
    log_file: Path
    answering: bool

    def describe(self) -> str:
        if self.running and self.answering:
            state = f"running (pid {self.pid}) and answering"
        elif self.running:
            state = f"running (pid {self.pid}) but not answering ping"
        else:
            state = "stopped"
        return (
            f"embedded database {state}\n  address: mongodb://{self.host}:{self.port}\n"
            f"  storage: {self.storage_path}\n  log:     {self.log_file}"
        )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child still "exists"; treat it as dead.
    stat = Path(f"/proc/{pid}/stat")
    if stat.exists():
        try:
            return stat.read_text().split()[2] != "Z"
        except (OSError, IndexError):
            return True
    return True


def _self_connected(sock: socket.socket) -> bool:
    """A TCP connect to a free port of the ephemeral range can land on itself (the
    kernel picked that very port as the source: a 'simultaneous open'); such a socket
    talks to nobody, so it must not count as a listener."""
    try:
        return sock.getsockname() == sock.getpeername()
    except OSError:
        return False


def _port_open(host: str, port: int) -> bool:
    """True when something listens on host:port. Checked twice, 0.2 s apart: a port that
    a server has just released (or a rare self-connect) is not mistaken for a taken one."""
    for attempt in range(2):
        if attempt:
            time.sleep(0.2)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.settimeout(0.5)
            if sock.connect_ex((host, port)) != 0 or _self_connected(sock):
                return False
    return True


def ping(host: str, port: int, timeout_ms: int = 1000) -> bool:
    """True when a MongoDB-wire server at host:port answers ``ping``."""
    client = pymongo.MongoClient(
        host, port, serverSelectionTimeoutMS=timeout_ms, connectTimeoutMS=timeout_ms,
        directConnection=True,
    )
    try:
        return client.admin.command("ping").get("ok") == 1.0
    except OperationFailure:
        return True  # it answered: authentication is required, but the server is up
    except PyMongoError:
        return False
    finally:
        client.close()


@dataclass(frozen=True)
class EmbeddedServer:
    """The embedded server of one storage directory, listening on host:port."""

    host: str
    port: int
    storage_path: Path
    run_dir: Path
    # Further secantusd-py flags, e.g. ("--auth",) or TLS options.
    extra_args: tuple[str, ...] = ()
    # "none" or "fsync": see matcouple.store.secantus_compat.set_commit_method.
    commit_sync: str = field(default_factory=lambda: get_settings().db_commit_sync)

    @property
    def pid_file(self) -> Path:
        return self.run_dir / f"secantusd-{self.port}.pid"

    @property
    def log_file(self) -> Path:
        return self.run_dir / f"secantusd-{self.port}.log"

    def _read_pid(self) -> int | None:
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if _pid_alive(pid) else None

    def _is_ours(self, pid: int) -> bool:
        cmdline = Path(f"/proc/{pid}/cmdline")
        if not cmdline.exists():
            return True  # no /proc: trust the pid file
        args = cmdline.read_bytes().split(b"\0")
        return LAUNCHER_MODULE.encode() in args and str(self.storage_path).encode() in args

    def status(self) -> ServerStatus:
        pid = self._read_pid()
        running = pid is not None and self._is_ours(pid)
        return ServerStatus(
            running=running,
            pid=pid if running else None,
            host=self.host,
            port=self.port,
            storage_path=self.storage_path,
            log_file=self.log_file,
            answering=running and ping(self.host, self.port),
        )

    def command(self) -> list[str]:
        return [
            sys.executable, "-m", LAUNCHER_MODULE,
            "--commit-sync", self.commit_sync,
            "--host", self.host,
            "--port", str(self.port),
            "--storage-path", str(self.storage_path),
            "--standalone",
            "--sync-on-commit",
            "--log-level", "WARNING",
            *self.extra_args,
        ]

    def start(self, timeout_s: float = 60.0) -> ServerStatus:
        """Start the server unless it already runs; return once it answers ping."""
        current = self.status()
        if current.running:
            if not current.answering:
                self._wait_for_ping(current.pid, timeout_s)
            return self.status()
        if _port_open(self.host, self.port):
            raise PortInUseError(
                f"port {self.port} on {self.host} is already taken by another process "
                f"(not the embedded database of {self.storage_path}). Stop that process, or "
                "choose another port in the LaunchPad file (fw_configs/my_launchpad.yaml "
                "or $MATCOUPLE_LAUNCHPAD)."
            )
        if self.storage_path.exists() and not self.storage_path.is_dir():
            raise ServerStartError(f"storage path {self.storage_path} exists but is not a folder")
        self.storage_path.mkdir(parents=True, exist_ok=True)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_file, "ab") as log:
            proc = subprocess.Popen(
                self.command(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                close_fds=True,
            )
        self.pid_file.write_text(f"{proc.pid}\n")
        try:
            self._wait_for_ping(proc.pid, timeout_s, proc)
        except ServerStartError:
            if proc.poll() is None:
                proc.kill()
            self.pid_file.unlink(missing_ok=True)
            raise
        return self.status()

    def _wait_for_ping(
        self, pid: int | None, timeout_s: float, proc: subprocess.Popen | None = None
    ) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise ServerStartError(
                    f"the embedded database exited with code {proc.returncode} during start; "
                    f"last log lines ({self.log_file}):\n{self.log_tail()}"
                )
            if ping(self.host, self.port, timeout_ms=500):
                return
            time.sleep(0.2)
        raise ServerStartError(
            f"the embedded database (pid {pid}) did not answer ping within {timeout_s:.0f} s; "
            f"see {self.log_file}:\n{self.log_tail()}"
        )

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout_s: float = 30.0) -> bool:
        """Stop the server (SIGTERM, then SIGKILL after timeout); False if it was not running."""
        pid = self._read_pid()
        if pid is None or not self._is_ours(pid):
            self.pid_file.unlink(missing_ok=True)
            return False
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while _pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
            while _pid_alive(pid):
                time.sleep(0.05)
        self.pid_file.unlink(missing_ok=True)
        return True

    def kill(self) -> None:
        """SIGKILL the server (fault-injection for tests and benchmarks)."""
        pid = self._read_pid()
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
            while _pid_alive(pid):
                time.sleep(0.05)
