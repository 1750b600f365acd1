"""The DFT queue adapter templates and worker file load in FireWorks and render job scripts."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from fireworks import FWorker
from fireworks.user_objects.queue_adapters.common_adapter import CommonAdapter

CONFIGS = Path(__file__).resolve().parents[1] / "fw_configs"


@pytest.mark.parametrize("name,scheduler,directive", [
    ("my_qadapter_slurm_gpaw.yaml", "SLURM", "#SBATCH --ntasks=16"),
    ("my_qadapter_pbs_gpaw.yaml", "PBS", "#PBS -l nodes=1:ppn=16"),
    ("my_qadapter_slurm_vasp.yaml", "SLURM", "#SBATCH --ntasks=32"),
    ("my_qadapter_pbs_vasp.yaml", "PBS", "#PBS -l nodes=1:ppn=32"),
])
def test_queue_adapters_render(name, scheduler, directive, tmp_path):
    adapter = CommonAdapter.from_dict(yaml.safe_load((CONFIGS / name).read_text()))
    assert adapter.q_type == scheduler
    script = adapter.get_script_str(str(tmp_path))
    assert directive in script
    assert "my_fworker_dft.yaml" in script and "rlaunch" in script
    assert "MATCOUPLE_LAUNCHPAD" in script


def test_dft_worker_takes_only_dft():
    worker = FWorker.from_file(str(CONFIGS / "my_fworker_dft.yaml"))
    assert worker.category == "dft"
    assert worker.query["spec._category"] == "dft"
