"""One place for every path, address and threshold matcouple uses.

Values come from environment variables (``MATCOUPLE_*``) with defaults that work in a
fresh checkout: the embedded database lives under ``launchpad/``, FireWorks configs under
``fw_configs/`` and the data sets in ``../shared/data`` beside the checkout.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path


def _project_root() -> Path:
    """The checkout holding ``fw_configs/`` (editable install), else the working directory."""
    env = os.environ.get("MATCOUPLE_HOME")
    if env:
        return Path(env).expanduser().resolve()
    here = Path(__file__).resolve().parents[1]
    if (here / "fw_configs").is_dir():
        return here
    return Path.cwd().resolve()


def _path_from_env(name: str, default: Path) -> Path:
    value = os.environ.get(name)
    return Path(value).expanduser().resolve() if value else default


@dataclass(frozen=True)
class Settings:
    """Resolved configuration; build it with :func:`get_settings`."""

    root: Path
    data_dir: Path
    launchpad_file: Path
    fworker_file: Path
    db_storage_path: Path
    db_run_dir: Path
    # How long a client waits for the server before declaring the database down.
    server_selection_timeout_ms: int = 3000
    # How long `matcouple db start` waits for the new server to answer ping.
    db_start_timeout_s: float = 60.0
    materials_collection: str = "materials"
    screening_collection: str = "screening"
    predictions_collection: str = "predictions"
    # Structures per screening Firework: one Firework per batch of cheap work.
    screening_batch_size: int = 64
    # Cells beyond these limits are refused at ingest (empty or absurd cells).
    max_sites: int = 1000
    max_volume_per_atom: float = 500.0
    min_volume_per_atom: float = 1.0
    symprec: float = 0.1
    # Shipped Crysformer ensemble + model card (calibration scales per mode).
    surrogate_model_dir: Path = Path(__file__).resolve().parent / "surrogate" / "models"
    # Cache of crystal graphs built from data tables (speeds up repeated training).
    graph_cache_dir: Path = Path.home() / ".cache" / "matcouple" / "graphs"
    datasets: dict[str, str] = field(
        default_factory=lambda: {
            "mp2018": "mp2018/mp2018_fe_gap_trainval.csv.gz",
            "mp2018-ci": "mp2018/mp2018_ci_subset_512.csv.gz",
            "perov5": "perov_5/perov_5_all.csv.gz",
            "carbon24": "carbon_24/carbon_24_all.csv.gz",
        }
    )
    # --- directive pattern: generator, validity filters, generation runs (issue 4) ---
    # Checkpoint `matcouple generate` uses (relative to the checkout unless absolute);
    # $MATCOUPLE_GENERATOR_CHECKPOINT overrides it.
    generator_checkpoint: str = "models/generator/generator.pt"
    # Where parsed training sets are cached as tensors (git-ignored).
    generator_cache_dir: str = ".cache/generator"
    # Training structures with more atoms than this are left out (MP-20 convention).
    generator_max_atoms: int = 20
    # Validity filters of generated candidates (paper section 4.2).
    filter_max_elements: int = 10
    filter_symprec: float = 0.1
    filter_min_distance: float = 0.5
    filter_min_volume_per_atom: float = 3.0
    filter_max_volume_per_atom: float = 100.0
    # SMACT: charge neutrality only, or also Pauling's electronegativity ordering.
    filter_smact_pauling_test: bool = False
    # Candidates sampled per GPU batch, and per Firework in a generation workflow.
    generation_batch_size: int = 512
    generation_per_firework: int = 5000
    # Reverse diffusion steps at sampling time (the model is trained with T=1000).
    generation_steps: int = 1000
    # Hybrid p(N): leave the data distribution once the rolling valid fraction drops
    # below this share of its first window's value.
    hybrid_switch_ratio: float = 0.75
    hybrid_window: int = 4
    generated_source: str = "generated"
    generation_collection: str = "generation_runs"
    # --- DFT (matcouple.dft) ---
    # Engine and preset used when none is named (`matcouple dft run`, workflow builders).
    dft_engine: str = field(default_factory=lambda: os.environ.get("MATCOUPLE_DFT_ENGINE",
                                                                   "gpaw"))
    dft_preset: str = field(default_factory=lambda: os.environ.get("MATCOUPLE_DFT_PRESET",
                                                                   "fast"))
    # Where calculations write their files; empty means the current (launch) directory.
    dft_workdir: str = field(default_factory=lambda: os.environ.get("MATCOUPLE_DFT_WORKDIR",
                                                                    ""))
    dft_references_collection: str = "dft_references"
    # A worker waits this long for another one computing the same elemental reference.
    dft_reference_claim_timeout_s: float = 3600.0
    # `_category` of DFT Fireworks, so a DFT-only worker can take just these.
    dft_category: str = "dft"
    # Attempts of one calculation (first run plus retries with escalated settings).
    dft_max_attempts: int = 3
    # Seconds a calculation may run before it stops cleanly and is continued by a retry
    # (0: no limit); set it a little under the queue walltime.
    dft_walltime_s: float = field(default_factory=lambda: float(
        os.environ.get("MATCOUPLE_DFT_WALLTIME_S", "0")))
    # --- coordinate: design run ---
    # Collections of a design run: one document per run, one per candidate decision.
    design_runs_collection: str = "design_runs"
    design_candidates_collection: str = "design_candidates"
    # Candidates sampled per iteration (one generate Firework each), the iteration cap, the
    # DFT budget of a run, and the reverse-diffusion steps (0: Settings.generation_steps).
    design_batch_size: int = 16
    design_max_iterations: int = 50
    design_max_dft: int = 20
    design_steps: int = 0
    # Formula units tried per cell (empty: every Z that fits the generator).
    design_formula_units: tuple[int, ...] = ()
    # `_category` of the model Fireworks (generate, predict/decide, file result).
    design_category: str = "ai"
    # Priority of design Fireworks; DFT results are filed before more is generated.
    design_file_priority: int = 5
    # Where `matcouple report` writes JSON and plots (relative to the checkout).
    design_reports_dir: str = "launchpad/design"
    # Optional LLM planner: any OpenAI-compatible chat-completions endpoint.
    llm_url: str = field(default_factory=lambda: os.environ.get("MATCOUPLE_LLM_URL", ""))
    llm_model: str = field(default_factory=lambda: os.environ.get("MATCOUPLE_LLM_MODEL", ""))
    llm_api_key: str = field(default_factory=lambda: os.environ.get("MATCOUPLE_LLM_API_KEY",
                                                                    ""))
    llm_timeout_s: float = 60.0
    llm_max_turns: int = 40


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Read the environment once and return the settings every module shares."""
    root = _project_root()
    launchpad_dir = root / "launchpad"
    return Settings(
        root=root,
        data_dir=_path_from_env("MATCOUPLE_DATA_DIR", (root.parent / "shared" / "data").resolve()),
        launchpad_file=_path_from_env(
            "MATCOUPLE_LAUNCHPAD", root / "fw_configs" / "my_launchpad.yaml"
        ),
        fworker_file=_path_from_env("MATCOUPLE_FWORKER", root / "fw_configs" / "my_fworker.yaml"),
        db_storage_path=_path_from_env("MATCOUPLE_DB_PATH", launchpad_dir / "db"),
        db_run_dir=_path_from_env("MATCOUPLE_RUN_DIR", launchpad_dir / "run"),
        server_selection_timeout_ms=int(os.environ.get("MATCOUPLE_DB_TIMEOUT_MS", "3000")),
    )
