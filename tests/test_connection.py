"""LaunchPad files: the embedded default, any other MongoDB, and a database that is down."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import yaml
from fireworks import Firework, ScriptTask

from matcouple.errors import DatabaseUnavailableError, MatcoupleError
from matcouple.store.connection import LaunchpadConfig, embedded_server, open_launchpad
from tests.conftest import REPO, free_port


def test_repo_default_is_the_embedded_server():
    config = LaunchpadConfig.load(REPO / "fw_configs" / "my_launchpad.yaml")
    assert config.is_local and config.port == 27117
    assert embedded_server(config).storage_path.is_absolute()


def test_uri_mode_file_works_without_code_change(server, tmp_path):
    path = tmp_path / "lp.yaml"
    path.write_text(yaml.safe_dump({
        "host": f"mongodb://{server.host}:{server.port}/uri_db", "uri_mode": True,
        "name": "uri_db",
    }))
    config = LaunchpadConfig.load(path)
    assert config.port == server.port and config.is_local
    lp = open_launchpad(config)
    assert lp.db.name == "uri_db"
    assert lp.fw_id_assigner.find_one({})["next_fw_id"] == 1  # initialised, not reset


def test_remote_database_is_not_started_by_us(tmp_path):
    path = tmp_path / "lp.yaml"
    path.write_text(yaml.safe_dump({"host": "mongo.cluster.example.org", "port": 27017,
                                    "name": "x", "username": "u", "password": "p",
                                    "authsource": "admin"}))
    with pytest.raises(MatcoupleError, match="does not run"):
        embedded_server(LaunchpadConfig.load(path))


def test_down_database_fails_fast_with_how_to_start(tmp_path):
    path = tmp_path / "lp.yaml"
    path.write_text(yaml.safe_dump({"host": "127.0.0.1", "port": free_port(), "name": "x",
                                    "mongoclient_kwargs": {"serverSelectionTimeoutMS": 1000}}))
    t0 = time.monotonic()
    with pytest.raises(DatabaseUnavailableError, match="matcouple db start"):
        open_launchpad(LaunchpadConfig.load(path))
    assert time.monotonic() - t0 < 5


def test_cli_fails_fast_when_database_is_down(tmp_path):
    path = tmp_path / "lp.yaml"
    path.write_text(yaml.safe_dump({"host": "127.0.0.1", "port": free_port(), "name": "x",
                                    "mongoclient_kwargs": {"serverSelectionTimeoutMS": 1000}}))
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "matcouple.cli", "data", "count", "-l",
                           str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "not answering" in proc.stderr and "matcouple db start" in proc.stderr
    assert time.monotonic() - t0 < 15


def test_missing_launchpad_file_is_named(tmp_path):
    with pytest.raises(MatcoupleError, match="nope.yaml not found"):
        LaunchpadConfig.load(tmp_path / "nope.yaml")


def test_username_password_authsource(tmp_path):
    """A server that requires SCRAM authentication, named by user/password/authsource."""
    import pymongo

    from matcouple.store.server import EmbeddedServer

    port = free_port()
    plain = EmbeddedServer("127.0.0.1", port, tmp_path / "db", tmp_path / "run")
    plain.start()
    client = pymongo.MongoClient("127.0.0.1", port)
    client.admin.command("createUser", "alice", pwd="s3cret",
                         roles=[{"role": "root", "db": "admin"}])
    client.close()
    plain.stop()
    secured = EmbeddedServer("127.0.0.1", port, tmp_path / "db", tmp_path / "run",
                             extra_args=("--auth",))
    secured.start()
    try:
        good = tmp_path / "good.yaml"
        good.write_text(yaml.safe_dump({"host": "127.0.0.1", "port": port, "name": "proj",
                                        "username": "alice", "password": "s3cret",
                                        "authsource": "admin"}))
        lp = open_launchpad(LaunchpadConfig.load(good))
        lp.add_wf(Firework(ScriptTask.from_str("true")))
        assert lp.fireworks.count_documents({}) == 1
        bad = tmp_path / "bad.yaml"
        bad.write_text(yaml.safe_dump({"host": "127.0.0.1", "port": port, "name": "proj",
                                       "username": "alice", "password": "wrong",
                                       "authsource": "admin"}))
        with pytest.raises(DatabaseUnavailableError, match="credentials"):
            open_launchpad(LaunchpadConfig.load(bad))
    finally:
        secured.stop()
