"""Load a trained generator and sample crystals from it, in batches on the GPU.

- ab initio: the number of atoms N comes from a p(N) strategy, then (L, F, A) are
  denoised together from pure noise; types are read off as the most likely element the
  model was trained on.
- crystal structure prediction (CSP): the composition is given, so A stays fixed and
  only L and F are denoised.

The reverse process is DiffCSP's predictor-corrector: a Langevin corrector step on F,
then an ancestral DDPM step on L (and A) with a wrapped-normal predictor step on F.
Fewer steps than the training T use a respaced schedule (same alpha_bar / sigma at the
kept times).
"""

from __future__ import annotations

import hashlib
import math
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from matcouple.directive.diffusion import Schedules
from matcouple.directive.model import CrystalDenoiser, DenoiserConfig, fully_connected_edges
from matcouple.directive.train import TrainConfig, pick_device, read_checkpoint
from matcouple.errors import CheckpointError, GenerationError
from matcouple.settings import get_settings


def default_checkpoint() -> Path:
    """``$MATCOUPLE_GENERATOR_CHECKPOINT``, else Settings.generator_checkpoint in the checkout."""
    import os

    env = os.environ.get("MATCOUPLE_GENERATOR_CHECKPOINT")
    if env:
        return Path(env).expanduser().resolve()
    settings = get_settings()
    path = Path(settings.generator_checkpoint)
    return path if path.is_absolute() else settings.root / path


@dataclass
class Generator:
    """A loaded denoiser with what sampling needs to know about its training data."""

    model: CrystalDenoiser
    schedules: Schedules
    train_config: TrainConfig
    max_atoms: int
    size_histogram: list[int]
    elements: list[int]
    version: str
    path: Path
    device: torch.device
    # Largest |lattice entry| (A) a clean cell may have: 1.5 x the training set's.
    lattice_bound: float = 30.0
    data_hash: str = ""

    @property
    def step_lr(self) -> float:
        return self.train_config.step_lr

    def provenance(self) -> dict[str, Any]:
        return {"version": self.version, "checkpoint": self.path.name,
                "datasets": list(self.train_config.datasets),
                "data_hash": self.data_hash}


def load_generator(path: Path | str | None = None, device: str | None = None) -> Generator:
    """Read a checkpoint (release or training file) with ``weights_only=True``."""
    path = Path(path) if path else default_checkpoint()
    payload = read_checkpoint(path)
    dev = pick_device(device)
    model = CrystalDenoiser(DenoiserConfig(**payload["model_config"]))
    weights = payload["ema"] if "ema" in payload else payload["model"]
    try:
        model.load_state_dict({k: v.float() if v.is_floating_point() else v
                               for k, v in weights.items()})
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit the stored model config: {exc}") \
            from exc
    model.to(dev).eval()
    config = TrainConfig.from_dict(payload["train_config"])
    schedules = Schedules.build(config.diffusion_steps, config.sigma_min,
                                config.sigma_max).to(dev)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    return Generator(model=model, schedules=schedules, train_config=config,
                     max_atoms=int(payload["max_atoms"]),
                     size_histogram=list(payload["size_histogram"]),
                     elements=list(payload["elements"]),
                     version=f"{digest}@step{payload.get('step', 0)}", path=path, device=dev,
                     lattice_bound=1.5 * float(payload.get("lattice_abs_max", 20.0)),
                     data_hash=str(payload["data_hash"]))


# ---------------------------------------------------------------- p(N)
class SizeSampler(Protocol):
    name: str

    def sample(self, count: int, generator: torch.Generator) -> torch.Tensor: ...

    def record(self, valid_fraction: float) -> None: ...


@dataclass
class DataSizes:
    """p(N) of the training set (Hoogeboom et al. 2022; paper section 3.2)."""

    histogram: list[int]
    name: str = "data"

    def sample(self, count: int, generator: torch.Generator) -> torch.Tensor:
        weights = torch.tensor(self.histogram, dtype=torch.float64)
        return torch.multinomial(weights, count, replacement=True, generator=generator)

    def record(self, valid_fraction: float) -> None:
        return None


@dataclass
class UniformSizes:
    """N uniform over the sizes the model was trained on (the paper's random p(N))."""

    histogram: list[int]
    name: str = "uniform"

    def sample(self, count: int, generator: torch.Generator) -> torch.Tensor:
        support = torch.tensor([n for n, c in enumerate(self.histogram) if c > 0 and n > 0])
        pick = torch.randint(0, len(support), (count,), generator=generator)
        return support[pick]

    def record(self, valid_fraction: float) -> None:
        return None


@dataclass
class HybridSizes:
    """Data p(N) first; uniform once the valid fraction has saturated (paper Fig. 6b).

    The first ``window`` batches set the reference valid fraction; when the mean of the
    last ``window`` batches falls below ``switch_ratio`` times it, sampling switches to
    uniform for good.
    """

    histogram: list[int]
    switch_ratio: float = 0.75
    window: int = 4
    name: str = "hybrid"
    switched: bool = False
    reference: float | None = None
    recent: deque = field(default_factory=deque)

    @property
    def current(self) -> str:
        return "uniform" if self.switched else "data"

    def sample(self, count: int, generator: torch.Generator) -> torch.Tensor:
        source = UniformSizes(self.histogram) if self.switched else DataSizes(self.histogram)
        return source.sample(count, generator)

    def record(self, valid_fraction: float) -> None:
        if self.switched:
            return
        self.recent.append(valid_fraction)
        if len(self.recent) > self.window:
            self.recent.popleft()
        if len(self.recent) < self.window:
            return
        mean = sum(self.recent) / len(self.recent)
        if self.reference is None:
            self.reference = mean
        elif mean < self.switch_ratio * self.reference:
            self.switched = True


STRATEGIES = ("data", "uniform", "hybrid")


def size_sampler(strategy: str, histogram: list[int]) -> SizeSampler:
    settings = get_settings()
    if strategy == "data":
        return DataSizes(histogram)
    if strategy == "uniform":
        return UniformSizes(histogram)
    if strategy == "hybrid":
        return HybridSizes(histogram, settings.hybrid_switch_ratio, settings.hybrid_window)
    raise GenerationError(f"unknown p(N) strategy {strategy!r}; use one of {STRATEGIES}")


# ---------------------------------------------------------------- compositions
def composition_numbers(formula: str, gen: Generator, formula_units: int = 1) -> list[int]:
    """Atomic numbers of a cell of ``formula`` x ``formula_units``; clear errors if unusable."""
    from pymatgen.core import Composition, Element

    if not isinstance(formula, str) or not formula.strip():
        raise GenerationError("empty composition")
    try:
        composition = Composition(formula) * formula_units
    except Exception as exc:
        raise GenerationError(f"cannot read composition {formula!r}: {exc}") from exc
    numbers: list[int] = []
    for species, amount in composition.items():
        symbol = getattr(species, "symbol", str(species))
        if not Element.is_valid_symbol(symbol):
            raise GenerationError(f"unknown element {symbol!r} in composition {formula!r}")
        if abs(amount - round(amount)) > 1e-6 or amount <= 0:
            raise GenerationError(f"composition {formula!r} needs whole atom counts "
                                  f"({symbol}: {amount})")
        numbers.extend([Element(symbol).Z] * int(round(amount)))
    unseen = sorted({z for z in numbers if z not in set(gen.elements)})
    if unseen:
        names = ", ".join(Element.from_Z(z).symbol for z in unseen)
        raise GenerationError(f"the generator was not trained on element(s) {names}; "
                              "it cannot place them")
    if len(numbers) > gen.max_atoms:
        raise GenerationError(
            f"composition {composition.formula} has {len(numbers)} atoms; this generator "
            f"supports at most {gen.max_atoms} atoms per cell")
    return numbers


# ---------------------------------------------------------------- sampling
@dataclass
class SampledBatch:
    """Raw sampler output on the CPU."""

    lattice: torch.Tensor  # (B, 3, 3)
    frac: torch.Tensor  # (N, 3)
    atomic_numbers: torch.Tensor  # (N,)
    num_atoms: torch.Tensor  # (B,)


def respaced_times(total: int, steps: int) -> list[int]:
    """Descending integer times T..1 used when sampling with ``steps`` <= T steps."""
    steps = max(1, min(steps, total))
    times = torch.linspace(total, 1, steps).round().long().tolist()
    return sorted(set(times), reverse=True)


@torch.inference_mode()
def sample_crystals(
    gen: Generator,
    num_atoms: torch.Tensor,
    atomic_numbers: torch.Tensor | None = None,
    *,
    steps: int | None = None,
    step_lr: float | None = None,
    seed: int = 0,
) -> SampledBatch:
    """Denoise ``len(num_atoms)`` crystals; ``atomic_numbers`` given (N,) means CSP."""
    dev = gen.device
    model = gen.model
    sched = gen.schedules
    steps = steps or get_settings().generation_steps
    step_lr = gen.step_lr if step_lr is None else step_lr
    if int(num_atoms.min()) < 1:
        raise GenerationError("every crystal needs at least one atom")
    if int(num_atoms.max()) > gen.max_atoms:
        raise GenerationError(f"{int(num_atoms.max())} atoms exceeds the generator's "
                              f"limit of {gen.max_atoms}")
    rng = torch.Generator(device=dev).manual_seed(seed)
    n = num_atoms.to(dev)
    b, total = len(n), int(n.sum())
    batch = torch.repeat_interleave(torch.arange(b, device=dev), n)
    n_types = model.config.n_types
    csp = atomic_numbers is not None
    known = torch.full((b,), csp, dtype=torch.bool, device=dev)
    if csp:
        if len(atomic_numbers) != total:
            raise GenerationError("atomic numbers do not add up to the atom counts")
        types = torch.nn.functional.one_hot(atomic_numbers.to(dev) - 1, n_types).float()
    else:
        types = torch.randn(total, n_types, generator=rng, device=dev)
    lattice = torch.randn(b, 3, 3, generator=rng, device=dev)
    frac = torch.rand(total, 3, generator=rng, device=dev)
    edges = fully_connected_edges(n)
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")
    times = respaced_times(sched.steps, steps)

    def run(t_now: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        tt = torch.full((b,), t_now / sched.steps, device=dev)
        with autocast:
            eps_l, score, eps_a = model(lattice, frac, types, tt, batch, n, known, edges)
        return eps_l.float(), score.float(), eps_a.float()

    for i, t_now in enumerate(times):
        t_prev = times[i + 1] if i + 1 < len(times) else 0
        sigma, sigma_prev = float(sched.sigmas[t_now]), float(sched.sigmas[t_prev])
        norm = math.sqrt(float(sched.sigma_norms[t_now]))
        if step_lr > 0:  # Langevin corrector on F
            _, score, _ = run(t_now)
            step = step_lr * (sigma / sched.sigma_min) ** 2
            noise = torch.randn(frac.shape, generator=rng, device=dev)
            frac = torch.remainder(frac + step * score * norm + math.sqrt(2 * step) * noise, 1.0)
        eps_l, score, eps_a = run(t_now)
        ab, ab_prev = float(sched.alpha_bars[t_now]), float(sched.alpha_bars[t_prev])
        alpha = ab / ab_prev
        beta = 1 - alpha
        ddpm_std = math.sqrt(beta * (1 - ab_prev) / (1 - ab)) if t_prev > 0 else 0.0
        # DDPM step written through the clean estimate x0, clipped to the range of the
        # training data: the same step as the eps form, but an error of eps near t = T
        # (where 1/sqrt(alpha) is large) cannot blow the cell up.
        c_x0 = math.sqrt(ab_prev) * beta / (1 - ab)
        c_xt = math.sqrt(alpha) * (1 - ab_prev) / (1 - ab)
        x0 = ((lattice - math.sqrt(1 - ab) * eps_l) / math.sqrt(ab)).clamp(
            -gen.lattice_bound, gen.lattice_bound)
        lattice = c_x0 * x0 + c_xt * lattice + ddpm_std * torch.randn(
            lattice.shape, generator=rng, device=dev)
        if not csp:
            x0 = ((types - math.sqrt(1 - ab) * eps_a) / math.sqrt(ab)).clamp(-1.0, 2.0)
            types = c_x0 * x0 + c_xt * types + ddpm_std * torch.randn(
                types.shape, generator=rng, device=dev)
        step = sigma**2 - sigma_prev**2
        std = math.sqrt(sigma_prev**2 * step / sigma**2)
        noise = torch.randn(frac.shape, generator=rng, device=dev)
        frac = torch.remainder(frac + step * score * norm + std * noise, 1.0)

    if csp:
        numbers = atomic_numbers.cpu()
    else:
        allowed = torch.full((n_types,), float("-inf"), device=dev)
        allowed[torch.tensor(gen.elements, device=dev) - 1] = 0.0
        numbers = (types + allowed).argmax(-1).cpu() + 1
    return SampledBatch(lattice.cpu(), frac.cpu(), numbers, n.cpu())


def to_structures(sampled: SampledBatch) -> list[Any]:
    """pymatgen Structures, or None where the lattice is degenerate (non-finite or flat)."""
    from pymatgen.core import Lattice, Structure

    out: list[Any] = []
    start = 0
    for k, count in enumerate(sampled.num_atoms.tolist()):
        matrix = sampled.lattice[k].double()
        frac = sampled.frac[start:start + count].double()
        numbers = sampled.atomic_numbers[start:start + count].tolist()
        start += count
        finite = bool(torch.isfinite(matrix).all()) and bool(torch.isfinite(frac).all())
        if not finite or abs(float(torch.linalg.det(matrix))) < 1e-3:
            out.append(None)
            continue
        out.append(Structure(Lattice(matrix.numpy()), numbers, frac.numpy()))
    return out
