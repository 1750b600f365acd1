"""store_results: idempotent upserts, and its indexes ensured once per process."""

from __future__ import annotations

import pymongo
from pymongo import monitoring

from matcouple.store.results import store_results


class _Commands(monitoring.CommandListener):
    def __init__(self) -> None:
        self.names: list[str] = []

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        self.names.append(event.command_name)

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


def test_store_results_ensures_indexes_once_per_collection(server, launchpad_config):
    seen = _Commands()
    client = pymongo.MongoClient(server.host, server.port, event_listeners=[seen])
    db = client[launchpad_config.data["name"]]
    rows = [{"structure_id": "a", "reduced_formula": "Si"},
            {"structure_id": "b", "reduced_formula": "MgO"}]
    try:
        assert store_results(db, "screening", "r1", rows) == 2
        assert seen.names.count("createIndexes") == 2
        assert {"run_1", "reduced_formula_1"} <= set(db.screening.index_information())
        for _ in range(3):
            assert store_results(db, "screening", "r1", rows) == 2
        assert seen.names.count("createIndexes") == 2  # not again for this collection
        assert db.screening.count_documents({"run": "r1"}) == 2  # upserts, idempotent
        store_results(db, "other", "r1", rows[:1])
        assert seen.names.count("createIndexes") == 4  # a new collection gets its own
        assert {"run_1", "reduced_formula_1"} <= set(db.other.index_information())
    finally:
        client.close()
