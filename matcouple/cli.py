"""The ``matcouple`` command: database, data, workflows and the demo."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from matcouple.coordinate.cli import design_app, report_app
from matcouple.coordinate.discriminator_cli import discriminator_app
from matcouple.coordinate.models_cli import models_app
from matcouple.dft.cli import dft_app
from matcouple.directive.cli import generate_app, train_app
from matcouple.errors import MatcoupleError
from matcouple.surrogate import cli as surrogate_cli

app = typer.Typer(
    help="Couple AI models with DFT on a FireWorks/MongoDB LaunchPad.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
db_app = typer.Typer(help="Run the embedded MongoDB server (SecantusDB) of this checkout.",
                     no_args_is_help=True)
data_app = typer.Typer(help="Load and query the materials database.", no_args_is_help=True)
screen_app = typer.Typer(help="Screening workflows (symmetry, density) on the LaunchPad.",
                         no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(data_app, name="data")
app.add_typer(screen_app, name="screen")
app.add_typer(generate_app, name="generate")
train_app.command("surrogate")(surrogate_cli.train_surrogate)
train_app.command("memory")(surrogate_cli.train_memory)
app.add_typer(train_app, name="train")
app.command("predict")(surrogate_cli.predict)
app.add_typer(dft_app, name="dft")
app.add_typer(design_app, name="design")
app.add_typer(report_app, name="report")
app.add_typer(discriminator_app, name="discriminator")
app.add_typer(models_app, name="models")

console = Console()
err = Console(stderr=True)


def _fail(exc: Exception) -> None:
    err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
    raise typer.Exit(1)


LAUNCHPAD_OPTION = typer.Option(
    None, "--launchpad", "-l",
    help="LaunchPad file (default: $MATCOUPLE_LAUNCHPAD or fw_configs/my_launchpad.yaml).",
)


# ---------------------------------------------------------------- db
@db_app.command("start")
def db_start(launchpad: Path | None = LAUNCHPAD_OPTION) -> None:
    """Start the embedded server on the LaunchPad file's address (no-op if running)."""
    from matcouple.settings import get_settings
    from matcouple.store.connection import LaunchpadConfig, embedded_server

    try:
        server = embedded_server(LaunchpadConfig.load(launchpad))
        status = server.start(timeout_s=get_settings().db_start_timeout_s)
    except MatcoupleError as exc:
        _fail(exc)
    console.print(status.describe())


@db_app.command("stop")
def db_stop(launchpad: Path | None = LAUNCHPAD_OPTION) -> None:
    """Stop the embedded server (data stays in launchpad/db/)."""
    from matcouple.store.connection import LaunchpadConfig, embedded_server

    try:
        stopped = embedded_server(LaunchpadConfig.load(launchpad)).stop()
    except MatcoupleError as exc:
        _fail(exc)
    console.print("embedded database stopped" if stopped else "embedded database was not running")


@db_app.command("status")
def db_status(launchpad: Path | None = LAUNCHPAD_OPTION) -> None:
    """Say whether the embedded server runs and answers; exit 1 if it does not."""
    from matcouple.store.connection import LaunchpadConfig, embedded_server

    try:
        status = embedded_server(LaunchpadConfig.load(launchpad)).status()
    except MatcoupleError as exc:
        _fail(exc)
    console.print(status.describe())
    if not status.answering:
        raise typer.Exit(1)


# ---------------------------------------------------------------- data
@data_app.command("load")
def data_load(
    dataset: str = typer.Argument(..., help="mp2018, perov5, carbon24, or a CSV path"),
    subset: str | None = typer.Option(None, help="Subset of a known set ('ci' for mp2018)."),
    source: str | None = typer.Option(None, help="Source name for a CSV (default: file stem)."),
    fidelity: str | None = typer.Option(None, help="Fidelity tag of a CSV's labels."),
    labels: str | None = typer.Option(None, help="Comma-separated label columns of a CSV."),
    allow_missing_labels: bool = typer.Option(False, help="Keep rows whose labels are empty."),
    limit: int | None = typer.Option(None, help="Load only the first N rows."),
    workers: int | None = typer.Option(None, help="Parsing processes (default: cores, max 4)."),
    report: Path | None = typer.Option(None, help="Write the refused rows to this JSON file."),
    launchpad: Path | None = LAUNCHPAD_OPTION,
) -> None:
    """Ingest a labelled crystal table into the materials collection (idempotent)."""
    from matcouple.datasets import csv_dataset, known_dataset
    from matcouple.ingest import ingest
    from matcouple.store.connection import LaunchpadConfig, open_database
    from matcouple.store.materials import MaterialsStore

    try:
        if Path(dataset).suffix in (".csv", ".gz") or Path(dataset).exists():
            spec = csv_dataset(
                Path(dataset), source=source, fidelity=fidelity,
                labels=labels.split(",") if labels else None,
                labels_required=not allow_missing_labels,
            )
        else:
            spec = known_dataset(dataset, subset)
        store = MaterialsStore(open_database(LaunchpadConfig.load(launchpad)))
        result = ingest(spec, store, limit=limit, workers=workers)
    except MatcoupleError as exc:
        _fail(exc)
    for bad in result.errors[:50]:
        err.print(f"refused row {bad.row} ({bad.material_id}): {bad.reason}", highlight=False)
    if len(result.errors) > 50:
        err.print(f"... and {len(result.errors) - 50} more refused rows")
    if report:
        report.write_text(json.dumps(
            {"dataset": result.dataset, "total": result.total, "written": result.written,
             "errors": [vars(e) for e in result.errors]}, indent=1))
    console.print(result.summary())
    if not result.ok:
        raise typer.Exit(1)


@data_app.command("query")
def data_query(
    formula: str | None = typer.Option(None, help="Reduced formula, e.g. Fe2O3."),
    chemsys: str | None = typer.Option(None, help="Chemical system, e.g. Fe-O."),
    structure: Path | None = typer.Option(None, help="CIF/POSCAR: find the same crystal."),
    limit: int = typer.Option(20, help="Rows to show."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    launchpad: Path | None = LAUNCHPAD_OPTION,
) -> None:
    """Find materials by formula, chemical system or structure."""
    from matcouple.store.connection import LaunchpadConfig, open_database
    from matcouple.store.materials import MaterialsStore
    from matcouple.structures.io import structure_from_file

    if not (formula or chemsys or structure):
        _fail(MatcoupleError("give --formula, --chemsys or --structure"))
    try:
        store = MaterialsStore(open_database(LaunchpadConfig.load(launchpad)))
        if structure:
            docs = list(store.find_matching(structure_from_file(structure)))
        elif formula:
            docs = store.find_by_formula(formula)
        else:
            docs = store.find_by_chemsys(chemsys or "")
    except MatcoupleError as exc:
        _fail(exc)
    rows = [
        {"id": d["_id"], "formula": d["reduced_formula"], "nsites": d["nsites"],
         "spacegroup": d["symmetry"]["symbol"], "fidelity": d["fidelity"],
         **{k: v["value"] for k, v in d.get("labels", {}).items()}}
        for d in docs[:limit]
    ]
    if as_json:
        print(json.dumps(rows, indent=1))
        return
    table = Table(title=f"{len(docs)} match(es)")
    for key in dict.fromkeys(k for r in rows for k in r):
        table.add_column(key)
    for r in rows:
        table.add_row(*[f"{v:.4g}" if isinstance(v, float) else str(v) for v in r.values()])
    console.print(table)


@data_app.command("count")
def data_count(launchpad: Path | None = LAUNCHPAD_OPTION) -> None:
    """Count materials per source and fidelity."""
    from matcouple.store.connection import LaunchpadConfig, open_database
    from matcouple.store.materials import MaterialsStore

    try:
        store = MaterialsStore(open_database(LaunchpadConfig.load(launchpad)))
        groups = store.collection.aggregate(
            [{"$group": {"_id": {"source": "$source", "fidelity": "$fidelity"},
                         "n": {"$sum": 1}}}])
        for g in groups:
            console.print(f"{g['_id']['source']:12s} {g['_id']['fidelity']:28s} {g['n']}")
    except MatcoupleError as exc:
        _fail(exc)


# ---------------------------------------------------------------- screening
@screen_app.command("submit")
def screen_submit(
    paths: list[Path] = typer.Argument(None, help="CIF/POSCAR files or folders."),
    formula: str | None = typer.Option(None, help="Screen database entries of this formula."),
    chemsys: str | None = typer.Option(None, help="Screen database entries of this system."),
    limit: int | None = typer.Option(None, help="At most N database entries."),
    run: str | None = typer.Option(None, help="Name of the run (default: a timestamp)."),
    batch_size: int | None = typer.Option(None, help="Structures per Firework."),
    launchpad: Path | None = LAUNCHPAD_OPTION,
) -> None:
    """Add a screening workflow to the LaunchPad; run it with `rlaunch rapidfire`."""
    from matcouple.screening import collect_structures, submit_screening
    from matcouple.store.connection import LaunchpadConfig

    try:
        config = LaunchpadConfig.load(launchpad)
        structures, refused = collect_structures(
            config, paths or [], formula=formula, chemsys=chemsys, limit=limit)
        for where, reason in refused:
            err.print(f"refused {where}: {reason}", highlight=False)
        run_name, fw_ids = submit_screening(config, structures, run=run, batch_size=batch_size)
    except MatcoupleError as exc:
        _fail(exc)
    console.print(f"run {run_name}: {len(structures)} structures in {len(fw_ids)} Fireworks "
                  f"(ids {min(fw_ids)}..{max(fw_ids)})")


@screen_app.command("results")
def screen_results(
    run: str = typer.Argument(..., help="Run name given at submit."),
    launchpad: Path | None = LAUNCHPAD_OPTION,
) -> None:
    """Show the stored results of a screening run."""
    from matcouple.screening import screening_results, summary_table

    try:
        docs = screening_results(run, launchpad)
    except MatcoupleError as exc:
        _fail(exc)
    console.print(summary_table(docs, title=f"screening {run}: {len(docs)} structures"))


# ---------------------------------------------------------------- demo
@app.command("demo")
def demo(
    max_iterations: int = typer.Option(3, help="Design iterations."),
    max_dft: int = typer.Option(0, help="DFT calculations at most (GPAW fast preset)."),
    workers: int = typer.Option(2, help="Local rlaunch workers."),
    screening: bool = typer.Option(False, help="Run the earlier screening demo instead."),
    launchpad: Path | None = LAUNCHPAD_OPTION,
) -> None:
    """The main job on the embedded database: load data, design Fe2O3 (paper section 4.3)."""
    from matcouple.demo import run_demo, run_screening_demo

    try:
        if screening:
            run_screening_demo(launchpad=launchpad, console=console)
        else:
            run_demo(max_iterations=max_iterations, max_dft=max_dft, workers=workers,
                     launchpad=launchpad, console=console)
    except MatcoupleError as exc:
        _fail(exc)


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
