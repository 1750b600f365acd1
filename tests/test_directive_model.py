"""The denoiser's symmetries and the diffusion schedules, on CPU with a tiny network."""

from __future__ import annotations

import math

import pytest
import torch

from matcouple.directive.diffusion import (
    Schedules,
    add_noise,
    cosine_alpha_bars,
    score_norm,
    wrapped_normal_log_density,
    wrapped_normal_score,
)
from matcouple.directive.model import CrystalDenoiser, DenoiserConfig, fully_connected_edges

torch.set_num_threads(1)  # tiny tensors: threads only contend on a shared CI machine


@pytest.fixture(scope="module")
def model() -> CrystalDenoiser:
    torch.manual_seed(0)
    net = CrystalDenoiser(DenoiserConfig(hidden=32, layers=2, frequencies=8, time_dim=16))
    return net.double().eval()


def _crystals(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    num_atoms = torch.tensor([3, 5])
    lattice = torch.randn(2, 3, 3, generator=g, dtype=torch.float64) + 4 * torch.eye(3)
    frac = torch.rand(8, 3, generator=g, dtype=torch.float64)
    types = torch.randn(8, 100, generator=g, dtype=torch.float64)
    batch = torch.repeat_interleave(torch.arange(2), num_atoms)
    t = torch.tensor([0.3, 0.8], dtype=torch.float64)
    known = torch.tensor([False, True])
    return lattice, frac, types, t, batch, num_atoms, known


def test_edges_connect_all_pairs_within_each_crystal():
    src, dst = fully_connected_edges(torch.tensor([3, 1, 2]))
    pairs = set(zip(src.tolist(), dst.tolist(), strict=True))
    assert pairs == {(0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1), (4, 5), (5, 4)}


def test_permutation_equivariance(model):
    lattice, frac, types, t, batch, n, known = _crystals()
    perm = torch.cat([torch.tensor([2, 0, 1]), 3 + torch.randperm(5)])
    out = model(lattice, frac, types, t, batch, n, known)
    out_p = model(lattice, frac[perm], types[perm], t, batch, n, known)
    assert torch.allclose(out[0], out_p[0], atol=1e-10)  # lattice: invariant
    assert torch.allclose(out[1][perm], out_p[1], atol=1e-10)  # per atom: permuted
    assert torch.allclose(out[2][perm], out_p[2], atol=1e-10)


def test_periodic_translation_invariance(model):
    lattice, frac, types, t, batch, n, known = _crystals()
    shift = torch.tensor([[0.37, -0.21, 0.9], [0.5, 0.5, 0.25]], dtype=torch.float64)[batch]
    moved = torch.remainder(frac + shift, 1.0)
    wrapped = frac + torch.randint(-2, 3, frac.shape).double()  # whole lattice vectors
    out = model(lattice, frac, types, t, batch, n, known)
    for other in (moved, wrapped):
        out_m = model(lattice, other, types, t, batch, n, known)
        for a, b in zip(out, out_m, strict=True):
            assert torch.allclose(a, b, atol=1e-9)


def test_rotation_of_the_cartesian_frame(model):
    lattice, frac, types, t, batch, n, known = _crystals()
    q, _ = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64))  # rotation or reflection
    rotated = lattice @ q.T  # each lattice vector (row) rotated
    eps_l, score, eps_a = model(lattice, frac, types, t, batch, n, known)
    eps_lr, score_r, eps_ar = model(rotated, frac, types, t, batch, n, known)
    assert torch.allclose(eps_l @ q.T, eps_lr, atol=1e-9)  # lattice output rotates along
    assert torch.allclose(score, score_r, atol=1e-9)  # fractional score: frame-free
    assert torch.allclose(eps_a, eps_ar, atol=1e-9)


def test_wrapped_normal_score_is_the_derivative_of_its_log_density():
    x = torch.linspace(-0.49, 0.49, 41, dtype=torch.float64)
    for s in (0.01, 0.1, 0.4, 1.0):
        sigma = torch.full_like(x, s)
        h = 1e-6
        fd = (wrapped_normal_log_density(x + h, sigma)
              - wrapped_normal_log_density(x - h, sigma)) / (2 * h)
        assert torch.allclose(wrapped_normal_score(x, sigma), fd, rtol=1e-5, atol=1e-5)
    # periodic: the score at x and x + 1 agree; the density integrates to one
    sigma = torch.full_like(x, 0.3)
    assert torch.allclose(wrapped_normal_score(x, sigma), wrapped_normal_score(x + 1, sigma))
    grid = torch.linspace(0, 1, 20001, dtype=torch.float64)
    density = torch.exp(wrapped_normal_log_density(grid, torch.full_like(grid, 0.3)))
    assert float(torch.trapezoid(density, grid)) == pytest.approx(1.0, abs=1e-6)


def test_score_norm_matches_monte_carlo():
    g = torch.Generator().manual_seed(0)
    for s in (0.05, 0.3, 0.5):
        eps = torch.randn(200_000, generator=g, dtype=torch.float64) * s
        mc = (wrapped_normal_score(eps, torch.full_like(eps, s)) ** 2).mean()
        assert float(score_norm(torch.tensor([s], dtype=torch.float64))[0]) == pytest.approx(
            float(mc), rel=0.02)


def test_noise_at_t0_and_T():
    sched = Schedules.build(1000)
    ab = cosine_alpha_bars(1000)
    assert float(ab[0]) == 1.0 and float(ab[-1]) < 1e-4  # clean at 0, pure noise at T
    assert torch.all(ab[1:] < ab[:-1])
    assert float(sched.sigmas[0]) == 0.0
    assert float(sched.sigmas[1]) == pytest.approx(0.005)
    assert float(sched.sigmas[-1]) == pytest.approx(0.5)
    # At t=1 the crystal is barely moved; at t=T the lattice is N(0, I) and F uniform.
    torch.manual_seed(0)
    n_cr = 2000
    lattice = torch.eye(3).repeat(n_cr, 1, 1) * 5
    frac = torch.full((n_cr, 3), 0.25)
    onehot = torch.nn.functional.one_hot(torch.full((n_cr,), 7), 100).float()
    batch = torch.arange(n_cr)
    known = torch.zeros(n_cr, dtype=torch.bool)
    early = add_noise(sched, torch.ones(n_cr, dtype=torch.long), lattice, frac, onehot, batch,
                      known)
    assert float((early.lattice - lattice).abs().max()) < 0.5
    assert float((early.frac - frac).abs().max()) < 0.05
    late = add_noise(sched, torch.full((n_cr,), 1000), lattice, frac, onehot, batch, known)
    assert float(late.lattice.mean()) == pytest.approx(0.0, abs=0.05)
    assert float(late.lattice.std()) == pytest.approx(1.0, abs=0.05)
    hist = torch.histc(late.frac.flatten(), bins=10, min=0, max=1) / late.frac.numel()
    assert float((hist - 0.1).abs().max()) < 0.02  # wrapped sigma=0.5: ~uniform on the torus
    assert float(late.types.std()) == pytest.approx(1.0, abs=0.05)
    given = add_noise(sched, torch.full((n_cr,), 1000), lattice, frac, onehot, batch,
                      torch.ones(n_cr, dtype=torch.bool))
    assert torch.equal(given.types, onehot)  # CSP: types stay as given
    assert math.isfinite(float(late.score_frac.abs().max()))


class PointMassDenoiser(torch.nn.Module):
    """The exact denoiser of a data set holding one crystal (L0, F0): noise and score known."""

    def __init__(self, sched: Schedules, lattice: torch.Tensor, frac: torch.Tensor) -> None:
        super().__init__()
        self.sched, self.lattice0, self.frac0 = sched, lattice, frac
        self.config = DenoiserConfig()

    def forward(self, lattice, frac, types, t, batch, num_atoms, known, edges=None):
        ti = (t * self.sched.steps).round().long()
        ab = self.sched.alpha_bars[ti].float()[:, None, None]
        eps = (lattice - ab.sqrt() * self.lattice0) / (1 - ab).sqrt()
        sigma = self.sched.sigmas[ti].float()[batch][:, None].expand_as(frac)
        norm = self.sched.sigma_norms[ti].float()[batch][:, None]
        score = wrapped_normal_score(frac - self.frac0, sigma) / norm.sqrt()
        return eps, score, torch.zeros(len(frac), 100)


@pytest.mark.parametrize(("steps", "step_lr"), [(1000, 1e-5), (40, 0.0)])
def test_reverse_process_recovers_a_point_mass(steps, step_lr):
    """With the exact noise and score, the sampler must land on the one crystal there is."""
    from pathlib import Path

    from matcouple.directive.sample import Generator, sample_crystals
    from matcouple.directive.train import TrainConfig

    sched = Schedules.build(1000)
    lattice0 = torch.tensor([[4.0, 0, 0], [0.5, 5, 0], [0, 0.3, 6]])
    frac0 = torch.tensor([0.1, 0.7, 0.3])
    gen = Generator(model=PointMassDenoiser(sched, lattice0, frac0), schedules=sched,
                    train_config=TrainConfig(), max_atoms=20, size_histogram=[0] * 21,
                    elements=list(range(1, 101)), version="exact", path=Path("exact"),
                    device=torch.device("cpu"))
    out = sample_crystals(gen, torch.tensor([1, 1, 1]), torch.tensor([14, 14, 14]),
                          steps=steps, step_lr=step_lr, seed=1)
    assert float((out.lattice - lattice0).abs().max()) < 1e-3
    wrapped = torch.remainder(out.frac - frac0 + 0.5, 1.0) - 0.5
    assert float(wrapped.abs().max()) < 1e-3
