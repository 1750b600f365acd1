"""`matcouple models`: list, current, promote (and its refusals), finetune-now --submit.

One real subprocess proves the entry point; the rest run the same typer app in-process
(importing matcouple.cli takes seconds per process on a busy machine)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from matcouple.cli import app
from matcouple.settings import get_settings
from matcouple.store.connection import open_database, open_launchpad
from matcouple.store.registry import ModelRegistry

CMD = [sys.executable, "-m", "matcouple.cli", "models"]


@pytest.fixture()
def env(cli_env, tmp_path, monkeypatch):
    monkeypatch.setenv("MATCOUPLE_MODEL_CACHE", str(tmp_path / "model-cache"))
    get_settings.cache_clear()
    yield {**cli_env, "MATCOUPLE_MODEL_CACHE": str(tmp_path / "model-cache")}
    get_settings.cache_clear()


class _Result:
    def __init__(self, result):
        self.returncode, self.stdout = result.exit_code, result.stdout
        self.stderr = result.stderr


def _run(env, *args):
    return _Result(CliRunner().invoke(app, ["models", *args], env=env))


def test_models_commands(env, launchpad_config, rocksalt):
    from matcouple.coordinate.buffer import FineTuneBuffer

    proc = subprocess.run([*CMD, "current"], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "shipped model" in proc.stdout, proc.stderr
    assert "0 pending" in proc.stdout
    db = open_database(launchpad_config)
    registry = ModelRegistry(db)
    registry.register(get_settings().surrogate_model_dir, version="v1", note="shipped copy")
    proc = _run(env, "promote", "nope")
    assert proc.returncode == 1 and "no model version 'nope'" in proc.stderr
    proc = _run(env, "promote", "v1")
    assert proc.returncode == 0 and "promoted v1" in proc.stdout, proc.stderr
    assert registry.current()["version"] == "v1"
    proc = _run(env, "list")
    assert proc.returncode == 0 and "v1" in proc.stdout and "promoted" in proc.stdout
    FineTuneBuffer(db).add("m1", rocksalt, {"formation_energy_per_atom": -3.0},
                           fidelity="f", source="s")
    proc = _run(env, "finetune-now", "--submit", "--epochs", "1")
    assert proc.returncode == 0 and "added fine-tune Firework" in proc.stdout, proc.stderr
    fws = open_launchpad(launchpad_config).fireworks
    fw = fws.find_one({"name": "finetune surrogate"})
    assert fw["spec"]["_tasks"][0]["config"] == {"epochs": 1}
    proc = _run(env, "finetune-now", "--submit")
    assert proc.returncode == 1 and "already queued" in proc.stderr
    proc = _run(env, "promote", "--shipped")
    assert proc.returncode == 0 and "shipped model again (was v1)" in proc.stdout
    assert registry.current() is None and registry.get("v1")["status"] == "retired"
    assert "queued" in _run(env, "current").stdout
