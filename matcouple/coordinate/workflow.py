"""The design workflow on the LaunchPad, built from thin design FireTasks.

::

    query ─► generate(1) ─► decide(1) ─┬─► DFT relax(c) ─► file(c) [─► fine-tune]
                                       └─► generate(2) ─► decide(2) ─► ...

The decide Firework of an iteration returns ``FWAction(additions=...)``: one DFT
workflow plus a filing Firework per low-confidence candidate, and the next iteration
while the run should go on. Every Firework carries ``matcouple_run`` in its spec, so a
worker can be limited to one run, and ``_category`` (``ai`` for model work, ``dft`` for
DFT) so DFT nodes and GPU nodes take their own kind.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from fireworks import Firework, Workflow
from pymatgen.core import Composition, Structure

from matcouple.coordinate import designrun as dr
from matcouple.coordinate.design_tasks import (
    DesignDecideTask,
    DesignFileResultTask,
    DesignGenerateTask,
    DesignQueryTask,
)
from matcouple.settings import get_settings
from matcouple.store.connection import LaunchpadConfig, open_launchpad


def default_run_name(formula: str) -> str:
    return f"design-{formula}-" + dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")


def _spec(run: str, priority: int = 0, category: str | None = None) -> dict[str, Any]:
    return {"matcouple_run": run, "_category": category or get_settings().design_category,
            "_priority": priority, "_add_launchpad_and_fw_id": True}


def _params(run: str, launchpad_file: str | None, **extra: Any) -> dict[str, Any]:
    params = {"run": run, **extra}
    if launchpad_file:
        params["launchpad_file"] = launchpad_file
    return params


def iteration_workflow(run: str, iteration: int, launchpad_file: str | None) -> Workflow:
    """Generate + filter one batch, then predict and decide it (two Fireworks)."""
    gen = Firework([DesignGenerateTask(**_params(run, launchpad_file, iteration=iteration))],
                   spec=_spec(run), name=f"design generate {run} #{iteration}")
    decide = Firework([DesignDecideTask(**_params(run, launchpad_file, iteration=iteration))],
                      spec=_spec(run), name=f"design decide {run} #{iteration}",
                      parents=[gen])
    return Workflow([gen, decide], name=f"design {run} iteration {iteration}")


def dft_and_file_workflow(candidate_id: str, structure: Structure, *, run: str, engine: str,
                          preset: str, launchpad_file: str | None) -> Workflow:
    """The DFT relaxation of one candidate (matcouple.dft), then the Firework that files it."""
    from matcouple.dft.engine import get_engine
    from matcouple.dft.workflows import dft_workflow

    dft = dft_workflow(candidate_id, structure, engine=engine, preset=preset, run=run,
                       launchpad_file=launchpad_file, input_id=candidate_id)
    material_id = f"{get_engine(engine).source(preset)}:{candidate_id}"
    leaves = [fw for fw in dft.fws if fw.fw_id in dft.leaf_fw_ids]
    for fw in dft.fws:
        fw.spec.setdefault("matcouple_run", run)
        fw.spec.setdefault("_priority", 1)
    file_fw = Firework(
        [DesignFileResultTask(**_params(run, launchpad_file, candidate_id=candidate_id,
                                        material_id=material_id))],
        spec=_spec(run, get_settings().design_file_priority),
        name=f"design file {candidate_id}")
    links = {fw.fw_id: list(kids) for fw, kids in
             ((f, dft.links.get(f.fw_id, [])) for f in dft.fws)}
    for leaf in leaves:
        links[leaf.fw_id] = [*links[leaf.fw_id], file_fw.fw_id]
    return Workflow([*dft.fws, file_fw], links_dict=links,
                    name=f"design dft {candidate_id}")


def design_workflow(run: str, launchpad_file: str | None) -> Workflow:
    """Query the database, then the first iteration (later ones are added dynamically)."""
    query = Firework([DesignQueryTask(**_params(run, launchpad_file))], spec=_spec(run),
                     name=f"design query {run}")
    first = iteration_workflow(run, 1, launchpad_file)
    links = {query.fw_id: [first.fws[0].fw_id], **{k: list(v) for k, v in first.links.items()}}
    return Workflow([query, *first.fws], links_dict=links, name=f"design {run}",
                    metadata={"matcouple": "design", "run": run})


def submit_design(config: dr.DesignConfig, launchpad: LaunchpadConfig | None = None
                  ) -> tuple[str, dict[int, int]]:
    """Store the run and add its workflow; run it with `rlaunch`/`qlaunch`."""
    lp_config = launchpad or LaunchpadConfig.load(
        Path(config.launchpad_file) if config.launchpad_file else None)
    lp = open_launchpad(lp_config)
    lp_file = str(lp_config.path.resolve())
    config = dr.DesignConfig(**{**config.__dict__, "launchpad_file": lp_file})
    _check_request(config)
    doc = dr.create_run(lp.db, config)
    if doc.get("wf_id") is not None:  # continuing an existing run: its workflow is there
        return config.run, {}
    dr.claim_iteration(lp.db, config.run, 1, "submit")
    ids = lp.add_wf(design_workflow(config.run, lp_file))
    dr.runs(lp.db).update_one({"_id": config.run}, {"$set": {"wf_id": min(ids.values())}})
    return config.run, ids


def _check_request(config: dr.DesignConfig) -> None:
    """Refuse before submitting what the generator or the DFT engine cannot do."""
    from matcouple.coordinate.request import RequestError
    from matcouple.coordinate.tools import _generator
    from matcouple.dft.engine import get_engine
    from matcouple.directive.generate import csp_cells
    from matcouple.errors import GenerationError

    cfg = config.resolved()
    try:
        csp_cells(_generator(None, None), cfg.request.formula, cfg.formula_units or None)
    except GenerationError as exc:
        raise RequestError(f"cannot design {cfg.request.formula}: {exc}") from exc
    engine = get_engine(cfg.engine)
    if cfg.preset not in engine.preset_names():
        raise RequestError(f"unknown preset {cfg.preset!r} for {cfg.engine}; choose one of "
                           f"{', '.join(engine.preset_names())}")
    if cfg.max_dft > 0:
        engine.check_elements(sorted(el.symbol for el in
                                     Composition(cfg.request.formula).elements))
