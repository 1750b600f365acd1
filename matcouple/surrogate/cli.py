"""`matcouple train surrogate` and `matcouple predict`."""

from __future__ import annotations

import csv
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from matcouple.errors import MatcoupleError

console = Console()
err = Console(stderr=True)


def train_surrogate(
    out: Path = typer.Option(..., help="Training checkpoint (re-run to continue it)."),
    data: Path | None = typer.Option(None, help="Labelled CSV (default: MP 2018.6.1)."),
    targets: str = typer.Option("formation_energy_per_atom,band_gap"),
    split_column: str = typer.Option("megnet_split"),
    epochs: int | None = typer.Option(None, help="Default: Settings.surrogate_train_epochs."),
    minutes: float | None = typer.Option(None, help="Stop this chunk after N minutes."),
    batch_size: int | None = typer.Option(None, help="Default: Settings."
                                          "surrogate_train_batch_size."),
    lr: float | None = typer.Option(None, help="Peak learning rate (default: Settings."
                                    "surrogate_train_lr)."),
    warmup_epochs: float | None = typer.Option(
        None, help="Epochs of linear warm-up before the cosine decay (a short fine-tune "
        "wants a fraction); default: Settings.surrogate_train_warmup_epochs."),
    seed: int = typer.Option(0),
    limit_train: int | None = typer.Option(None, help="Use the first N training rows."),
    init_from: Path | None = typer.Option(None, help="Fine-tune from this checkpoint."),
    device: str | None = typer.Option(None, help="cuda, cpu (default: cuda if present)."),
    export: Path | None = typer.Option(None, help="Also write the inference model file."),
    gpus: int | None = typer.Option(None, help="GPUs of this node in data parallel (0: CPU); "
                                               "--batch-size is per GPU."),
    backend: str | None = typer.Option(None, help="nccl (GPUs) or gloo (CPU processes)."),
    members: int = typer.Option(1, help="Ensemble members (seeds seed.. seed+M-1), "
                                        "written as <out>-s<seed>.pt."),
    parallel_members: bool = typer.Option(False, help="One process per member, member k "
                                                      "on GPU k % gpus."),
    model: list[str] = typer.Option([], "--model", help="Model hyper-parameter NAME=VALUE "
                                    "(repeat), e.g. --model dropout=0 --model scalars=144; "
                                    "a resumed checkpoint keeps its own."),
    fused_tp: bool | None = typer.Option(None, "--fused-tp/--no-fused-tp", help="Fused "
                                         "tensor products in training (same math as e3nn, "
                                         "faster); default: Settings.surrogate_train_fused_tp."),
    ema: float | None = typer.Option(None, help="EMA decay of the weights, e.g. 0.999 (0: "
                                     "off): the average is evaluated each epoch, kept as "
                                     "the best and exported; default: Settings."
                                     "surrogate_train_ema_decay."),
    target_weights: str = typer.Option("", help="Loss weight per target in --targets order, "
                                       "e.g. 2,1 (default: equal)."),
    weight_decay: float | None = typer.Option(None, help="AdamW weight decay (default: "
                                              "Settings.surrogate_train_weight_decay)."),
    strain_noise: float | None = typer.Option(None, help="Std of random strains applied in "
                                              "training (fraction, e.g. 0.01; 0: off); "
                                              "default: Settings.surrogate_train_strain_noise."),
    displacement_noise: float | None = typer.Option(
        None, help="Std of random atomic displacements in training (Å, e.g. 0.02; 0: off); "
        "default: Settings.surrogate_train_displacement_noise."),
) -> None:
    """Train Crysformer on a labelled table (resumable; checkpoint after every epoch)."""
    from matcouple.settings import get_settings
    from matcouple.surrogate.model import parse_model_overrides
    from matcouple.surrogate.parallel import train_members, train_on_gpus
    from matcouple.surrogate.train import (
        TrainConfig,
        export_model,
        parse_target_weights,
        train,
    )

    settings = get_settings()
    try:
        cfg = TrainConfig(
            data=str(data or settings.data_dir / settings.datasets["mp2018"]),
            targets=tuple(targets.split(",")), split_column=split_column,
            epochs=settings.surrogate_train_epochs if epochs is None else epochs,
            batch_size=settings.surrogate_train_batch_size if batch_size is None else
            batch_size, lr=settings.surrogate_train_lr if lr is None else lr,
            warmup_epochs=settings.surrogate_train_warmup_epochs if warmup_epochs is None
            else warmup_epochs, seed=seed,
            limit_train=limit_train, model=parse_model_overrides(model),
            fused_tp=settings.surrogate_train_fused_tp if fused_tp is None else fused_tp,
            ema_decay=settings.surrogate_train_ema_decay if ema is None else ema,
            weight_decay=settings.surrogate_train_weight_decay if weight_decay is None
            else weight_decay,
            strain_noise=settings.surrogate_train_strain_noise if strain_noise is None
            else strain_noise,
            displacement_noise=settings.surrogate_train_displacement_noise
            if displacement_noise is None else displacement_noise,
            target_weights=parse_target_weights(target_weights))
    except MatcoupleError as exc:
        err.print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(2) from None
    kwargs = {"minutes": minutes, "init_from": init_from, "cache_dir": settings.graph_cache_dir}
    try:
        if members > 1 or parallel_members:
            for r in train_members(cfg, out, members=members, gpus=1 if gpus is None else gpus,
                                   backend=backend, parallel=parallel_members, device=device,
                                   export=export, **kwargs):
                console.print(f"member seed {r['seed']}: {r['checkpoint']} epoch {r['epoch']}"
                              + (f", exported {r['export']} val MAE {r['val_mae']}"
                                 if "export" in r else ""))
            return
        if gpus is not None or backend is not None:
            train_on_gpus(cfg, out, gpus=1 if gpus is None else gpus, backend=backend,
                          device=device, **kwargs)
        else:
            train(cfg, out, device=device, **kwargs)
        if export:
            info = export_model(out, export)
            console.print(f"exported {export}: val MAE {info['val_mae']}")
    except MatcoupleError as exc:
        err.print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(1) from None


def train_memory(
    model_file: Path = typer.Argument(..., help="An exported dropout-free value model."),
    out: Path | None = typer.Option(None, help="Memory file (default: <model>.memory.pt "
                                    "beside the model)."),
    data: Path | None = typer.Option(None, help="Labelled CSV (default: MP 2018.6.1)."),
    split_column: str = typer.Option("megnet_split", help="'' for every row."),
    split: str = typer.Option("train", help="The rows the model was trained on."),
    k: int | None = typer.Option(None, help="Neighbours averaged (default: Settings."
                                 "residual_memory_k)."),
    dims: int | None = typer.Option(None, help="Principal axes kept (default: Settings."
                                    "residual_memory_dims)."),
    eps: float | None = typer.Option(None, help="eps of the weights 1/(distance + eps) "
                                     "(default: Settings.residual_memory_eps)."),
    limit: int | None = typer.Option(None, help="Use the first N rows."),
    device: str | None = typer.Option(None, help="cuda or cpu (default: cuda if present)."),
    card: Path | None = typer.Option(None, help="Also name the memory in this model card "
                                     "(the model must be one of its value models)."),
) -> None:
    """Keep a value model's residuals on its training rows, looked up by neighbours in its
    own features to correct its predictions (surrogate/residual_memory.py)."""
    import json

    from matcouple.settings import get_settings
    from matcouple.surrogate.residual_memory import build_residual_memory
    from matcouple.surrogate.value_blend import value_model_names

    settings = get_settings()
    out = out or model_file.with_name(model_file.stem + ".memory.pt")
    try:
        card_data = json.loads(card.read_text()) if card else None
        if card_data is not None and model_file.name not in value_model_names(card_data):
            raise MatcoupleError(f"{model_file.name} is not a value model of {card}")
        memory, summary = build_residual_memory(
            model_file, data or settings.data_dir / settings.datasets["mp2018"],
            split_column=split_column or None, split=split or None,
            k=k or settings.residual_memory_k, dims=dims or settings.residual_memory_dims,
            eps=eps or settings.residual_memory_eps, limit=limit, device=device,
            cache_dir=settings.graph_cache_dir)
    except (MatcoupleError, OSError, ValueError) as exc:
        err.print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(1) from None
    memory.save(out)
    mae = ", ".join(f"{t} {v:.4f}" for t, v in summary["model_mae"].items())
    console.print(f"wrote {out}: {summary['crystals']} crystals ({summary['skipped']} rows "
                  f"skipped), k={memory.k}, {memory.axes.shape[1]} axes; the model's MAE on "
                  f"them: {mae}")
    if card is not None and card_data is not None:
        card_data.setdefault("value_memories", {})[model_file.name] = out.name
        card.write_text(json.dumps(card_data, indent=1))
        console.print(f"named it in {card} (recalibrate the card: its blend weights and "
                      "scales were fitted without it)")


def _read_inputs(paths: list[Path]) -> list[tuple[str, object]]:
    """(id, Structure or the exception that refused it) for files, folders and CSVs."""
    from matcouple.datasets import ID_COLUMNS, read_table
    from matcouple.structures.io import (
        find_structure_files,
        structure_from_file,
        structure_from_text,
    )

    items: list[tuple[str, object]] = []
    for path in paths:
        if path.is_file() and path.name.endswith((".csv", ".csv.gz")):
            frame = read_table(path)
            id_col = next((c for c in ID_COLUMNS if c in frame.columns), None)
            col = "cif" if "cif" in frame.columns else "poscar"
            if col not in frame.columns:
                raise MatcoupleError(f"{path} has no 'cif' or 'poscar' column")
            for i, rec in enumerate(frame.to_dict("records")):
                mid = str(rec[id_col]) if id_col else f"{path.stem}:{i}"
                try:
                    items.append((mid, structure_from_text(rec[col], col)))
                except MatcoupleError as exc:
                    items.append((mid, exc))
            continue
        for file in find_structure_files([path]):
            try:
                items.append((file.name, structure_from_file(file)))
            except MatcoupleError as exc:
                items.append((file.name, exc))
    return items


def predict(
    paths: list[Path] = typer.Argument(..., help="CIF/POSCAR files, folders or a CSV."),
    output: Path | None = typer.Option(None, "--output", "-o", help="Write a CSV here."),
    mc_samples: int | None = typer.Option(
        None, help="MC-dropout passes per ensemble member (default: settings, 8; 0 = dropout "
                   "off: ~10x faster, less accurate, sigma ranks errors worse)."),
    device: str | None = typer.Option(None, help="cuda or cpu (default: cuda if present)."),
    batch_size: int | None = typer.Option(
        None, help="Structures per forward pass (default: 16 on CPU, 512 on GPU; settings)."),
) -> None:
    """Formation energy and band gap, each with a calibrated sigma, for each structure."""
    from matcouple.surrogate.predict import SurrogatePredictor

    try:
        items = _read_inputs(paths)
        if not items:
            raise MatcoupleError("no structures found in the given paths")
        predictor = SurrogatePredictor.default(device=device, mc_samples=mc_samples)
        rows = predictor.predict(items, batch_size=batch_size)
    except MatcoupleError as exc:
        err.print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(1) from None
    targets = predictor.targets
    memories = (f", {predictor.residual_memories} residual memories"
                if predictor.residual_memories else "")
    table = Table(title=f"Crysformer {predictor.version} ({predictor.mode}{memories}); "
                        "sigma: calibrated 1-sigma")
    table.add_column("id")
    for t in targets:
        table.add_column(t)
    table.add_column("error")
    for r in rows:
        cells = [f"{r.values[t]:.3f} ± {r.sigmas[t]:.3f}" if not r.error else "" for t in
                 targets]
        table.add_row(r.id, *cells, r.error or "")
    console.print(table)
    if output:
        with open(output, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["id", *[x for t in targets for x in (t, f"{t}_sigma")],
                             "model_version", "error"])
            for r in rows:
                vals = [x for t in targets for x in (
                    (f"{r.values[t]:.6g}", f"{r.sigmas[t]:.6g}") if not r.error else ("", ""))]
                writer.writerow([r.id, *vals, predictor.version, r.error or ""])
        console.print(f"wrote {output}")
    if all(r.error for r in rows):
        raise typer.Exit(1)
