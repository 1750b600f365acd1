"""Open the LaunchPad and the materials database named by the LaunchPad file.

The LaunchPad file (``fw_configs/my_launchpad.yaml`` or ``$MATCOUPLE_LAUNCHPAD``) is the
single description of the database: FireWorks' own keys (host/port/name/username/
password/authsource, or ``host: mongodb://...`` with ``uri_mode: true``). matcouple keeps
its collections in the same database, so whatever MongoDB the file names, ``lpad`` and
``matcouple`` see the same data.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml
from fireworks import LaunchPad
from pymongo.database import Database
from pymongo.errors import OperationFailure, PyMongoError

from matcouple.errors import DatabaseUnavailableError, MatcoupleError
from matcouple.settings import Settings, get_settings
from matcouple.store.server import EmbeddedServer

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


@dataclass(frozen=True)
class LaunchpadConfig:
    """The parsed LaunchPad file plus where it came from."""

    path: Path
    data: dict[str, Any]

    @classmethod
    def load(cls, path: Path | None = None) -> LaunchpadConfig:
        path = Path(path) if path else get_settings().launchpad_file
        if not path.exists():
            raise MatcoupleError(
                f"LaunchPad file {path} not found; copy fw_configs/my_launchpad.yaml or set "
                "MATCOUPLE_LAUNCHPAD to your file."
            )
        data = yaml.safe_load(path.read_text()) or {}
        if "host" not in data:
            raise MatcoupleError(f"LaunchPad file {path} has no 'host' key")
        return cls(path=path, data=data)

    @property
    def host(self) -> str:
        if self.data.get("uri_mode"):
            return urlsplit(self.data["host"]).hostname or "localhost"
        return str(self.data["host"])

    @property
    def port(self) -> int:
        if self.data.get("uri_mode"):
            return urlsplit(self.data["host"]).port or 27017
        return int(self.data.get("port") or 27017)

    @property
    def is_local(self) -> bool:
        return self.host in LOOPBACK

    def describe(self) -> str:
        if self.data.get("uri_mode"):
            parts = urlsplit(self.data["host"])
            return f"{parts.scheme}://{parts.hostname}:{parts.port or 27017}"
        return f"mongodb://{self.host}:{self.port}/{self.data.get('name', 'fireworks')}"

    def with_overrides(self, **changes: Any) -> LaunchpadConfig:
        return LaunchpadConfig(path=self.path, data={**self.data, **changes})


def embedded_server(config: LaunchpadConfig | None = None, settings: Settings | None = None):
    """The embedded server that serves the (loopback) address of the LaunchPad file."""
    config = config or LaunchpadConfig.load()
    settings = settings or get_settings()
    if not config.is_local:
        raise MatcoupleError(
            f"{config.path} points at {config.describe()}, a MongoDB that matcouple does not "
            "run; start and stop that server the way you usually do."
        )
    host = "127.0.0.1" if config.host == "localhost" else config.host
    return EmbeddedServer(
        host=host, port=config.port, storage_path=settings.db_storage_path,
        run_dir=settings.db_run_dir,
    )


def _down_message(config: LaunchpadConfig, exc: Exception) -> str:
    hint = (
        "start the embedded database with `matcouple db start`"
        if config.is_local
        else "check that the server is up and reachable, and the credentials in the file"
    )
    return (
        f"the database at {config.describe()} (from {config.path}) is not answering: "
        f"{type(exc).__name__}. To fix: {hint}."
    )


def open_launchpad(config: LaunchpadConfig | None = None, check: bool = True) -> LaunchPad:
    """A FireWorks LaunchPad for the configured database; fails fast when it is down."""
    config = config or LaunchpadConfig.load()
    data = dict(config.data)
    kwargs = dict(data.get("mongoclient_kwargs") or {})
    kwargs.setdefault("serverSelectionTimeoutMS", get_settings().server_selection_timeout_ms)
    data["mongoclient_kwargs"] = kwargs
    data.setdefault("strm_lvl", "WARNING")
    lp = LaunchPad.from_dict(data)
    if check:
        try:
            lp.db.command("ping")
            ensure_initialized(lp)
        except OperationFailure as exc:
            raise DatabaseUnavailableError(
                f"the database at {config.describe()} refused the request with the credentials "
                f"in {config.path}: {exc.details.get('errmsg') if exc.details else exc}"
            ) from exc
        except PyMongoError as exc:
            raise DatabaseUnavailableError(_down_message(config, exc)) from exc
    return lp


def ensure_initialized(lp: LaunchPad) -> None:
    """Give a fresh database FireWorks' id counters and indexes, as `lpad reset` would.

    Unlike a reset it never deletes anything: an initialised LaunchPad is left alone.
    """
    if lp.fw_id_assigner.find_one({}) is None:
        lp.fw_id_assigner.update_one(
            {}, {"$setOnInsert": {"next_fw_id": 1, "next_launch_id": 1}}, upsert=True
        )
        lp.tuneup()  # same index options as `lpad reset` builds


def open_database(config: LaunchpadConfig | None = None) -> Database:
    """The pymongo database that holds the LaunchPad and matcouple's collections."""
    return open_launchpad(config).db
