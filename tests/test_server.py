"""The embedded server's lifecycle, against real processes and sockets."""

from __future__ import annotations

import socket
import time

import pymongo
import pytest

from matcouple.errors import PortInUseError, ServerStartError
from matcouple.store.server import EmbeddedServer, _port_open, _self_connected, ping
from tests.conftest import free_port


def test_start_is_idempotent_and_stop_keeps_data(tmp_path):
    srv = EmbeddedServer("127.0.0.1", free_port(), tmp_path / "db", tmp_path / "run")
    assert not srv.status().running
    first = srv.start()
    try:
        assert first.running and first.answering and srv.pid_file.exists()
        assert srv.start().pid == first.pid  # second start: same process
        client = pymongo.MongoClient(srv.host, srv.port)
        client.t.c.insert_one({"_id": 1, "x": "kept"})
        client.close()
        assert "--standalone" in srv.command() and "--sync-on-commit" in srv.command()
        assert srv.log_file.exists()
    finally:
        assert srv.stop()
    assert not srv.status().running and not srv.pid_file.exists()
    assert not srv.stop()  # stopping a stopped server is not an error
    srv.start()
    try:
        assert pymongo.MongoClient(srv.host, srv.port).t.c.find_one({"_id": 1})["x"] == "kept"
    finally:
        srv.stop()


def test_port_taken_by_something_else(tmp_path):
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        srv = EmbeddedServer("127.0.0.1", port, tmp_path / "db", tmp_path / "run")
        with pytest.raises(PortInUseError, match=f"port {port} .* already taken"):
            srv.start()
    assert not srv.pid_file.exists()


def test_failed_start_reports_log(tmp_path):
    blocker = tmp_path / "db"
    blocker.write_text("a file where the storage directory should be")
    srv = EmbeddedServer("127.0.0.1", free_port(), blocker, tmp_path / "run")
    with pytest.raises(ServerStartError, match="is not a folder"):
        srv.start(timeout_s=20)
    assert not srv.status().running


def test_ping_of_nothing_is_false_and_fast():
    t0 = time.monotonic()
    assert not ping("127.0.0.1", free_port(), timeout_ms=300)
    assert time.monotonic() - t0 < 3


def test_a_self_connected_socket_is_not_taken_for_a_listener():
    """Linux lets a socket bound to a free port connect to that same port (a TCP
    simultaneous open): the rare way a free ephemeral port looked 'taken' to the check
    before a restart (the CI flake of test_username_password_authsource)."""
    with socket.socket() as lone:
        lone.bind(("127.0.0.1", 0))
        port = lone.getsockname()[1]
        lone.connect(("127.0.0.1", port))  # succeeds: it talks to itself
        assert _self_connected(lone)
    with socket.socket() as server, socket.socket() as client:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        client.connect(("127.0.0.1", port))
        assert not _self_connected(client) and _port_open("127.0.0.1", port)
    assert not _port_open("127.0.0.1", port)  # closed: nobody listens there now
