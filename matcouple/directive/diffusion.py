"""Noise schedules and training targets of the joint diffusion over (L, F, A).

- Lattice L and one-hot atom types A: DDPM with the cosine schedule of Nichol & Dhariwal
  (paper eqs. 10-12), the network predicts the added noise.
- Fractional coordinates F live on the torus [0, 1)^3: noise is a wrapped normal whose
  width grows exponentially with t, and the network predicts its score (DiffCSP/EquiCSP),
  normalised by the score's expected magnitude so every t weighs alike.
- Loss: lambda_L L_L + lambda_F L_F + lambda_A L_A (eq. 13); lambda_A = 0 for crystals
  whose composition is given (CSP), a larger value for ab initio generation.

Time index t runs 1..T; index 0 is the clean crystal.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

N_IMAGES = 10  # wrapped-normal terms k = -10..10: exact to float precision for sigma <= 1


def cosine_alpha_bars(steps: int, s: float = 0.008) -> torch.Tensor:
    """alpha_bar_0..alpha_bar_T of the cosine schedule (alpha_bar_0 = 1), betas clipped at 0.999."""
    x = torch.linspace(0, steps, steps + 1, dtype=torch.float64)
    f = torch.cos(((x / steps) + s) / (1 + s) * math.pi / 2) ** 2
    alpha_bars = f / f[0]
    betas = (1 - alpha_bars[1:] / alpha_bars[:-1]).clamp(max=0.999)
    return torch.cat([torch.ones(1, dtype=torch.float64), torch.cumprod(1 - betas, 0)])


def wrapped_normal_log_density(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """log of the wrapped normal density on [0, 1) with width sigma, at displacement x."""
    k = torch.arange(-N_IMAGES, N_IMAGES + 1, dtype=x.dtype, device=x.device)
    z = (x.unsqueeze(-1) + k) / sigma.unsqueeze(-1)
    return torch.logsumexp(-0.5 * z**2, dim=-1) - torch.log(sigma * math.sqrt(2 * math.pi))


def wrapped_normal_score(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """d/dx log p_wn(x; sigma): the exact score, stable through a softmax over images."""
    k = torch.arange(-N_IMAGES, N_IMAGES + 1, dtype=x.dtype, device=x.device)
    shifted = x.unsqueeze(-1) + k
    s = sigma.unsqueeze(-1)
    weights = torch.softmax(-0.5 * (shifted / s) ** 2, dim=-1)
    return -(weights * shifted).sum(-1) / sigma**2


def score_norm(sigma: torch.Tensor, points: int = 801, chunk: int = 100) -> torch.Tensor:
    """E[score^2] under the wrapped normal, by quadrature (per sigma).

    The grid spans +-8 sigma (at most one period), so narrow and wide sigmas are resolved
    alike; for small sigma the value tends to 1/sigma^2, the unwrapped normal's.
    """
    flat = sigma.to(torch.float64).flatten()
    result = 1.0 / flat**2  # exact to 1e-20 where the images are > 10 sigma away
    wide = torch.nonzero(flat > 0.1).flatten()
    u = torch.linspace(-1.0, 1.0, points, dtype=torch.float64)
    for start in range(0, len(wide), chunk):
        rows = wide[start:start + chunk]
        s = flat[rows, None]
        x = torch.clamp(8 * s, max=0.5) * u[None, :]
        sv = s.expand_as(x)
        p = torch.exp(wrapped_normal_log_density(x, sv))
        score = wrapped_normal_score(x, sv)
        result[rows] = torch.trapezoid(p * score**2, x, dim=-1) / torch.trapezoid(p, x, dim=-1)
    return result.reshape(sigma.shape)


@dataclass
class Schedules:
    """All per-timestep constants; built once per model and moved with it."""

    steps: int
    alpha_bars: torch.Tensor  # (T+1,)
    sigmas: torch.Tensor  # (T+1,), sigmas[0] = 0
    sigma_norms: torch.Tensor  # (T+1,), E[score^2] at each sigma (1 at t=0, unused)
    sigma_min: float
    sigma_max: float

    @classmethod
    def build(cls, steps: int = 1000, sigma_min: float = 0.005,
              sigma_max: float = 0.5) -> Schedules:
        sig = torch.exp(torch.linspace(math.log(sigma_min), math.log(sigma_max), steps,
                                       dtype=torch.float64))
        sigmas = torch.cat([torch.zeros(1, dtype=torch.float64), sig])
        norms = torch.cat([torch.ones(1, dtype=torch.float64), score_norm(sig)])
        return cls(steps=steps, alpha_bars=cosine_alpha_bars(steps), sigmas=sigmas,
                   sigma_norms=norms, sigma_min=sigma_min, sigma_max=sigma_max)

    def to(self, device: torch.device | str) -> Schedules:
        return Schedules(self.steps, self.alpha_bars.to(device), self.sigmas.to(device),
                         self.sigma_norms.to(device), self.sigma_min, self.sigma_max)

    def betas(self) -> torch.Tensor:
        return 1 - self.alpha_bars[1:] / self.alpha_bars[:-1]


@dataclass
class NoisedCrystals:
    """A batch after the forward process, with the targets the network must predict."""

    lattice: torch.Tensor  # (B, 3, 3) L_t
    frac: torch.Tensor  # (N, 3) F_t in [0, 1)
    types: torch.Tensor  # (N, n_types) A_t, or the clean one-hot where the type is given
    eps_lattice: torch.Tensor  # (B, 3, 3)
    score_frac: torch.Tensor  # (N, 3) normalised score target
    eps_types: torch.Tensor  # (N, n_types)


def add_noise(
    schedules: Schedules,
    t: torch.Tensor,
    lattice: torch.Tensor,
    frac: torch.Tensor,
    onehot: torch.Tensor,
    batch: torch.Tensor,
    types_known: torch.Tensor,
    generator: torch.Generator | None = None,
) -> NoisedCrystals:
    """Sample q(M_t | M_0) for crystals at integer times ``t`` (B,) in 1..T."""
    ab = schedules.alpha_bars[t].to(lattice.dtype)
    eps_l = torch.randn(lattice.shape, generator=generator, device=lattice.device)
    lattice_t = ab.sqrt()[:, None, None] * lattice + (1 - ab).sqrt()[:, None, None] * eps_l

    sigma = schedules.sigmas[t].to(frac.dtype)[batch][:, None]
    eps_f = torch.randn(frac.shape, generator=generator, device=frac.device)
    frac_t = torch.remainder(frac + sigma * eps_f, 1.0)
    norm = schedules.sigma_norms[t].to(frac.dtype)[batch][:, None]
    score = wrapped_normal_score(sigma * eps_f, sigma.expand_as(eps_f)) / norm.sqrt()

    eps_a = torch.randn(onehot.shape, generator=generator, device=onehot.device)
    ab_atom = ab[batch][:, None]
    types_t = ab_atom.sqrt() * onehot + (1 - ab_atom).sqrt() * eps_a
    known = types_known[batch][:, None]
    types_t = torch.where(known, onehot, types_t)
    return NoisedCrystals(lattice_t, frac_t, types_t, eps_l, score, eps_a)


@dataclass(frozen=True)
class LossWeights:
    """lambda_L, lambda_F, lambda_A of eq. 13."""

    lattice: float = 1.0
    frac: float = 1.0
    types: float = 20.0


def diffusion_loss(
    pred_lattice: torch.Tensor,
    pred_frac: torch.Tensor,
    pred_types: torch.Tensor,
    noised: NoisedCrystals,
    batch: torch.Tensor,
    types_known: torch.Tensor,
    weights: LossWeights,
) -> dict[str, torch.Tensor]:
    """Eq. 13; the type term only counts atoms of crystals generated ab initio."""
    loss_l = ((pred_lattice.float() - noised.eps_lattice) ** 2).mean()
    loss_f = ((pred_frac.float() - noised.score_frac) ** 2).mean()
    free = (~types_known[batch]).float()  # masked mean: no host sync on the GPU
    per_atom = ((pred_types.float() - noised.eps_types) ** 2).mean(-1)
    loss_a = (per_atom * free).sum() / free.sum().clamp(min=1.0)
    total = weights.lattice * loss_l + weights.frac * loss_f + weights.types * loss_a
    return {"loss": total, "lattice": loss_l.detach(), "frac": loss_f.detach(),
            "types": loss_a.detach()}
