"""One Crysformer training step (forward + backward), e3nn's tensor products vs the fused path.

Same model, same weights, same batch; the only difference is ``set_fused(True,
training=True)`` (messages and values through FusedTPLinear with autograd). Default: the
wide value-model configuration (matcouple/surrogate/models/model_card.json,
``value_model_config``) on a batch of real MP 2018 crystals (random rows of the training
split; random cubic crystals when the data file is absent). Prints ms/step per mode and
writes JSON to benchmarks/results/. Modes are timed in alternating rounds (the median step
of each mode over all rounds is reported) so drift of the machine hits both alike.

    python benchmarks/train_step_fused.py --batch 32 --threads 2        # CPU
    python benchmarks/train_step_fused.py --device cuda --batch 256     # GPU
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from matcouple.settings import get_settings  # noqa: E402
from matcouple.surrogate.atom_features import atom_feature_table  # noqa: E402
from matcouple.surrogate.model import Crysformer, CrysformerConfig  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
CARD = Path(__file__).resolve().parents[1] / "matcouple/surrogate/models/model_card.json"
WIDE = {"scalars": 144, "vectors": 36, "tensors": 16, "layers": 4, "dropout": 0.0}


def model_config() -> CrysformerConfig:
    """The shipped value model's configuration (the wide one), else WIDE."""
    try:
        cfg = json.loads(CARD.read_text())["value_model_config"]
        cfg["targets"] = tuple(cfg["targets"])
        return CrysformerConfig(**cfg)
    except (OSError, KeyError, TypeError):
        return CrysformerConfig(**WIDE)


def crystals(path: Path, n: int, seed: int) -> tuple[list, str]:
    """n structures: random rows of the MEGNet training split, else random cubic cells."""
    from pymatgen.core import Lattice, Structure

    if path.exists():
        import pandas as pd

        from matcouple.structures.io import structure_from_text

        rows = pd.read_csv(path, keep_default_na=False, na_values=[""],
                           usecols=["material_id", "megnet_split", "cif"])
        rows = rows[rows["megnet_split"] == "train"].sample(n=n, random_state=seed)
        return [structure_from_text(c, "cif") for c in rows["cif"]], str(path)
    rng = np.random.default_rng(seed)
    elements = ["Li", "O", "Mg", "Si", "Fe", "Ga", "N", "Ti", "Cl", "Na"]
    out = [Structure(Lattice.cubic(3.5 + rng.random() * 3), list(rng.choice(elements, k)),
                     rng.random((k, 3))) for k in rng.integers(2, 21, n)]
    return out, "random cubic cells"


def batch_inputs(structures: list, device: torch.device) -> tuple:
    """(z, edge_index, edge_vec, batch, num_graphs) of one batch, on ``device``."""
    from torch_geometric.data import Batch, Data

    from matcouple.surrogate.graph import structure_to_graph

    data = [Data(num_nodes=len(s), **structure_to_graph(s)) for s in structures]
    b = Batch.from_data_list(data).to(device)
    return b.z, b.edge_index, b.edge_vec, b.batch, b.num_graphs


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step(model: Crysformer, inputs: tuple, target: torch.Tensor, backward: bool,
         amp: bool) -> torch.Tensor:
    """One forward (+ backward) pass; returns the prediction."""
    device = target.device
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        pred = model(*inputs)
    if backward:
        model.zero_grad(set_to_none=True)
        (pred.float() - target).abs().mean().backward()
    return pred


def saved_for_backward(model: Crysformer, inputs: tuple, amp: bool) -> int:
    """Bytes of the distinct storages autograd keeps for the backward of one forward (the
    activation memory of a step, comparable on the CPU where no peak counter exists)."""
    seen: set[int] = set()
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
        return t

    device = inputs[0].device
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        model(*inputs)
    return total


def main() -> None:
    settings = get_settings()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--data", type=Path, default=settings.data_dir / settings.datasets["mp2018"])
    p.add_argument("--batch", type=int, default=32, help="crystals per step")
    p.add_argument("--rounds", type=int, default=5, help="alternating timing rounds")
    p.add_argument("--steps", type=int, default=3, help="timed steps per mode and round")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2, help="CPU threads (torch)")
    p.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA), as --amp trains")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS / "train_step_fused.json")
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # as training does (TF32)
    cfg = model_config()
    structures, source = crystals(args.data, args.batch, args.seed)
    inputs = batch_inputs(structures, device)
    torch.manual_seed(args.seed)
    base = Crysformer(cfg, torch.from_numpy(atom_feature_table())).to(device).train()
    models = {"e3nn": base, "fused": copy.deepcopy(base).set_fused(True, training=True)}
    target = torch.randn(inputs[-1], len(cfg.targets), device=device)
    amp = args.amp and device.type == "cuda"

    # same numbers first (float32: agreement to rounding), then timing
    preds, grads = {}, {}
    for name, m in models.items():
        preds[name] = step(m, inputs, target, True, amp).detach().float()
        grads[name] = torch.cat([q.grad.flatten() for q in m.parameters()])
    diff_out = float((preds["fused"] - preds["e3nn"]).abs().max())
    diff_grad = float((grads["fused"] - grads["e3nn"]).abs().max()
                      / grads["e3nn"].abs().max())

    saved = {n: saved_for_backward(m, inputs, amp) / 2**20 for n, m in models.items()}
    times: dict[str, dict[str, list[float]]] = {n: {"fwd": [], "fwd_bwd": []} for n in models}
    peak: dict[str, int] = {}
    for m in models.values():
        for _ in range(args.warmup):
            step(m, inputs, target, True, amp)
    for _ in range(args.rounds):
        for name, m in models.items():
            for kind, backward in (("fwd", False), ("fwd_bwd", True)):
                for _ in range(args.steps):
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(device)
                    sync(device)
                    t0 = time.perf_counter()
                    with torch.set_grad_enabled(True):
                        step(m, inputs, target, backward, amp)
                    sync(device)
                    times[name][kind].append(1e3 * (time.perf_counter() - t0))
                    if device.type == "cuda" and backward:
                        peak[name] = max(peak.get(name, 0),
                                         torch.cuda.max_memory_allocated(device))
    ms = {n: {k: statistics.median(v) for k, v in t.items()} for n, t in times.items()}
    report = {
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "threads": args.threads, "amp": amp, "model_config": cfg.as_dict(),
        "parameters": sum(q.numel() for q in base.parameters()),
        "batch": {"crystals": inputs[-1], "atoms": int(inputs[0].shape[0]),
                  "edges": int(inputs[1].shape[1]), "source": source},
        "ms_per_step_median": ms, "ms_per_step_all": times,
        "speedup_fwd_bwd": ms["e3nn"]["fwd_bwd"] / ms["fused"]["fwd_bwd"],
        "speedup_fwd": ms["e3nn"]["fwd"] / ms["fused"]["fwd"],
        "saved_for_backward_mib": saved,
        "max_abs_diff_output": diff_out, "max_rel_diff_grad": diff_grad,
        **({"peak_memory_mib": {n: v / 2**20 for n, v in peak.items()}} if peak else {}),
        "torch": torch.__version__,
    }
    b = report["batch"]
    print(f"{report['device']} ({args.threads} threads), {report['parameters']} params, "
          f"batch {b['crystals']} crystals / {b['atoms']} atoms / {b['edges']} edges")
    for n in models:
        extra = f", saved for backward {saved[n]:.0f} MiB"
        extra += f", peak {report['peak_memory_mib'][n]:.0f} MiB" if peak else ""
        print(f"  {n:6s} forward {ms[n]['fwd']:8.1f} ms   forward+backward "
              f"{ms[n]['fwd_bwd']:8.1f} ms{extra}")
    print(f"  speed-up fused: forward {report['speedup_fwd']:.2f}x, forward+backward "
          f"{report['speedup_fwd_bwd']:.2f}x; |out diff| {diff_out:.1e}, "
          f"grad rel diff {diff_grad:.1e}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
