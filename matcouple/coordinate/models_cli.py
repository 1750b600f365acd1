"""``matcouple models``: surrogate versions in the registry, promotion, fine-tuning."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from matcouple.errors import MatcoupleError

models_app = typer.Typer(help="Surrogate model versions (registry in GridFS), promotion and "
                         "fine-tuning on the buffer of DFT results.", no_args_is_help=True)
console = Console(width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True)

LAUNCHPAD_OPTION = typer.Option(
    None, "--launchpad", "-l",
    help="LaunchPad file (default: $MATCOUPLE_LAUNCHPAD or fw_configs/my_launchpad.yaml).",
)
FE = "formation_energy_per_atom"


def _fail(exc: Exception) -> None:
    err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
    raise typer.Exit(1)


def _db(launchpad: Path | None):
    from matcouple.store.connection import LaunchpadConfig, open_database

    return open_database(LaunchpadConfig.load(launchpad))


def _mae(metrics: dict, part: str, current: bool = False) -> str:
    source = metrics.get("current", {}) if current else metrics
    value = source.get(part, {}).get(FE)
    return "" if value is None else f"{value:.4f}"


@models_app.command("list")
def list_versions(launchpad: Path | None = LAUNCHPAD_OPTION,
                  limit: int = typer.Option(20, help="Newest N versions (0: all)."),
                  as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Versions, newest first: status, parent, formation-energy MAE (new vs the model it
    was compared with) on the val slice and the held-out buffer entries."""
    from matcouple.store.registry import ModelRegistry

    try:
        versions = ModelRegistry(_db(launchpad)).list_versions(limit)
    except MatcoupleError as exc:
        _fail(exc)
    if as_json:
        print(json.dumps([{k: v for k, v in d.items() if k not in ("card", "files")}
                          for d in versions], default=str, indent=1))
        return
    if not versions:
        console.print("no versions in the registry: predictions use the shipped model")
        return
    table = Table(title="surrogate versions (MAE: formation energy, eV/atom)")
    for header in ("version", "status", "created", "parent", "entries", "val MAE",
                   "was", "held-out MAE", "was", "reason / error"):
        table.add_column(header, overflow="fold")
    for d in versions:
        m = d.get("metrics") or {}
        table.add_row(d["version"], d["status"], f"{d['created']:%Y-%m-%d %H:%M}",
                      str(d.get("parent") or ""), str((d.get("data") or {}).get("n_entries", "")),
                      _mae(m, "val"), _mae(m, "val", True), _mae(m, "holdout"),
                      _mae(m, "holdout", True),
                      str(d.get("error") or d.get("status_reason") or d.get("note") or ""))
    console.print(table)


@models_app.command("current")
def show_current(launchpad: Path | None = LAUNCHPAD_OPTION) -> None:
    """The model predictions use now: the promoted version, else the shipped one."""
    from matcouple.coordinate.buffer import FineTuneBuffer
    from matcouple.settings import get_settings
    from matcouple.store.registry import ModelRegistry

    try:
        db = _db(launchpad)
        current = ModelRegistry(db).current()
        buffer = FineTuneBuffer(db)
        pending, due, lock = buffer.count_pending(), buffer.is_due(), buffer.lock_state()
    except MatcoupleError as exc:
        _fail(exc)
    if current is None:
        card = json.loads((get_settings().surrogate_model_dir / "model_card.json").read_text())
        console.print(f"shipped model {card.get('version')} "
                      f"({get_settings().surrogate_model_dir}); no version promoted")
    else:
        m = current.get("metrics") or {}
        console.print(f"promoted version {current['version']} (parent "
                      f"{current.get('parent')}, promoted {current.get('promoted_at')}); "
                      f"val MAE {_mae(m, 'val') or 'n/a'} eV/atom")
    console.print(f"fine-tune buffer: {pending} pending, due: {'yes' if due else 'no'}; "
                  f"fine-tune lock: {lock.state}"
                  + (f" (last error: {lock.last_error})" if lock.last_error else ""))


@models_app.command("promote")
def promote(version: str = typer.Argument(None, help="Version to promote."),
            shipped: bool = typer.Option(False, "--shipped",
                                         help="Go back to the shipped model."),
            launchpad: Path | None = LAUNCHPAD_OPTION) -> None:
    """Promote a version by hand (checked: it must download intact and load)."""
    from matcouple.store.registry import ModelRegistry

    if bool(version) == shipped:
        _fail(MatcoupleError("give either a VERSION or --shipped"))
    try:
        registry = ModelRegistry(_db(launchpad))
        if shipped:
            previous = registry.revert_to_shipped()
            console.print(f"predictions use the shipped model again (was {previous})")
            return
        doc = registry.promote(version, reason="promoted by hand")
    except MatcoupleError as exc:
        _fail(exc)
    console.print(f"promoted {doc['version']}")


@models_app.command("finetune-now")
def finetune_now_cmd(
    launchpad: Path | None = LAUNCHPAD_OPTION,
    submit: bool = typer.Option(False, "--submit",
                                help="Add a fine-tune Firework to the LaunchPad instead."),
    epochs: int = typer.Option(None, help="Epochs (default Settings.finetune_epochs)."),
    lr: float = typer.Option(None, help="Learning rate (default Settings.finetune_lr)."),
    device: str = typer.Option(None, help="cpu or cuda (default: cuda if available)."),
) -> None:
    """Fine-tune on the pending buffer entries now, due or not (one at a time)."""
    from matcouple.coordinate.buffer import finetune_firework
    from matcouple.coordinate.finetune import FineTuneConfig, finetune_now

    overrides = {k: v for k, v in {"epochs": epochs, "lr": lr, "device": device}.items()
                 if v is not None}
    try:
        db = _db(launchpad)
        if submit:
            from matcouple.store.connection import LaunchpadConfig, open_launchpad

            config = LaunchpadConfig.load(launchpad)
            fw = finetune_firework(db, launchpad_file=str(config.path), config=overrides)
            if fw is None:
                _fail(MatcoupleError("a fine-tune is already queued or running"))
            ids = open_launchpad(config).add_wf(fw)
            console.print(f"added fine-tune Firework {next(iter(ids.values()))}; run it with "
                          "rlaunch/qlaunch")
            return
        outcome = finetune_now(db, owner="matcouple models finetune-now",
                               config=FineTuneConfig.from_settings(progress=True, **overrides))
    except MatcoupleError as exc:
        _fail(exc)
    console.print(f"{outcome.status}: {outcome.reason}"
                  + (f" (version {outcome.version}, {outcome.n_entries} entries, "
                     f"{outcome.elapsed_s:.1f} s)" if outcome.version else ""))
    if outcome.status == "failed":
        err.print(outcome.error, highlight=False, soft_wrap=True)
        raise typer.Exit(1)
