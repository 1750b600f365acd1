"""``matcouple generate`` (sample, filter, store) and ``matcouple train generator``."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from matcouple.errors import MatcoupleError

generate_app = typer.Typer(
    help="Generate crystals with the diffusion model: ab initio, or for a composition (CSP).",
    invoke_without_command=True,
)
train_app = typer.Typer(help="Train models on this machine's CPU or GPU.", no_args_is_help=True)

console = Console()
err = Console(stderr=True)


def _fail(exc: Exception) -> None:
    err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
    raise typer.Exit(1)


def report_table(summary: dict, title: str) -> Table:
    table = Table(title=title)
    table.add_column("step")
    table.add_column("count", justify="right")
    table.add_row("candidates", str(summary["candidates"]))
    for name, count in summary["removed"].items():
        table.add_row(f"removed by {name}", str(count))
    table.add_row("survivors (stored)", str(summary["survivors"]))
    return table


@generate_app.callback()
def generate_command(
    ctx: typer.Context,
    n: int = typer.Option(None, "--n", help="Candidates to sample (survivors are fewer)."),
    composition: str | None = typer.Option(
        None, help="Cell composition for structure prediction, e.g. Fe2O3."),
    formula_units: list[int] | None = typer.Option(
        None, "--formula-units", "-z",
        help="Formula units per cell (repeatable); default every Z that fits the model."),
    strategy: str = typer.Option("hybrid", help="p(N) for ab initio: data, uniform, hybrid."),
    seed: int = typer.Option(0, help="Random seed (each batch derives its own)."),
    batch_size: int | None = typer.Option(None, help="Candidates per sampler batch."),
    steps: int | None = typer.Option(None, help="Reverse diffusion steps (default 1000)."),
    run: str | None = typer.Option(None, help="Run name (default: a timestamp); "
                                              "an unfinished run of this name continues."),
    output: Path | None = typer.Option(None, "--output", "-o", help="Write survivors as CIFs."),
    checkpoint: Path | None = typer.Option(None, help="Generator checkpoint file."),
    device: str | None = typer.Option(None, help="cuda or cpu (default: cuda if present)."),
    workers: int = typer.Option(0, help="Filter processes (default: cores - 1)."),
    submit: bool = typer.Option(False, help="Add a workflow to the LaunchPad instead; run it "
                                            "with rlaunch/qlaunch."),
    per_firework: int | None = typer.Option(None, help="Candidates per Firework (--submit)."),
    category: str | None = typer.Option(None, help="FireWorks _category of the Fireworks "
                                                   "(--submit), e.g. ai."),
    launchpad: Path | None = typer.Option(None, "--launchpad", "-l", help="LaunchPad file."),
) -> None:
    """Sample candidates, keep those that pass the validity filters, store them."""
    if ctx.invoked_subcommand is not None:
        return
    from matcouple.directive.generate import GenerationRequest, generate
    from matcouple.directive.tasks import generation_workflow
    from matcouple.store.connection import LaunchpadConfig, open_database, open_launchpad

    if n is None:
        _fail(MatcoupleError("give --n, the number of candidates to sample"))
    request = GenerationRequest(
        n=n, composition=composition, formula_units=formula_units or None, strategy=strategy,
        seed=seed, batch_size=batch_size, steps=steps, run=run,
        output_dir=str(output.resolve()) if output else None,
        checkpoint=str(checkpoint.resolve()) if checkpoint else None, device=device,
        workers=workers)
    try:
        config = LaunchpadConfig.load(launchpad)
        if submit:
            import datetime as dt

            request.run = request.run or dt.datetime.now().strftime("gen-%Y%m%d-%H%M%S")
            wf = generation_workflow(request, per_firework=per_firework, category=category,
                                     launchpad_file=str(config.path))
            ids = open_launchpad(config).add_wf(wf)
            console.print(f"run {request.run}: {len(ids)} Fireworks added; run them with "
                          f"`rlaunch -l {config.path} rapidfire`")
            return
        result = generate(request, open_database(config))
    except MatcoupleError as exc:
        _fail(exc)
    summary = result.summary()
    console.print(report_table(summary, f"generation run {result.run}"))
    console.print(f"{summary['generated_per_hour']} generated/h, "
                  f"{summary['valid_per_hour']} valid/h; model {result.model_version}")
    if output:
        console.print(f"{len(result.cif_files)} CIFs in {output}")


@generate_app.command("report")
def generate_report(
    run: str = typer.Argument(..., help="Run name."),
    as_json: bool = typer.Option(False, "--json", help="Print the run document as JSON."),
    launchpad: Path | None = typer.Option(None, "--launchpad", "-l", help="LaunchPad file."),
) -> None:
    """Show a run's per-filter counts and status."""
    from matcouple.directive.generate import generation_report
    from matcouple.store.connection import LaunchpadConfig, open_database

    try:
        doc = generation_report(open_database(LaunchpadConfig.load(launchpad)), run)
    except MatcoupleError as exc:
        _fail(exc)
    if as_json:
        print(json.dumps(doc, indent=1, default=str))
        return
    summary = doc.get("report") or {
        "candidates": sum(b["candidates"] for b in doc["batches"]),
        "survivors": sum(b["survivors"] for b in doc["batches"]),
        "removed": {k: sum(b["removed"][k] for b in doc["batches"])
                    for k in (doc["batches"][0]["removed"] if doc["batches"] else {})}}
    console.print(report_table(summary, f"run {run} ({doc['status']})"))
    if doc.get("error"):
        err.print(doc["error"], highlight=False)


@train_app.command("generator")
def train_generator(
    dataset: str = typer.Option("perov5", help="perov5, mp2018, carbon24, '+'-joined."),
    out: Path = typer.Option(..., help="Training checkpoint (resumed if it exists)."),
    minutes: float = typer.Option(8.0, help="Wall time of this chunk."),
    budget_minutes: float = typer.Option(15.0, help="Total time the LR schedule spans."),
    export: Path | None = typer.Option(None, help="Write the release file here afterwards."),
    limit: int | None = typer.Option(None, help="Use only the first N training rows."),
    hidden: int = typer.Option(256),
    layers: int = typer.Option(5),
    batch_size: int | None = typer.Option(None),
    device: str | None = typer.Option(None),
    gpus: int | None = typer.Option(None, help="GPUs of this node in data parallel "
                                               "(0: CPU); --batch-size is per GPU."),
    backend: str | None = typer.Option(None, help="nccl (GPUs) or gloo (CPU processes)."),
) -> None:
    """Train the diffusion generator in resumable chunks (same as python -m ...train)."""
    from matcouple.directive.train import main

    argv = ["--dataset", dataset, "--out", str(out), "--minutes", str(minutes),
            "--budget-minutes", str(budget_minutes), "--hidden", str(hidden),
            "--layers", str(layers)]
    for flag, value in (("--export", export), ("--limit", limit),
                        ("--batch-size", batch_size), ("--device", device),
                        ("--gpus", gpus), ("--backend", backend)):
        if value is not None:
            argv += [flag, str(value)]
    try:
        main(argv)
    except MatcoupleError as exc:
        _fail(exc)
