"""A real embedded MongoDB-wire server for the tests: random free port, temporary storage."""

from __future__ import annotations

import os

# One BLAS/OpenMP thread per test process: the suite runs servers and workers beside it on
# a 2-core machine, and oversubscribed OpenMP threads spin (a tiny training step went 7x
# slower).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import socket  # noqa: E402
import uuid  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import yaml  # noqa: E402
from pymatgen.core import Lattice, Structure  # noqa: E402

from matcouple.store.connection import LaunchpadConfig  # noqa: E402
from matcouple.store.server import EmbeddedServer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def missing_datasets(*keys: str) -> list[str]:
    """The data sets (``Settings.datasets`` keys) whose files are not in the data folder."""
    from matcouple.settings import get_settings

    s = get_settings()
    return [k for k in keys if not (s.data_dir / s.datasets[k]).exists()]


def _missing_reason(missing: list[str]) -> str:
    from matcouple.settings import get_settings

    return f"data sets {missing} not in {get_settings().data_dir} (set MATCOUPLE_DATA_DIR)"


def requires_data(*keys: str) -> pytest.MarkDecorator:
    """Skip a test where the data sets it reads are absent (a clone with no ../shared/data
    beside it and no MATCOUPLE_DATA_DIR), saying which and where they were looked for."""
    missing = missing_datasets(*keys)
    return pytest.mark.skipif(bool(missing), reason=_missing_reason(missing))


def skip_without_data(*keys: str) -> None:
    """The same inside a fixture (marks on fixtures have no effect)."""
    missing = missing_datasets(*keys)
    if missing:
        pytest.skip(_missing_reason(missing))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def server(tmp_path_factory) -> EmbeddedServer:
    base = tmp_path_factory.mktemp("secantus")
    srv = EmbeddedServer(host="127.0.0.1", port=free_port(), storage_path=base / "db",
                         run_dir=base / "run")
    srv.start(timeout_s=60)
    yield srv
    srv.stop()


def write_launchpad_file(path: Path, server: EmbeddedServer, name: str) -> LaunchpadConfig:
    path.write_text(yaml.safe_dump({
        "host": server.host, "port": server.port, "name": name, "strm_lvl": "WARNING",
        "mongoclient_kwargs": {"serverSelectionTimeoutMS": 3000},
    }))
    return LaunchpadConfig.load(path)


@pytest.fixture()
def launchpad_config(server, tmp_path, monkeypatch) -> LaunchpadConfig:
    """A LaunchPad file for a fresh database on the session server, set as the default."""
    config = write_launchpad_file(tmp_path / "my_launchpad.yaml", server,
                                  f"t_{uuid.uuid4().hex[:10]}")
    monkeypatch.setenv("MATCOUPLE_LAUNCHPAD", str(config.path))
    from matcouple.settings import get_settings

    get_settings.cache_clear()
    yield config
    get_settings.cache_clear()


@pytest.fixture()
def cli_env(launchpad_config) -> dict[str, str]:
    """Environment for running the real `matcouple`/`rlaunch`/`lpad` commands."""
    return {**os.environ, "MATCOUPLE_LAUNCHPAD": str(launchpad_config.path)}


@pytest.fixture()
def silicon() -> Structure:
    return Structure(Lattice.cubic(5.431), ["Si"] * 8, [
        [0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5],
        [0.25, 0.25, 0.25], [0.75, 0.75, 0.25], [0.75, 0.25, 0.75], [0.25, 0.75, 0.75],
    ])


@pytest.fixture()
def rocksalt() -> Structure:
    return Structure.from_spacegroup("Fm-3m", Lattice.cubic(4.21), ["Mg", "O"],
                                     [[0, 0, 0], [0.5, 0.5, 0.5]])
