"""The model registry: surrogate versions as files in GridFS plus one document each.

A version is a model directory as :class:`SurrogatePredictor` reads it (the ensemble
member ``.pt`` files and ``model_card.json``), uploaded to a GridFS bucket with a sha256
per file, and a document in ``model_versions`` with its status (``candidate``,
``promoted``, ``retired``, ``refused``, ``failed``), metrics, parent version and the data
it was trained on. One pointer document names the promoted version; moving it is a single
write, so readers see either the old or the new model, never a mix. Without a promoted
version callers use the model shipped in the package.

Downloads go to a local cache directory once, are checked against the stored checksums,
and only then appear under their final name; a corrupt or missing file is a clear error
and never changes which model is promoted.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from gridfs import GridFSBucket
from gridfs.errors import CorruptGridFile, NoFile
from pymongo import DESCENDING
from pymongo.database import Database

from matcouple.errors import MatcoupleError
from matcouple.settings import get_settings
from matcouple.surrogate.value_blend import value_memory_names, value_model_names

CURRENT_ID = "@current"
CARD = "model_card.json"
CANDIDATE, PROMOTED, RETIRED, REFUSED, FAILED, UPLOADING = (
    "candidate", "promoted", "retired", "refused", "failed", "uploading")


class RegistryError(MatcoupleError):
    """A model version is unknown, incomplete or corrupt; the message names which."""


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def new_version_name(prefix: str = "ft") -> str:
    return f"{prefix}-{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"


def _read_card(model_dir: Path) -> dict[str, Any]:
    path = Path(model_dir) / CARD
    if not path.exists():
        raise RegistryError(f"{model_dir} has no {CARD}: not a model directory")
    try:
        card = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise RegistryError(f"{path} is not valid JSON: {exc}") from exc
    if not card.get("members"):
        raise RegistryError(f"{path} lists no ensemble members")
    missing = [m for m in model_files(card) if not (Path(model_dir) / m).exists()]
    if missing:
        raise RegistryError(f"{model_dir} lacks the model file(s) {missing} named in {CARD}")
    return card


def model_files(card: dict[str, Any]) -> list[str]:
    """The model files a card names: its members, then its value model(s) if it has any,
    then their residual memories."""
    return list(card["members"]) + value_model_names(card) + [
        m for m in value_memory_names(card) if m]


class ModelRegistry:   # GridFS bucket + a `model_versions` collection
    """Register, promote and fetch surrogate versions."""

    def __init__(self, db: Database, *, bucket: str | None = None,
                 collection: str | None = None, cache_dir: Path | None = None) -> None:
        settings = get_settings()
        self.db = db
        self.bucket_name = bucket or settings.model_registry_bucket
        self.bucket = GridFSBucket(db, bucket_name=self.bucket_name)
        self.versions = db[collection or settings.model_versions_collection]
        self.cache_dir = Path(cache_dir or settings.model_cache_dir)
        self.versions.create_index([("kind", 1), ("created", DESCENDING)])

    # ------------------------------------------------------------ reading
    def get(self, version: str) -> dict[str, Any]:
        doc = self.versions.find_one({"_id": version, "kind": "version"})
        if doc is None:
            raise RegistryError(f"no model version {version!r} in the registry "
                                "(`matcouple models list` shows them)")
        return doc

    def list_versions(self, limit: int = 0) -> list[dict[str, Any]]:
        """Newest first."""
        return list(self.versions.find({"kind": "version"}, sort=[("created", DESCENDING)],
                                       limit=limit))

    def current(self) -> dict | None:
        """The promoted version's document (version, metrics, created), or None."""
        pointer = self.versions.find_one({"_id": CURRENT_ID})
        if pointer is None or not pointer.get("version"):
            return None
        return self.versions.find_one({"_id": pointer["version"], "kind": "version"})

    # ------------------------------------------------------------ writing
    def register(self, model_dir: Path, *, metrics: dict | None = None,
                 parent: str | None = None, data: dict | None = None,
                 version: str | None = None, status: str = CANDIDATE,
                 note: str | None = None) -> str:
        """Upload a model directory as a new version; returns its name.

        The stored card carries the registry's version name, so every prediction made
        with it records which version made it.
        """
        model_dir = Path(model_dir)
        card = _read_card(model_dir)
        version = version or new_version_name()
        card = {**card, "version": version, "parent_version": parent}
        now = dt.datetime.now(dt.UTC)
        doc = {"_id": version, "kind": "version", "version": version, "status": UPLOADING,
               "created": now, "parent": parent, "metrics": metrics or {}, "data": data or {},
               "note": note, "members": card["members"], "files": []}
        self.versions.insert_one(doc)
        uploaded = []
        try:
            blobs = [(m, (model_dir / m).read_bytes()) for m in model_files(card)]
            blobs.append((CARD, json.dumps(card, indent=1).encode()))
            for name, blob in blobs:
                digest = sha256_bytes(blob)
                file_id = self.bucket.upload_from_stream(
                    f"{version}/{name}", io.BytesIO(blob),
                    metadata={"version": version, "name": name, "sha256": digest})
                uploaded.append({"name": name, "file_id": file_id, "sha256": digest,
                                 "size": len(blob)})
        except Exception as exc:
            for f in uploaded:
                self.bucket.delete(f["file_id"])
            self.versions.update_one({"_id": version}, {"$set": {
                "status": FAILED, "error": f"upload failed: {type(exc).__name__}: {exc}"}})
            raise RegistryError(f"could not upload model version {version}: {exc}") from exc
        self.versions.update_one({"_id": version},
                                 {"$set": {"files": uploaded, "status": status,
                                           "card": card}})
        return version

    def record_failure(self, *, error: str, parent: str | None = None,
                       data: dict | None = None, metrics: dict | None = None) -> str:
        """A fine-tune that raised: a version document without files, status failed."""
        version = new_version_name()
        self.versions.insert_one({
            "_id": version, "kind": "version", "version": version, "status": FAILED,
            "created": dt.datetime.now(dt.UTC), "parent": parent, "metrics": metrics or {},
            "data": data or {}, "error": error, "files": []})
        return version

    def mark(self, version: str, status: str, reason: str | None = None,
             metrics: dict | None = None) -> None:
        """Set a version's status (e.g. refused by the promotion rule, with the reason)."""
        update: dict[str, Any] = {"status": status, "status_reason": reason,
                                  "status_at": dt.datetime.now(dt.UTC)}
        if metrics is not None:
            update["metrics"] = metrics
        if self.versions.update_one({"_id": version, "kind": "version"},
                                    {"$set": update}).matched_count == 0:
            raise RegistryError(f"no model version {version!r} in the registry")

    def promote(self, version: str, reason: str | None = None,
                check_load: bool = True) -> dict[str, Any]:
        """Make ``version`` the model later predictions use, after checking that it
        downloads intact and (``check_load``) loads; on any error the promoted model stays
        as it was."""
        from matcouple.surrogate.predict import SurrogatePredictor

        doc = self.get(version)
        if doc["status"] in (FAILED, UPLOADING) or not doc.get("files"):
            raise RegistryError(f"model version {version} is {doc['status']} and has no "
                                "complete files; it cannot be promoted")
        path = self.model_dir(version)
        if check_load:
            try:
                SurrogatePredictor.default(model_dir=path, device="cpu")
            except MatcoupleError as exc:
                raise RegistryError(f"model version {version} does not load: {exc}") from exc
        now = dt.datetime.now(dt.UTC)
        before = self.versions.find_one_and_update(
            {"_id": CURRENT_ID}, {"$set": {"version": version, "promoted_at": now,
                                           "reason": reason}}, upsert=True)
        previous = (before or {}).get("version")
        self.versions.update_one({"_id": version}, {"$set": {
            "status": PROMOTED, "promoted_at": now, "status_reason": reason}})
        if previous and previous != version:
            self.versions.update_one({"_id": previous, "status": PROMOTED},
                                     {"$set": {"status": RETIRED, "retired_at": now}})
        return self.get(version)

    def revert_to_shipped(self) -> str | None:
        """Drop the promotion: predictions use the shipped model again; returns the
        version that was promoted."""
        before = self.versions.find_one_and_delete({"_id": CURRENT_ID})
        previous = (before or {}).get("version")
        if previous:
            self.versions.update_one({"_id": previous, "status": PROMOTED}, {"$set": {
                "status": RETIRED, "retired_at": dt.datetime.now(dt.UTC)}})
        return previous

    # ------------------------------------------------------------ files
    def _verified(self, folder: Path, files: list[dict]) -> bool:
        return all((folder / f["name"]).is_file() and
                   (folder / f["name"]).stat().st_size == f["size"] and
                   sha256_file(folder / f["name"]) == f["sha256"] for f in files)

    def model_dir(self, version: str | None = None) -> Path | None:
        """The promoted (or named) model downloaded into a local cache dir that
        ``SurrogatePredictor.default(model_dir=...)`` accepts; None = no promoted model
        yet (callers then use the shipped model)."""
        if version is None:
            current = self.current()
            if current is None:
                return None
            version = current["version"]
        doc = self.get(version)
        files = doc.get("files") or []
        if doc["status"] in (FAILED, UPLOADING) or not files:
            raise RegistryError(f"model version {version} is {doc['status']} and has no "
                                "complete files")
        target = self.cache_dir / version
        if target.is_dir() and self._verified(target, files):
            return target
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.cache_dir / f".{version}.{os.getpid()}.{uuid.uuid4().hex[:6]}"
        tmp.mkdir()
        try:
            for f in files:
                try:
                    blob = self.bucket.open_download_stream(f["file_id"]).read()
                except NoFile as exc:
                    raise RegistryError(f"file {f['name']} of model version {version} is "
                                        f"missing from GridFS bucket {self.bucket_name!r}"
                                        ) from exc
                except CorruptGridFile as exc:
                    raise RegistryError(f"file {f['name']} of model version {version} is "
                                        f"corrupt in GridFS ({exc})") from exc
                digest = sha256_bytes(blob)
                if digest != f["sha256"]:
                    raise RegistryError(
                        f"file {f['name']} of model version {version} is corrupt: sha256 "
                        f"{digest[:12]}... does not match the registered {f['sha256'][:12]}...")
                (tmp / f["name"]).write_bytes(blob)
            if target.exists():  # stale or damaged copy: replace it
                shutil.rmtree(target, ignore_errors=True)
            try:
                tmp.rename(target)
            except OSError:
                if not (target.is_dir() and self._verified(target, files)):
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return target
