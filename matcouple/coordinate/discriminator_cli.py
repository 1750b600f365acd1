"""``matcouple discriminator data|train|score``: build the match discriminator and use it.

Also runs as ``python -m matcouple.coordinate.discriminator_cli`` (e.g. on a GPU machine
without the console script).
"""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from matcouple.errors import MatcoupleError

discriminator_app = typer.Typer(
    help="Match discriminator p_match: CSP sample sets labelled by RMSD, training, scoring.",
    no_args_is_help=True,
)
console = Console()
err = Console(stderr=True)


def _fail(exc: Exception) -> None:
    err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
    raise typer.Exit(1)


@discriminator_app.command("data")
def data_command(
    output: Path | None = typer.Option(
        None, "--output", "-o", help="Sample set file (.jsonl.gz); default under "
        "Settings.discriminator_data_dir."),
    dataset: str = typer.Option("mp2018", help="Labelled set: mp2018 or perov5."),
    split: list[str] = typer.Option(["train"], "--split", help="train and/or val "
                                    "(repeatable); the test split is held back."),
    compositions: int = typer.Option(200, help="Compositions to sample."),
    samples: int | None = typer.Option(None, "--samples", "-k", help="CSP samples per "
                                       "composition (default Settings, 5)."),
    steps: int = typer.Option(100, help="Reverse diffusion steps per sample."),
    batch_size: int = typer.Option(64, help="Samples per sampler batch."),
    checkpoint: Path | None = typer.Option(None, help="Generator checkpoint (default: "
                                           "generator.pt for mp2018, perov5.pt for perov5)."),
    device: str | None = typer.Option(None, help="cuda or cpu (default: cuda if present)."),
    seed: int = typer.Option(0, help="Seed of the composition draw and the sampler."),
    rmsd_threshold: float | None = typer.Option(None, "--d", help="Match if RMSD < d "
                                                "(default Settings, 0.5)."),
    minutes: float | None = typer.Option(None, help="Stop sampling after this long."),
    workers: int = typer.Option(0, help="RMSD processes (default: cores - 1)."),
    overwrite: bool = typer.Option(False, help="Replace an existing output file."),
) -> None:
    """Draw K CSP samples per composition, label each by RMSD to the known crystals."""
    from matcouple.coordinate.discriminator_data import (
        SampleSetConfig,
        cpu_count_for_labels,
        generate_sample_set,
    )

    config = SampleSetConfig(
        dataset=dataset, splits=tuple(split), compositions=compositions,
        samples_per_composition=samples, steps=steps, batch_size=batch_size,
        checkpoint=str(checkpoint) if checkpoint else None, device=device, seed=seed,
        rmsd_threshold=rmsd_threshold, minutes=minutes,
        workers=workers or cpu_count_for_labels())
    try:
        summary = generate_sample_set(config, output, overwrite=overwrite)
    except MatcoupleError as exc:
        _fail(exc)
    table = Table(title=f"CSP samples: {summary['output']}")
    table.add_column("")
    table.add_column("value", justify="right")
    for key in ("compositions", "samples", "valid", "matched_any", "match", "match_rate",
                "seconds"):
        table.add_row(key, str(summary[key]))
    console.print(table)


@discriminator_app.command("train")
def train_command(
    data: list[Path] = typer.Argument(..., help="Sample set files (.jsonl.gz)."),
    out: Path | None = typer.Option(None, help="Model file (default: Settings."
                                    "discriminator_model); card .json and _roc.png beside."),
    folds: int = typer.Option(5, help="Cross-validation folds over compositions."),
    seed: int = typer.Option(0),
    rmsd_threshold: float | None = typer.Option(None, "--d", help="Relabel: match if "
                                                "RMSD < d (default Settings)."),
    variant: str | None = typer.Option(None, help="mlp_all, logistic_all or mlp_geometry "
                                       "(default: best cross-validated AUC)."),
    variants: list[str] | None = typer.Option(
        None, "--variants", help="Variants to cross-validate (repeatable; default all). "
        "Geometry-only variants skip the surrogate (much faster on a CPU)."),
) -> None:
    """Train p_match on labelled samples; report cross-validated AUC, precision, ECE."""
    from matcouple.coordinate.discriminator import default_model_path
    from matcouple.coordinate.discriminator_train import train_discriminator

    try:
        card = train_discriminator(data, out or default_model_path(), folds=folds, seed=seed,
                                   rmsd_threshold=rmsd_threshold, variant=variant,
                                   variants=variants or None)
    except MatcoupleError as exc:
        _fail(exc)
    table = Table(title=f"match discriminator: {card['data']['samples']} samples, "
                        f"{card['data']['compositions']} compositions, "
                        f"{100 * card['data']['match_fraction']:.1f}% matches")
    for column in ("variant", "AUC (out-of-fold)", f"precision @ {card['p_match_min']}",
                   "recall", "ECE"):
        table.add_column(column)
    for name, m in card["metrics"].items():
        at = m["at_p_match_min"]
        table.add_row(name + (" *" if name == card["model"]["variant"] else ""),
                      f"{m['auc']:.3f}", f"{at['precision']:.3f}", f"{at['recall']:.3f}",
                      f"{m['calibration']['ece']:.3f}")
    console.print(table)
    console.print(f"model: {out or default_model_path()}  (* shipped variant)")


@discriminator_app.command("score")
def score_command(
    files: list[Path] = typer.Argument(..., help="Structure files (CIF/POSCAR) or folders."),
    model: Path | None = typer.Option(None, help="Model file (default: the shipped one)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """p_match of each structure (trusted when >= Settings.discriminator_p_match_min)."""
    from matcouple.coordinate.discriminator import MatchDiscriminator
    from matcouple.structures.io import find_structure_files, structure_from_file

    try:
        paths = find_structure_files(files)
        structures = [structure_from_file(p) for p in paths]
        disc = MatchDiscriminator.load(model) if model else MatchDiscriminator.default()
        scores = disc.p_match(structures)
    except MatcoupleError as exc:
        _fail(exc)
    rows = [{"file": str(p), "formula": s.composition.reduced_formula, "p_match": round(q, 4),
             "trusted": q >= disc.threshold}
            for p, s, q in zip(paths, structures, scores, strict=True)]
    if as_json:
        console.print_json(json.dumps(rows))
        return
    table = Table(title=f"p_match (threshold {disc.threshold})")
    for column in ("file", "formula", "p_match", "trusted"):
        table.add_column(column)
    for r in rows:
        table.add_row(r["file"], r["formula"], f"{r['p_match']:.3f}", str(r["trusted"]))
    console.print(table)


if __name__ == "__main__":
    discriminator_app()
