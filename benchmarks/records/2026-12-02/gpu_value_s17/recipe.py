"""Recipe comparison at equal wall time: recipe.py NAME BATCH LR BUDGET_S OUTDIR [INIT]
Times 30 steps side by side with the other runs, picks the epoch count whose cosine
schedule fits BUDGET_S, then trains with matcouple's train() (dropout 0, wide model)."""
import json, os, sys, time
from pathlib import Path
import torch
from torch_geometric.loader import DataLoader
from matcouple.surrogate.atom_features import atom_feature_table
from matcouple.surrogate.data import load_graphs
from matcouple.surrogate.graph import GraphSpec
from matcouple.surrogate.model import Crysformer, CrysformerConfig
from matcouple.surrogate.train import TrainConfig, export_model, train

T0 = time.monotonic()
name, bs, lr, budget, outdir = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]), Path(sys.argv[5])
init = Path(sys.argv[6]) if len(sys.argv) > 6 else None
WORK = Path("/tmp/gpux"); CACHE = WORK / "cache"; CKPT = WORK / "ckpt"; CKPT.mkdir(parents=True, exist_ok=True)
MODEL = {"dropout": 0.0, "scalars": 144, "vectors": 36, "tensors": 16}
TARGETS = ("formation_energy_per_atom", "band_gap")
DATA = ".gpux/data/mp2018_fe_gap_trainval.csv.gz"
seed = int(os.environ.get("SEED", "0"))
ckpt = CKPT / f"{name}.ckpt.pt"
epochs = int(os.environ.get("EPOCHS", "0"))
if not ckpt.exists() and not epochs:
    gs = load_graphs(Path(DATA), TARGETS, split_column="megnet_split", split="train",
                     spec=GraphSpec(), cache_dir=CACHE, progress=False)
    m = Crysformer(CrysformerConfig(**MODEL, targets=TARGETS), torch.from_numpy(atom_feature_table())).cuda()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-5)
    torch.set_float32_matmul_precision("high")
    loader = DataLoader(gs.graphs, batch_size=bs, shuffle=True, num_workers=3)
    times = []
    for i, b in enumerate(loader):
        torch.cuda.synchronize(); t = time.monotonic()
        b = b.cuda(non_blocking=True)
        p = m(b.z, b.edge_index, b.edge_vec, b.batch, b.num_graphs)
        loss = (p - torch.nan_to_num(b.y)).abs().mean(); opt.zero_grad(); loss.backward(); opt.step()
        torch.cuda.synchronize(); times.append(time.monotonic() - t)
        if i == 39: break
    del m, opt, loader
    t_step = sorted(times[10:])[len(times[10:]) // 2] * 1.15  # + data loading, val
    steps = -(-len(gs.graphs) // bs)
    left = budget - (time.monotonic() - T0) - 20
    epochs = max(1, int(left / (steps * t_step)))
    print(f"{name}: {t_step*1000:.0f} ms/step at batch {bs}, {steps} steps/epoch -> {epochs} epochs", flush=True)
cfg = TrainConfig(data=DATA, targets=TARGETS, split_column="megnet_split", epochs=epochs,
                  batch_size=bs, lr=lr, warmup_epochs=min(1.0, epochs / 10), seed=seed, amp=False, model=dict(MODEL),
                  fused_tp=os.environ.get("FUSED") == "1")
left_min = (budget - (time.monotonic() - T0)) / 60
state = train(cfg, ckpt, minutes=left_min, device="cuda", cache_dir=CACHE, workers=14,
              progress=False, init_from=init)
info = export_model(ckpt, outdir / f"{name}.pt")
json.dump({"name": name, "batch": bs, "lr": lr, "epochs_planned": state["train_config"]["epochs"],
           "epoch": state["epoch"], "history": state["history"], "best": info["val_mae"],
           "wall_s": time.monotonic() - T0}, open(outdir / f"{name}.json", "w"), indent=1)
for h in state["history"]:
    print(f"{name} ep {h['epoch']:2d} {h['train_s']:5.1f}s L1 {h['train_loss']:.4f} "
          f"Ef {h['val_mae_formation_energy_per_atom']:.4f} gap {h['val_mae_band_gap']:.4f}", flush=True)
