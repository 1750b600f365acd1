"""Thin FireTasks of the design workflow: read the spec, call the planner's step, return.

The owner of a step's claims is its Firework id (``_add_launchpad_and_fw_id``), which a
rerun after a lost run keeps, so a rerun repeats its own work and nobody else's.
"""

from __future__ import annotations

from fireworks import FiretaskBase, FWAction, explicit_serialize

from matcouple.tasks import _database


def _owner(task: FiretaskBase) -> str:
    return f"fw{getattr(task, 'fw_id', None)}"


@explicit_serialize
class DesignQueryTask(FiretaskBase):
    """Step 1: known structures of the formula that meet the target become candidates."""

    required_params = ["run"]
    optional_params = ["launchpad_file"]

    def run_task(self, fw_spec: dict) -> FWAction:
        from matcouple.coordinate.planner import query_step

        return FWAction(stored_data=query_step(_database(self), self["run"]))


@explicit_serialize
class DesignGenerateTask(FiretaskBase):
    """Step 2: one batch of candidates of the composition, filtered and deduplicated."""

    required_params = ["run", "iteration"]
    optional_params = ["launchpad_file"]

    def run_task(self, fw_spec: dict) -> FWAction:
        from matcouple.coordinate.planner import generate_step

        return FWAction(stored_data=generate_step(_database(self), self["run"],
                                                  int(self["iteration"])))


@explicit_serialize
class DesignDecideTask(FiretaskBase):
    """Steps 3-4: predict, decide; add DFT for low-confidence candidates, and go on."""

    required_params = ["run", "iteration"]
    optional_params = ["launchpad_file"]

    def run_task(self, fw_spec: dict) -> FWAction:
        from matcouple.coordinate import designrun as dr
        from matcouple.coordinate.planner import decide_step
        from matcouple.coordinate.workflow import dft_and_file_workflow, iteration_workflow

        db = _database(self)
        outcome = decide_step(db, self["run"], int(self["iteration"]), _owner(self))
        cfg = dr.run_config(db, self["run"])
        lp_file = self.get("launchpad_file")
        additions = [dft_and_file_workflow(cid, s, run=self["run"], engine=cfg.engine,
                                           preset=cfg.preset, launchpad_file=lp_file)
                     for cid, s in outcome.to_dft]
        if outcome.next_iteration is not None:
            additions.append(iteration_workflow(self["run"], outcome.next_iteration, lp_file))
        return FWAction(stored_data=outcome.summary(), additions=additions)


@explicit_serialize
class DesignFileResultTask(FiretaskBase):
    """Step 5: file a DFT result on its candidate and into the fine-tuning buffer."""

    required_params = ["run", "candidate_id", "material_id"]
    optional_params = ["launchpad_file"]

    def run_task(self, fw_spec: dict) -> FWAction:
        from matcouple.coordinate.buffer import finetune_firework_if_due
        from matcouple.coordinate.planner import file_step
        from matcouple.coordinate.workflow import iteration_workflow

        db = _database(self)
        outcome = file_step(db, self["candidate_id"], self["material_id"], _owner(self))
        additions = []
        finetune = finetune_firework_if_due(db, launchpad_file=self.get("launchpad_file"),
                                            run=self["run"])
        if finetune is not None:
            finetune.spec.setdefault("matcouple_run", self["run"])
            additions.append(finetune)
        if outcome.next_iteration is not None:
            additions.append(iteration_workflow(self["run"], outcome.next_iteration,
                                                self.get("launchpad_file")))
        cand = outcome.candidate
        return FWAction(stored_data={
            "candidate": self["candidate_id"], "material": self["material_id"],
            "value": cand.get("value"), "meets_target": cand.get("meets_target"),
            "buffered": outcome.buffered, "finetune_added": finetune is not None,
            "next_iteration": outcome.next_iteration}, additions=additions)
