"""Builders that turn structures into FireWorks workflows.

One Firework per batch of cheap work (a batch of screenings or predictions) and one per
unit of expensive work (a DFT calculation): the LaunchPad's per-Firework overhead is
milliseconds, a structure's screening is less.
"""

from __future__ import annotations

from collections.abc import Sequence

from fireworks import Firework, Workflow
from pymatgen.core import Structure

from matcouple.settings import get_settings
from matcouple.tasks import PredictTask, ScreenTask


def _batches(items: Sequence, size: int) -> list[Sequence]:
    if size < 1:
        raise ValueError(f"batch size must be at least 1, got {size}")
    return [items[i:i + size] for i in range(0, len(items), size)]


def screening_workflow(
    structures: Sequence[tuple[str, Structure]],
    run: str,
    *,
    batch_size: int | None = None,
    category: str | None = None,
    launchpad_file: str | None = None,
) -> Workflow:
    """A workflow that screens ``(id, structure)`` pairs in independent batch Fireworks."""
    if not structures:
        raise ValueError("no structures to screen")
    batch_size = get_settings().screening_batch_size if batch_size is None else batch_size
    fireworks = []
    for i, batch in enumerate(_batches(list(structures), batch_size)):
        params = {
            "structures": [{"id": sid, "structure": s.as_dict()} for sid, s in batch],
            "run": run,
        }
        if launchpad_file:
            params["launchpad_file"] = launchpad_file
        spec = {"_category": category} if category else {}
        fireworks.append(Firework([ScreenTask(**params)], spec=spec, name=f"screen {run} #{i}"))
    return Workflow(
        fireworks, name=f"screening {run}",
        metadata={"matcouple": "screening", "run": run, "n_structures": len(structures)},
    )


def prediction_workflow(
    structures: Sequence[tuple[str, Structure]],
    *,
    batch_size: int = 256,
    mc_samples: int | None = None,
    category: str | None = "ai",
    launchpad_file: str | None = None,
    run: str | None = None,
) -> Workflow:
    """Crysformer predictions for ``(id, structure)`` pairs, one Firework per batch
    (``mc_samples`` None: the worker's ``Settings.surrogate_mc_samples``)."""
    if not structures:
        raise ValueError("no structures to predict")
    fireworks = []
    for i, batch in enumerate(_batches(list(structures), batch_size)):
        params: dict = {"structures": [{"id": sid, "structure": s.as_dict()}
                                       for sid, s in batch]}
        if mc_samples is not None:
            params["mc_samples"] = mc_samples
        if launchpad_file:
            params["launchpad_file"] = launchpad_file
        if run:
            params["run"] = run
        spec = {"_category": category} if category else {}
        fireworks.append(Firework([PredictTask(**params)], spec=spec, name=f"predict #{i}"))
    return Workflow(fireworks, name=f"predict {run or len(structures)}",
                    metadata={"matcouple": "predict", "n_structures": len(structures)})
