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
    # Embedded server's commit durability: "none" writes the journal to the OS at every
    # commit (an acknowledged write survives a killed server, not a power loss), "fsync"
    # also waits for the disk (survives a power loss; writes ~4x slower).
    db_commit_sync: str = field(default_factory=lambda: os.environ.get(
        "MATCOUPLE_DB_COMMIT_SYNC", "none"))
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
    # Defaults of `matcouple train surrogate`. Peak learning rate: on one H200 (2026-12-02,
    # wide dropout-free model, four recipes side by side for the same ~6 min) batch 256 at
    # lr 5e-4 reached E_f val MAE 0.148, at 2e-3 0.109, batch 64 at lr 1e-3 0.108; 2e-3 at
    # batch 256 then took a model from 0.090 to 0.051 in 26 epochs (README, Surrogate).
    surrogate_train_epochs: int = 60
    surrogate_train_batch_size: int = 64
    surrogate_train_lr: float = 1e-3
    # linear warm-up before the cosine; a short fine-tune from a shipped model wants less
    surrogate_train_warmup_epochs: float = 1.0
    # Fused message/value tensor products in training too (surrogate/fused.py; same math as
    # e3nn, gradients reach e3nn's own weights): a training step 1.80x faster at batch 512
    # on an H200 and 3.4x at 32 crystals on this CPU; $MATCOUPLE_TRAIN_FUSED_TP=0 (or
    # --no-fused-tp) trains through e3nn's modules.
    surrogate_train_fused_tp: bool = field(default_factory=lambda: os.environ.get(
        "MATCOUPLE_TRAIN_FUSED_TP", "1") == "1")
    # Exponential moving average of the weights in training (0 = off): the average is what
    # is evaluated each epoch, kept as the best and exported; the last step's weights are
    # evaluated beside it (history: val_raw_mae_*). --ema DECAY per run.
    surrogate_train_ema_decay: float = 0.0
    # AdamW's decoupled weight decay (--weight-decay per run). 0.05 was 0.0003 eV/atom better
    # on E_f than 1e-5 in a 10-epoch fine-tune of the shipped value model (stop 20, README);
    # not yet measured from scratch, so the default stays.
    surrogate_train_weight_decay: float = 1e-5
    # Structure noise in training (surrogate/augment.py; off by default): std of random
    # strains (fraction) and of atomic displacements (Å) applied to each training batch.
    # --strain-noise / --displacement-noise per run.
    surrogate_train_strain_noise: float = 0.0
    surrogate_train_displacement_noise: float = 0.0
    # Structures per forward pass at prediction. On a CPU small batches keep the per-edge
    # tensors in cache (2-core EPYC: batch 16 is 2x faster per structure than 256).
    predict_batch_size_cpu: int = 16
    predict_batch_size_gpu: int = 512
    # MC-dropout passes per ensemble member at prediction ($MATCOUPLE_MC_SAMPLES; 0 = dropout
    # off, the fast mode). Measured on the MEGNet val split (benchmarks/sigma_study.py): the
    # MC mean is more accurate than the dropout-off value and its sigma ranks the errors, so
    # it is what the design policy trusts. The seed makes MC predictions reproducible.
    surrogate_mc_samples: int = field(default_factory=lambda: int(
        os.environ.get("MATCOUPLE_MC_SAMPLES", "8")))
    surrogate_mc_seed: int = 0
    # Use the card's value model when it names one ($MATCOUPLE_VALUE_MODEL=0: the ensemble
    # mean instead, one wide pass less per structure). MEGNet val split, E_f: the wide
    # dropout-free model's value with the ensemble's spread about it gave MAE 0.051 and
    # Spearman(|err|, sigma) 0.37 against 0.067 and 0.37 for the ensemble alone, and the
    # design policy accepted 74% instead of 57% (benchmarks/sigma_study.py).
    surrogate_value_model: bool = field(default_factory=lambda: os.environ.get(
        "MATCOUPLE_VALUE_MODEL", "1") != "0")
    # Add each value model's residual memory (surrogate/residual_memory.py: the mean
    # training residual of the k nearest training crystals in the model's own pooled
    # features) when the card names one ($MATCOUPLE_RESIDUAL_MEMORY=0: the bare models).
    surrogate_residual_memory: bool = field(default_factory=lambda: os.environ.get(
        "MATCOUPLE_RESIDUAL_MEMORY", "1") != "0")
    # How `matcouple train memory` builds one: neighbours averaged, principal axes kept of
    # the standardised features, and eps of the weights 1/(distance + eps). Tuned on the
    # MEGNet val split for the shipped value models (benchmarks/records/2026-12-05/cpu_s33).
    residual_memory_k: int = 3
    residual_memory_dims: int = 32
    residual_memory_eps: float = 0.1
    # Message and value tensor products on the fused GEMM paths at inference
    # (matcouple/surrogate/fused.py; $MATCOUPLE_FUSED_TP=0 turns it off): same math as e3nn
    # (float64: equal to 1e-7 on the value model), whole model 1.5x faster (value model 19.3
    # -> 12.7 ms per structure, one thread); on an H200 the shipped models predict 1,716 and
    # 1,681 structures/s end to end against 1,365 and 1,369 with e3nn's. In float32 both
    # paths differ from the float64 result by the model's own round-off: mean 2-3e-6, max
    # 1.2e-3 (e3nn) and 7.8e-4 (fused) eV/atom for E_f over 400 val crystals (value model).
    surrogate_fused_tp: bool = field(default_factory=lambda: os.environ.get(
        "MATCOUPLE_FUSED_TP", "1") == "1")
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
    # --- data-parallel training on the GPUs of one node (matcouple.distributed) ---
    # Address of rank 0's rendezvous (one node: loopback); a free port is picked per run.
    ddp_master_addr: str = "127.0.0.1"
    # A collective that waits longer than this fails (a stuck rank ends the run).
    ddp_timeout_minutes: float = 30.0
    # Learning rate for a global batch N x per-GPU batch: "sqrt" (lr x sqrt(N), the rule
    # for Adam-type optimizers), "linear" (lr x N, the SGD rule) or "none".
    ddp_lr_scaling: str = "sqrt"
    # `_category` of training Fireworks, so only a GPU worker takes them.
    training_category: str = "gpu"
    # Queue system whose GPU request keys training Fireworks carry: "slurm" or "pbs".
    training_scheduler: str = "slurm"
    # --- coordinate: policy/buffer/registry ---
    # Decision policy: a prediction is accepted when its calibrated sigma keeps the central
    # `design_confidence` Gaussian interval within +-`design_error_bound` (eV/atom):
    # tau = bound / z, 0.12 / 1.645 = 0.073 eV/atom. Every generated candidate's
    # match-discriminator p_match is recorded; it also gates acceptance when
    # `design_p_match_min` ($MATCOUPLE_DESIGN_P_MATCH_MIN, `matcouple design --p-match-min`)
    # is above 0. Off by default, as in the paper's criterion (sigma decides a property,
    # p_match a structure): p_match >= 0.5 was given to only 15 of 1,135 MP ground states
    # of 3-8 atoms, because it mostly tracks how often the generator matches compositions
    # of that size, so as a gate it sent nearly every candidate to DFT whatever its sigma.
    design_error_bound: float = 0.12
    design_confidence: float = 0.90
    # A generated candidate whose predicted formation energy lies more than this
    # (eV/atom) below the lowest computed value known for its composition goes to DFT
    # whatever its sigma: a new ground state is a claim to check, and the one miss among
    # 15 DFT-checked AI-accepted generated cells was such a claim (a MgGa2 cell predicted
    # 0.06 below both known polymorphs was 0.17 off). inf turns the rule off
    # ($MATCOUPLE_DESIGN_BELOW_KNOWN_MARGIN).
    design_below_known_margin: float = field(default_factory=lambda: float(
        os.environ.get("MATCOUPLE_DESIGN_BELOW_KNOWN_MARGIN", "0.05")))
    design_p_match_min: float = field(default_factory=lambda: float(
        os.environ.get("MATCOUPLE_DESIGN_P_MATCH_MIN", "0")))
    # Fine-tuning buffer: DFT results waiting to fine-tune the surrogate, one document per
    # (material_id, fidelity). A fine-tune is due at `finetune_buffer_size` pending results
    # ($MATCOUPLE_FINETUNE_BUFFER_SIZE), or when the oldest has waited `finetune_max_age_h`
    # ($MATCOUPLE_FINETUNE_MAX_AGE_H) and at least `finetune_min_count_for_age` are pending.
    finetune_buffer_collection: str = "finetune_buffer"
    finetune_buffer_size: int = field(default_factory=lambda: int(
        os.environ.get("MATCOUPLE_FINETUNE_BUFFER_SIZE", "8")))
    finetune_max_age_h: float = field(default_factory=lambda: float(
        os.environ.get("MATCOUPLE_FINETUNE_MAX_AGE_H", "24")))
    finetune_min_count_for_age: int = 2
    # The single lock document that allows one queued-or-running fine-tune at a time. A
    # queued Firework's reservation lapses after `finetune_queue_ttl_s`, a running claim
    # after `finetune_claim_ttl_s` (a killed fine-tune never locks forever); after a failed
    # fine-tune no new one is queued for `finetune_retry_after_s`.
    finetune_lock_collection: str = "finetune_lock"
    finetune_queue_ttl_s: float = 6 * 3600.0
    finetune_claim_ttl_s: float = 2 * 3600.0
    finetune_retry_after_s: float = 3600.0
    finetune_category: str = "ai"
    # Model registry: files in a GridFS bucket, one document per version, and a local
    # cache of downloaded versions.
    model_registry_bucket: str = "model_files"
    model_versions_collection: str = "model_versions"
    model_cache_dir: Path = field(default_factory=lambda: _path_from_env(
        "MATCOUPLE_MODEL_CACHE", Path.home() / ".cache" / "matcouple" / "models"))
    # The fine-tune: every ensemble member continues from its weights for a few epochs on
    # the buffer's training part (repeated `finetune_buffer_repeat` times) plus a replay
    # sample of the MP 2018 (MEGNet) train split against forgetting.
    finetune_epochs: int = 3
    finetune_lr: float = 1e-4
    finetune_batch_size: int = 32
    finetune_buffer_repeat: int = 4
    finetune_replay_size: int = 40
    # Replay and validation rows are drawn among crystals of at most this many atoms (the
    # size of the structures a design run computes; keeps a CPU fine-tune near a minute).
    finetune_max_atoms: int = 40
    # Validation: a fixed slice (first rows) of the MEGNet val split, plus the held-out
    # share of the buffer (at least one entry once the buffer has 4 or more).
    finetune_val_size: int = 128
    finetune_holdout_fraction: float = 0.25
    # Promotion rule (formation energy MAE, ensemble mean): the new version is promoted
    # only if MAE(new) <= MAE(current) * (1 + tol) on the MEGNet val slice with tol =
    # `finetune_val_tolerance`, and MAE(new) <= MAE(current) + `finetune_holdout_tolerance`
    # on the held-out buffer entries (when there are any; with two entries that MAE is
    # noisy, hence 0.02 eV/atom, a sixth of the error bound); every metric must be finite.
    finetune_val_tolerance: float = 0.02
    finetune_holdout_tolerance: float = 0.02
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
    # Pre-relaxation of generated candidates before the surrogate sees them
    # (matcouple.directive.prerelax): "none" or "chgnet" (the `[mlip]` extra). Stage 1 moves
    # atoms in the fixed cell, stage 2 the cell too, abandoned outside the volume bounds
    # (x the input volume) or when atoms come closer than the minimum distance (A).
    design_prerelax: str = field(default_factory=lambda: os.environ.get(
        "MATCOUPLE_PRERELAX", "none"))
    prerelax_fmax: float = 0.1
    prerelax_position_steps: int = 60
    prerelax_cell_steps: int = 80
    prerelax_volume_bounds: tuple[float, float] = (0.75, 1.25)
    prerelax_min_distance: float = 0.7
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
    # --- coordinate: match discriminator ---
    # A CSP sample is a match when its StructureMatcher RMS distance (normalised by
    # (V/N)^(1/3), tolerances of MATCHER_TOLERANCES) to a known structure of its
    # composition is below d; d = stol = 0.5 makes the label the CSP benchmark's match.
    discriminator_rmsd_threshold: float = 0.5
    # CSP samples drawn per composition for training data (paper: 5).
    discriminator_samples_per_composition: int = 5
    # A generated structure is trusted when p_match >= this (else it goes to DFT).
    discriminator_p_match_min: float = 0.5
    # Shipped classifier (relative to the checkout unless absolute);
    # $MATCOUPLE_DISCRIMINATOR_MODEL overrides it.
    discriminator_model: str = "models/discriminator/discriminator.pt"
    # Where sample sets (jsonl.gz) and their feature caches are written (git-ignored).
    discriminator_data_dir: str = ".cache/discriminator"


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
