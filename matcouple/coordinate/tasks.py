"""Thin FireTasks of the coordinate pattern (the work lives in plain functions)."""

from __future__ import annotations

import os
import socket

from fireworks import FiretaskBase, FWAction, explicit_serialize

from matcouple.tasks import _database


@explicit_serialize
class FineTuneTask(FiretaskBase):
    """Fine-tune the surrogate on the buffer's pending DFT results, register the new
    version and promote it if it is not worse; a failure is recorded and leaves the
    promoted model in place (the Firework fizzles only with ``fizzle_on_failure``)."""

    optional_params = ["launchpad_file", "run", "token", "config", "fizzle_on_failure"]

    def run_task(self, fw_spec: dict) -> FWAction:
        from matcouple.coordinate.finetune import FineTuneConfig, FineTuneError, finetune_now

        config = FineTuneConfig.from_settings(**(self.get("config") or {}))
        owner = f"{socket.gethostname()}:{os.getpid()}"
        outcome = finetune_now(_database(self), owner=owner, token=self.get("token"),
                               config=config)
        if outcome.status == "failed" and self.get("fizzle_on_failure"):
            raise FineTuneError(f"fine-tune failed: {outcome.error}")
        return FWAction(stored_data={"finetune": outcome.as_dict(), "run": self.get("run")})
