"""The generation FireTask and the workflow builder that splits a campaign into Fireworks."""

from __future__ import annotations

from dataclasses import fields, replace

from fireworks import FiretaskBase, Firework, FWAction, Workflow, explicit_serialize

from matcouple.directive.generate import GenerationRequest, generate
from matcouple.settings import get_settings
from matcouple.store.connection import LaunchpadConfig, open_database

REQUEST_FIELDS = [f.name for f in fields(GenerationRequest)]


@explicit_serialize
class GenerateTask(FiretaskBase):
    """Sample ``n`` candidates, filter them, store the survivors (one batch of cheap work)."""

    required_params = ["n", "run"]
    optional_params = [*(f for f in REQUEST_FIELDS if f not in ("n", "run")), "launchpad_file"]

    def run_task(self, fw_spec: dict) -> FWAction:
        request = GenerationRequest(**{k: self[k] for k in REQUEST_FIELDS if k in self})
        db = open_database(LaunchpadConfig.load(self.get("launchpad_file")))
        result = generate(request, db, progress=False)
        return FWAction(stored_data=result.summary())


def generation_workflow(
    request: GenerationRequest,
    *,
    per_firework: int | None = None,
    category: str | None = None,
    launchpad_file: str | None = None,
) -> Workflow:
    """One Firework per ``per_firework`` candidates; each is its own run ``<run>.<k>``."""
    request.validate()
    if not request.run:
        raise ValueError("a generation workflow needs a run name")
    per_firework = per_firework or get_settings().generation_per_firework
    if per_firework < 1:
        raise ValueError(f"candidates per Firework must be at least 1, got {per_firework}")
    fireworks = []
    for k, start in enumerate(range(0, request.n, per_firework)):
        part = replace(request, n=min(per_firework, request.n - start),
                       run=f"{request.run}.{k:03d}", seed=request.seed * 1000 + k)
        params = {name: getattr(part, name) for name in REQUEST_FIELDS
                  if getattr(part, name) is not None}
        if launchpad_file:
            params["launchpad_file"] = launchpad_file
        spec = {"_category": category} if category else {}
        fireworks.append(Firework([GenerateTask(**params)], spec=spec,
                                  name=f"generate {part.run}"))
    return Workflow(fireworks, name=f"generation {request.run}",
                    metadata={"matcouple": "generation", "run": request.run, "n": request.n})
