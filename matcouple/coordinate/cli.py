"""`matcouple design` (plan, submit, run with local workers) and `matcouple report`."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from matcouple.errors import MatcoupleError

design_app = typer.Typer(context_settings={"allow_interspersed_args": True},
                         help="Design crystals: database, generator, AI and DFT, as a "
                              "workflow on the LaunchPad.")
report_app = typer.Typer(context_settings={"allow_interspersed_args": True},
                         help="Report of a design run: table, counts, JSON and plot.")
console = Console()
err = Console(stderr=True)


def _fail(exc: Exception) -> None:
    err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
    raise typer.Exit(1)


LAUNCHPAD = typer.Option(None, "--launchpad", "-l", help="LaunchPad file (default: "
                         "$MATCOUPLE_LAUNCHPAD or fw_configs/my_launchpad.yaml).")


def _structured_request(formula, n, max_fe, min_fe, max_gap, min_gap):
    from matcouple.coordinate.request import RequestError, make_request

    given = [(lab, op, v) for lab, op, v in (
        ("formation_energy_per_atom", "<", max_fe), ("formation_energy_per_atom", ">", min_fe),
        ("band_gap", "<", max_gap), ("band_gap", ">", min_gap)) if v is not None]
    if not formula or n is None or len(given) != 1:
        raise RequestError("the structured form needs --formula, --n and exactly one of "
                           "--max-formation-energy, --min-formation-energy, --max-band-gap, "
                           "--min-band-gap (e.g. --formula Fe2O3 --n 50 "
                           "--max-formation-energy 1.0)")
    label, op, value = given[0]
    return make_request(formula, n, label=label, op=op, value=value)


def _units(text: str | None) -> list[int]:
    if not text:
        return []
    try:
        units = [int(z) for z in text.split(",") if z.strip()]
    except ValueError:
        raise MatcoupleError(f"--formula-units takes integers like 1,2; got {text!r}") from None
    if any(z <= 0 for z in units):
        raise MatcoupleError(f"--formula-units must be positive; got {text!r}")
    return units


def _database(launchpad: Path | None):
    from matcouple.errors import DatabaseUnavailableError
    from matcouple.settings import get_settings
    from matcouple.store.connection import LaunchpadConfig, embedded_server, open_launchpad

    config = LaunchpadConfig.load(launchpad)
    try:
        return config, open_launchpad(config)
    except DatabaseUnavailableError:
        if not config.is_local:
            raise
    # A loopback address that does not answer: start the embedded server there.
    embedded_server(config).start(timeout_s=get_settings().db_start_timeout_s)
    return config, open_launchpad(config)


@design_app.callback(invoke_without_command=True)
def design(
    request: str = typer.Argument(None, help='e.g. "Please generate up to 50 structures of '
                                  'Fe2O3 materials with a formation energy of less than 1 '
                                  'eV/atom"'),
    formula: str = typer.Option(None, help="Structured form: the composition."),
    n: int = typer.Option(None, help="Structured form: structures wanted."),
    max_formation_energy: float = typer.Option(None, help="eV/atom, structured form."),
    min_formation_energy: float = typer.Option(None, help="eV/atom, structured form."),
    max_band_gap: float = typer.Option(None, help="eV, structured form."),
    min_band_gap: float = typer.Option(None, help="eV, structured form."),
    engine: str = typer.Option(None, help="DFT engine: gpaw (here) or vasp (cluster)."),
    preset: str = typer.Option(None, help="DFT preset (gpaw: fast, standard)."),
    max_iterations: int = typer.Option(None, help="Generate/decide iterations at most."),
    max_dft: int = typer.Option(None, help="DFT calculations at most."),
    batch_size: int = typer.Option(None, help="Candidates sampled per iteration."),
    steps: int = typer.Option(None, help="Reverse-diffusion steps per sample."),
    seed: int = typer.Option(0, help="Seed of the generator."),
    formula_units: str = typer.Option(None, "--formula-units", "-z",
                                      help="Formula units per cell, e.g. 1,2 (default: all "
                                      "that fit the generator)."),
    tau: float = typer.Option(None, help="Sigma threshold (default: 0.12 eV/atom at 90%)."),
    p_match_min: float = typer.Option(None, "--p-match-min", help="Also require the match "
                                      "discriminator's p_match >= this to accept a generated "
                                      "structure (default $MATCOUPLE_DESIGN_P_MATCH_MIN or 0: "
                                      "no gate; p_match is recorded either way)."),
    prerelax: str = typer.Option(None, help="Pre-relax generated candidates before the AI "
                                 "judges them: none or chgnet (the [mlip] extra; default "
                                 "$MATCOUPLE_PRERELAX or none)."),
    workers: int = typer.Option(1, help="Local rlaunch workers (0: same as --no-launch)."),
    no_launch: bool = typer.Option(False, help="Only submit; run with rlaunch/qlaunch."),
    run: str = typer.Option(None, help="Run name (default: design-FORMULA-timestamp); an "
                            "existing run is continued."),
    recover: bool = typer.Option(False, help="Rerun Fireworks of the run whose worker died "
                                 "(lpad detect_lostruns --rerun), then continue."),
    launchpad: Path = LAUNCHPAD,
) -> None:
    """Plan and run a design request end to end (database -> generate -> AI -> DFT)."""
    from matcouple.coordinate import designrun as dr
    from matcouple.coordinate.planner import describe_plan
    from matcouple.coordinate.request import parse_request
    from matcouple.coordinate.workflow import default_run_name, submit_design

    try:
        config, lp = _database(launchpad)
        if request is None and formula is None:
            if not run:
                raise MatcoupleError("give a request, the structured form (--formula --n "
                                     "--max-formation-energy), or --run NAME to continue")
            dr.load_run(lp.db, run)
            cfg = dr.run_config(lp.db, run)
        else:
            req = parse_request(request) if request else _structured_request(
                formula, n, max_formation_energy, min_formation_energy, max_band_gap,
                min_band_gap)
            from matcouple.coordinate.llm import llm_configured, plan_with_llm

            cfg = dr.DesignConfig(
                request=req, run=run or default_run_name(req.reduced_formula),
                engine=engine or "", preset=preset or "",
                max_iterations=max_iterations or 0,
                max_dft=-1 if max_dft is None else max_dft, batch_size=batch_size or 0,
                steps=steps or 0, seed=seed, tau=tau, p_match_min=p_match_min,
                launchpad_file=str(config.path.resolve()),
                formula_units=_units(formula_units), prerelax=prerelax or "")
            if llm_configured():
                console.print("planner: LLM at $MATCOUPLE_LLM_URL chooses the tools")
                plan_with_llm(cfg, lp, console=console)
                _show_report(lp.db, cfg.run)
                return
            console.print("planner: deterministic (set MATCOUPLE_LLM_URL for an LLM)")
            for line in describe_plan(cfg):
                console.print(f"  - {line}")
            name, ids = submit_design(cfg, config)
            console.print(f"run {name}: workflow added ({len(ids)} Fireworks to start; "
                          "more are added as it runs)")
        if recover:
            from matcouple.coordinate.local import recover_lost_runs

            lost = recover_lost_runs(lp, cfg.run)
            console.print(f"rerunning {len(lost)} lost Firework(s): {lost}")
        if no_launch or workers <= 0:
            console.print(f"submitted; run it with: rlaunch -l {config.path} rapidfire "
                          f"(or qlaunch ...), then `matcouple report {cfg.run}`")
            return
        _launch(config.path.resolve(), lp.db, cfg.run, workers)
        _show_report(lp.db, cfg.run)
    except MatcoupleError as exc:
        _fail(exc)


def _launch(launchpad_file: Path, db, run: str, workers: int) -> None:
    from matcouple.coordinate import designrun as dr
    from matcouple.coordinate.local import run_workers
    from matcouple.coordinate.report import report_dir

    last = {}

    def tick() -> None:
        p = dr.progress(db, run)
        doc = dr.runs(db).find_one({"_id": run}, {"last_iteration": 1})
        p["iteration"] = doc["last_iteration"] if doc else 0
        if p != last:
            console.print(f"  iteration {p['iteration']}: {p['found']} found "
                          f"({p['database']} database, {p['accepted']} AI accepted, "
                          f"{p['dft_done']} DFT done, {p['pending_dft']} DFT pending, "
                          f"{p['skipped']} skipped)", highlight=False)
            last.clear()
            last.update(p)

    console.print(f"running {workers} local rlaunch worker(s) on run {run} ...")
    codes = run_workers(launchpad_file, report_dir(run) / "launches", run, workers,
                        on_tick=tick)
    if any(codes):
        err.print(f"a worker exited with {codes}; see {report_dir(run) / 'launches'}")


def _show_report(db, run: str) -> None:
    from matcouple.coordinate.report import report_tables, write_report

    report, json_path, png = write_report(db, run)
    table, counts = report_tables(report)
    console.print(table)
    console.print(counts)
    console.print(f"stopped: {report.get('stop_reason')}; workflow {report['workflow_state']}")
    console.print(f"report: {json_path} and {png}")


@report_app.callback(invoke_without_command=True)
def report(
    run: str = typer.Argument(None, help="Design run name (default: the latest)."),
    out: Path = typer.Option(None, help="Folder for report.json and iterations.png."),
    as_json: bool = typer.Option(False, "--json", help="Print the JSON report."),
    launchpad: Path = LAUNCHPAD,
) -> None:
    """Table of the unique structures, counts, JSON and the per-iteration plot."""
    import json

    from matcouple.coordinate import designrun as dr
    from matcouple.coordinate.report import report_tables, write_report

    try:
        _, lp = _database(launchpad)
        if run is None:
            latest = dr.runs(lp.db).find_one({}, sort=[("created_at", -1)])
            if latest is None:
                raise MatcoupleError("no design runs yet; start one with `matcouple design`")
            run = latest["_id"]
        data, json_path, png = write_report(lp.db, run, out)
    except MatcoupleError as exc:
        _fail(exc)
    if as_json:
        print(json.dumps(data, indent=1, default=str))
        return
    table, counts = report_tables(data)
    console.print(table)
    console.print(counts)
    console.print(f"report: {json_path} and {png}")
