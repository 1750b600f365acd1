"""Write the model card of a generator checkpoint from what the checkpoint records.

``python -m matcouple.directive.card models/generator/generator.pt
[--benchmark benchmarks/results/generator.json]`` writes ``generator.md`` beside the
checkpoint: architecture, size, training data and hash, recipe, training time, and the
measured benchmark figures when a benchmark JSON is given.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from matcouple.directive.train import read_checkpoint


def _weights_count(weights: dict) -> int:
    return sum(v.numel() for v in weights.values())


def model_card(checkpoint: Path, benchmark: Path | None = None, note: str | None = None) -> str:
    payload = read_checkpoint(checkpoint)
    model = payload["model_config"]
    train = payload["train_config"]
    weights = payload.get("ema") or payload["model"]
    hist = payload["size_histogram"]
    lines = [
        f"# Generator model card: `{Path(checkpoint).name}`",
        "",
        "Periodic E(3)-equivariant diffusion model over lattice L, fractional coordinates F",
        "and atom types A (DiffCSP/EquiCSP-style; paper section 3.2, eqs. 10-13), code in",
        "`matcouple/directive/`.",
        "",
        "| | |",
        "|---|---|",
        f"| network | {model['layers']} message-passing layers, hidden {model['hidden']}, "
        f"{model['frequencies']} Fourier frequencies; {_weights_count(weights):,} parameters |",
        f"| file | {Path(checkpoint).stat().st_size / 1e6:.1f} MB, "
        "`torch.load(weights_only=True)` |",
        f"| training data | {', '.join(train['datasets'])} train split, <= "
        f"{payload['max_atoms']} atoms; {payload.get('n_train', '?')} crystals, "
        f"{len(payload['elements'])} elements; data hash `{payload['data_hash']}` |",
        f"| atoms per cell seen | {[n for n, c in enumerate(hist) if c]} |",
        f"| diffusion | T={train['diffusion_steps']}; cosine DDPM on L and A; wrapped normal on "
        f"F, sigma {train['sigma_min']}..{train['sigma_max']} |",
        f"| loss weights (eq. 13) | lambda_L={train['loss_lattice']}, "
        f"lambda_F={train['loss_frac']}, lambda_A={train['loss_types']} (0 for CSP crystals) |",
        f"| tasks | CSP share {train['csp_fraction']:.2f} of training crystals (composition "
        "given), the rest ab initio |",
        f"| recipe | AdamW lr {train['lr']} (cosine to {train['min_lr']} over "
        f"{train['budget_minutes']} min), batch {train['batch_size']}, EMA "
        f"{train['ema_decay']}, seed {train['seed']} |",
        f"| trained | {payload.get('step', '?')} steps, "
        f"{payload.get('elapsed_s', 0) / 60:.1f} min of training time |",
        f"| sampling | predictor-corrector, corrector step_lr {train['step_lr']} |",
    ]
    if payload.get("device"):
        lines.append(f"| trained on | {payload['device']} |")
    if note:
        lines += ["", note]
    if benchmark and Path(benchmark).exists():
        results = json.loads(Path(benchmark).read_text())
        lines += ["", f"## Measured ({results.get('device', '?')})", ""]
        for key in ("csp_perov5", "csp_mp2018"):
            if key in results:
                r = results[key]
                lines.append(f"- CSP {r['dataset']}: match rate {r['match_rate_percent']}%, "
                             f"RMSE {r['rmse']} ({r['n']} crystals, {r['steps']} steps, "
                             f"model {r['model_version']})")
        if "throughput" in results:
            t = results["throughput"]
            lines.append(f"- throughput: {t['generated_per_hour_sampler']:,} generated/h "
                         f"(sampler), {t['valid_per_hour']:,} valid/h after all filters")
    lines += ["", "Limitations: trained for minutes, not days; elements and cell sizes outside",
              "the training data are refused at generation time.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--benchmark", type=Path, default=None)
    parser.add_argument("--note", default=None, help="a sentence to add (how it was made)")
    args = parser.parse_args(argv)
    out = args.checkpoint.with_suffix(".md")
    out.write_text(model_card(args.checkpoint, args.benchmark, args.note))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
