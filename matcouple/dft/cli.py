"""``matcouple dft``: relax structures with DFT through the LaunchPad and show the results."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from matcouple.errors import MatcoupleError

dft_app = typer.Typer(help="DFT relaxations (GPAW here, VASP on a cluster) on the LaunchPad.",
                      no_args_is_help=True)
# Wide enough for the results table when stdout is a file or a pipe.
console = Console(width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True)

LAUNCHPAD_OPTION = typer.Option(
    None, "--launchpad", "-l",
    help="LaunchPad file (default: $MATCOUPLE_LAUNCHPAD or fw_configs/my_launchpad.yaml).",
)


def _fail(exc: Exception) -> None:
    err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
    raise typer.Exit(1)


def _queueadapter(walltime: str | None, nodes: int | None, ntasks: int | None) -> dict:
    hints = {"walltime": walltime, "nodes": nodes, "ntasks": ntasks}
    return {k: v for k, v in hints.items() if v is not None}


def _num(value, fmt: str = ".4f") -> str:
    return "" if value is None else format(value, fmt)


def _print_rows(rows: list[dict], title: str) -> None:
    if not rows:
        console.print(f"{title}: nothing was run")
        return
    table = Table(title=title)
    for header in ("id", "formula", "state", "a, b, c (A)", "E (eV/atom)", "E_f (eV/atom)",
                   "gap (eV)", "attempts", "wall (s)"):
        table.add_column(header, overflow="fold")
    for r in rows:
        abc = (" ".join(f"{r[k]:.4f}" for k in ("a", "b", "c")) if r.get("a") is not None
               else "")
        table.add_row(str(r["material_id"]), r.get("formula", ""), r["state"], abc,
                      _num(r.get("energy_per_atom")),
                      _num(r.get("formation_energy_per_atom")), _num(r.get("band_gap"), ".3f"),
                      str(r.get("attempt") or ""), _num(r.get("wall_s"), ".1f"))
    console.print(table)
    for r in rows:
        if r.get("error"):
            err.print(f"{r['material_id']}: {r['error']}", highlight=False, soft_wrap=True)


@dft_app.command("run")
def dft_run(
    paths: list[Path] = typer.Argument(None, help="CIF/POSCAR files or folders."),
    engine: str | None = typer.Option(None, help="gpaw (default) or vasp."),
    preset: str | None = typer.Option(None, help="fast (default) or standard."),
    formula: str | None = typer.Option(None, help="Also take database entries of this formula."),
    chemsys: str | None = typer.Option(None, help="Also take database entries of this system."),
    limit: int | None = typer.Option(None, help="At most N database entries."),
    run: str | None = typer.Option(None, help="Name of the run (default: a timestamp)."),
    submit_only: bool = typer.Option(
        False, "--submit-only",
        help="Only add the workflows (run them with rlaunch/qlaunch); default for vasp."),
    recompute: bool = typer.Option(False, help="Do not skip structures already computed."),
    category: str | None = typer.Option(None, help="_category of the Fireworks (default dft)."),
    walltime: str | None = typer.Option(None, help="_queueadapter walltime, e.g. 04:00:00."),
    nodes: int | None = typer.Option(None, help="_queueadapter nodes per job."),
    ntasks: int | None = typer.Option(None, help="_queueadapter tasks (cores) per job."),
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON."),
    launchpad: Path | None = LAUNCHPAD_OPTION,
) -> None:
    """Relax each structure and compute energy, formation energy and band gap.

    Adds one workflow per structure (skipping those computed at this fidelity), runs them
    here with FireWorks' rapidfire unless --submit-only, and prints each relaxed lattice
    and energy. The results are `materials` documents of source <engine>-<preset>.
    """
    from matcouple.dft.engine import get_engine
    from matcouple.dft.runs import launch_run_here, run_results
    from matcouple.dft.workflows import submit_dft
    from matcouple.screening import collect_structures
    from matcouple.settings import get_settings
    from matcouple.store.connection import LaunchpadConfig, open_launchpad

    settings = get_settings()
    engine = engine or settings.dft_engine
    if not (paths or formula or chemsys):
        _fail(MatcoupleError("give structure files/folders, or --formula/--chemsys"))
    try:
        get_engine(engine)  # an unknown engine fails before any structure is read
        config = LaunchpadConfig.load(launchpad)
        structures, refused = collect_structures(config, paths or [], formula=formula,
                                                 chemsys=chemsys, limit=limit)
        for where, reason in refused:
            err.print(f"refused {where}: {reason}", highlight=False, soft_wrap=True)
        if not structures:
            raise MatcoupleError("no usable structures given")
        lp = open_launchpad(config)
        sub = submit_dft(config, structures, engine=engine, preset=preset, run=run,
                         skip_existing=not recompute, category=category,
                         queueadapter=_queueadapter(walltime, nodes, ntasks), lp=lp)
        err.print(sub.summary(), highlight=False, soft_wrap=True)
        for material_id, existing in sub.skipped.items():
            err.print(f"skipped {material_id}: already computed as {existing}",
                      highlight=False, soft_wrap=True)
        if submit_only or engine == "vasp":
            console.print(f"run {sub.run}: workflows added; run them with "
                          f"`rlaunch -l {config.path} rapidfire` or qlaunch")
            return
        launch_run_here(lp, sub.run, Path(settings.dft_workdir or ".") / "dft_runs" / sub.run)
        rows = run_results(lp, sub.run)
    except MatcoupleError as exc:
        _fail(exc)
    if as_json:
        print(json.dumps(rows, indent=1, default=str))
    else:
        _print_rows(rows, f"DFT run {sub.run} ({sub.engine}/{sub.preset})")
    if any(r["state"] != "COMPLETED" for r in rows):
        raise typer.Exit(1)


@dft_app.command("results")
def dft_results(
    run: str = typer.Argument(..., help="Run name printed by `matcouple dft run`."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    launchpad: Path | None = LAUNCHPAD_OPTION,
) -> None:
    """Show the relaxed lattices, energies and failures of a DFT run."""
    from matcouple.dft.runs import run_results
    from matcouple.store.connection import LaunchpadConfig, open_launchpad

    try:
        rows = run_results(open_launchpad(LaunchpadConfig.load(launchpad)), run)
    except MatcoupleError as exc:
        _fail(exc)
    if as_json:
        print(json.dumps(rows, indent=1, default=str))
    else:
        _print_rows(rows, f"DFT run {run}")
