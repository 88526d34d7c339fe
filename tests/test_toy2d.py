"""Tests for neuralode.data.toy2d."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from neuralode.data.toy2d import (
    POTENTIALS,
    TOY_DATASETS,
    potential_energy,
    sample_toy2d,
    toy2d_log_density,
)

N = 20_000


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def samples() -> dict[str, torch.Tensor]:
    return {name: sample_toy2d(name, N, _gen(123), torch.float64) for name in TOY_DATASETS}


def _grid(lo: float, hi: float, m: int, dtype=torch.float64):
    """Midpoint grid on [lo, hi]^2: points (m, m, 2) and cell area."""
    h = (hi - lo) / m
    c = lo + h * (torch.arange(m, dtype=dtype) + 0.5)
    xx, yy = torch.meshgrid(c, c, indexing="ij")
    return torch.stack((xx, yy), dim=-1), h * h


# --------------------------------------------------------------------- basics


def test_dataset_names():
    assert set(TOY_DATASETS) == {
        "moons",
        "circles",
        "rings",
        "8gaussians",
        "pinwheel",
        "checkerboard",
        "2spirals",
    }
    assert POTENTIALS == ("u1", "u2", "u3", "u4")


@pytest.mark.parametrize("name", TOY_DATASETS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shape_dtype_finite(name, dtype):
    x = sample_toy2d(name, 257, _gen(0), dtype)
    assert x.shape == (257, 2)
    assert x.dtype == dtype
    assert torch.isfinite(x).all()


def test_default_dtype_and_global_rng():
    torch.manual_seed(5)
    a = sample_toy2d("moons", 10)
    torch.manual_seed(5)
    b = sample_toy2d("moons", 10)
    assert a.dtype == torch.float32
    assert torch.equal(a, b)


@pytest.mark.parametrize("name", TOY_DATASETS)
def test_deterministic_and_seed_dependent(name):
    a = sample_toy2d(name, 500, _gen(7))
    b = sample_toy2d(name, 500, _gen(7))
    c = sample_toy2d(name, 500, _gen(8))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_dtype_does_not_change_points():
    a = sample_toy2d("pinwheel", 100, _gen(3), torch.float32)
    b = sample_toy2d("pinwheel", 100, _gen(3), torch.float64)
    torch.testing.assert_close(a, b.float())


def test_numpy_global_rng_untouched():
    np.random.seed(0)
    state = np.random.get_state()[1].copy()
    for name in TOY_DATASETS:
        sample_toy2d(name, 50, _gen(0))
    assert np.array_equal(np.random.get_state()[1], state)


@pytest.mark.parametrize("name", TOY_DATASETS)
def test_standard_spread(name, samples):
    x = samples[name]
    inside = (x.abs() <= 4.0).all(dim=1).double().mean()
    assert inside > 0.995
    assert x.std(dim=0).min() > 0.5
    assert x.mean(dim=0).abs().max() < 0.35


# ---------------------------------------------------------- per-dataset stats


def test_eight_gaussians_centres(samples):
    x = samples["8gaussians"]
    r = 4.0 / math.sqrt(2.0)
    ang = torch.arange(8, dtype=torch.float64) * math.pi / 4
    centres = r * torch.stack((torch.cos(ang), torch.sin(ang)), dim=1)
    nearest = torch.cdist(x, centres).argmin(dim=1)
    for k in range(8):
        pts = x[nearest == k]
        assert abs(len(pts) / N - 1 / 8) < 0.015
        assert torch.linalg.norm(pts.mean(0) - centres[k]) < 0.05
        std = torch.full((2,), 0.5 / math.sqrt(2), dtype=torch.float64)
        assert torch.allclose(pts.std(0), std, atol=0.03)


def test_checkerboard_squares_alternate(samples):
    x = samples["checkerboard"]
    assert ((x >= -4) & (x < 4)).all()
    cells = torch.floor(x / 2.0).long() + 2  # indices 0..3
    counts = torch.zeros(4, 4)
    for i in range(4):
        for j in range(4):
            counts[i, j] = ((cells[:, 0] == i) & (cells[:, 1] == j)).sum()
    parity = (torch.arange(4)[:, None] + torch.arange(4)[None, :]) % 2
    assert (counts[parity == 1] == 0).all()  # empty squares
    occupied = counts[parity == 0] / N
    assert torch.allclose(occupied, torch.full_like(occupied, 1 / 8), atol=0.015)
    # neighbouring squares alternate
    assert (counts[0, 0] > 0) and counts[0, 1] == 0 and counts[1, 0] == 0 and counts[1, 1] > 0


def test_moons_radii(samples):
    x = samples["moons"]
    c_upper = torch.tensor([-1.0, -0.2], dtype=torch.float64)
    c_lower = torch.tensor([1.0, 0.8], dtype=torch.float64)
    d_upper = (torch.linalg.norm(x - c_upper, dim=1) - 2.0).abs()
    d_lower = (torch.linalg.norm(x - c_lower, dim=1) - 2.0).abs()
    assert torch.minimum(d_upper, d_lower).mean() < 0.2
    torch.testing.assert_close(
        x.mean(0), torch.tensor([0.0, 0.3], dtype=torch.float64), atol=0.05, rtol=0
    )
    # the two arcs are upper/lower halves: far left is only the upper moon, far right the lower
    assert (x[x[:, 0] < -2.5, 1] > -0.2 - 0.6).all()
    assert (x[x[:, 0] > 2.5, 1] < 0.8 + 0.6).all()


def test_circles_radii(samples):
    r = torch.linalg.norm(samples["circles"], dim=1)
    outer = r > 2.25
    assert abs(outer.double().mean().item() - 0.5) < 0.03
    assert abs(r[outer].mean().item() - 3.0) < 0.05
    assert abs(r[~outer].mean().item() - 1.5) < 0.05
    assert abs(r[outer].std().item() - 0.24) < 0.03


def test_rings_radii(samples):
    r = torch.linalg.norm(samples["rings"], dim=1)
    radii = torch.tensor([3.0, 2.25, 1.5, 0.75], dtype=torch.float64)
    dist = (r[:, None] - radii).abs()
    ring = dist.argmin(dim=1)
    assert dist.min(dim=1).values.mean() < 0.1
    frac = torch.bincount(ring, minlength=4).double() / N
    assert torch.allclose(frac, torch.full((4,), 0.25, dtype=torch.float64), atol=0.02)


def test_pinwheel_five_fold_symmetry(samples):
    x = samples["pinwheel"]
    ang = torch.atan2(x[:, 1], x[:, 0]) % (2 * math.pi)
    sector = torch.floor(ang / (2 * math.pi / 5)).long().clamp(max=4)
    frac = torch.bincount(sector, minlength=5).double() / N
    assert torch.allclose(frac, torch.full((5,), 0.2, dtype=torch.float64), atol=0.02)
    # ... yet angularly concentrated in arms (not a uniform ring)
    hist = torch.histc(ang, bins=40, min=0, max=2 * math.pi) / N
    assert hist.max() > 2.0 / 40 and hist.min() < 0.3 / 40
    r = torch.linalg.norm(x, dim=1)
    assert 1.6 < r.mean() < 2.6


def test_two_spirals_arms(samples):
    x = samples["2spirals"]
    r = torch.linalg.norm(x, dim=1)
    assert r.max() < 3.8 and r.quantile(0.99) > 2.7
    # point reflection symmetry: the radius distribution of the two half-planes agrees
    left, right = r[x[:, 0] < 0], r[x[:, 0] >= 0]
    assert abs(left.mean() - right.mean()) < 0.1
    # radius grows with the unwrapped angle: sqrt(u) makes r roughly uniform
    # on the arm length, so no radial shell is empty
    hist = torch.histc(r, bins=6, min=0.0, max=3.0)
    assert (hist > 0.05 * N / 6).all()


# --------------------------------------------------------------- log densities


def test_eight_gaussians_density_integrates_to_one():
    pts, area = _grid(-7.0, 7.0, 700)
    total = toy2d_log_density("8gaussians", pts).exp().sum() * area
    assert abs(total.item() - 1.0) < 1e-6


def test_checkerboard_density_integrates_to_one():
    pts, area = _grid(-5.0, 5.0, 250)  # grid cells straddle the square borders
    logp = toy2d_log_density("checkerboard", pts)
    total = logp.exp().sum() * area
    assert abs(total.item() - 1.0) < 1e-2
    assert torch.isclose(logp.max(), torch.tensor(-math.log(32.0), dtype=torch.float64))
    assert torch.isneginf(logp).any()


def test_checkerboard_log_density_on_samples(samples):
    x = samples["checkerboard"]
    logp = toy2d_log_density("checkerboard", x)
    assert torch.allclose(logp, torch.full_like(logp, -math.log(32.0)))
    outside = torch.tensor([[1.0, -1.0], [-3.0, -1.0], [0.0, 4.5], [5.0, 0.0]])
    assert torch.isneginf(toy2d_log_density("checkerboard", outside)).all()


def test_eight_gaussians_log_density_matches_samples(samples):
    """E_p[log p] by Monte Carlo on the sampler agrees with quadrature (ties both)."""
    pts, area = _grid(-7.0, 7.0, 700)
    logp_grid = toy2d_log_density("8gaussians", pts)
    neg_entropy = (logp_grid.exp() * logp_grid).sum() * area
    mc = toy2d_log_density("8gaussians", samples["8gaussians"]).mean()
    assert abs(mc.item() - neg_entropy.item()) < 0.03


def test_log_density_shape_and_dtype():
    x = torch.zeros(3, 4, 2, dtype=torch.float32)
    for name in ("8gaussians", "checkerboard"):
        out = toy2d_log_density(name, x)
        assert out.shape == (3, 4) and out.dtype == torch.float32


def test_eight_gaussians_log_density_value_at_centre():
    r, s = 4.0 / math.sqrt(2.0), 0.5 / math.sqrt(2.0)
    x = torch.tensor([r, 0.0], dtype=torch.float64)
    expected = math.log(1 / 8) - math.log(2 * math.pi * s * s)  # others negligible
    assert abs(toy2d_log_density("8gaussians", x).item() - expected) < 1e-6


@pytest.mark.parametrize("name", ["moons", "circles", "rings", "pinwheel", "2spirals"])
def test_log_density_not_implemented(name):
    with pytest.raises(NotImplementedError, match=name):
        toy2d_log_density(name, torch.zeros(1, 2))


def test_log_density_bad_input():
    with pytest.raises(ValueError, match="shape"):
        toy2d_log_density("8gaussians", torch.zeros(5, 3))
    with pytest.raises(ValueError, match="unknown toy dataset 'swissroll'"):
        toy2d_log_density("swissroll", torch.zeros(5, 2))


# ------------------------------------------------------------------ potentials


@pytest.mark.parametrize("name", POTENTIALS)
def test_potentials_finite_on_grid(name):
    pts, _ = _grid(-6.0, 6.0, 120)
    u = potential_energy(name, pts)
    assert u.shape == (120, 120)
    assert torch.isfinite(u).all()
    # bounded below on the box, and exp(-U) integrable there
    pts4, area = _grid(-4.0, 4.0, 200)
    z = ((-potential_energy(name, pts4)).exp().sum() * area).item()
    assert 0.1 < z < 100.0


@pytest.mark.parametrize("name", POTENTIALS)
def test_potentials_differentiable(name):
    z = torch.randn(64, 2, generator=_gen(1), dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(potential_energy(name, z).sum(), z)
    assert torch.isfinite(g).all()


@pytest.mark.parametrize("name", POTENTIALS)
def test_potentials_stable_far_away(name):
    z = torch.tensor([[30.0, -30.0], [-25.0, 40.0]], dtype=torch.float32)
    assert torch.isfinite(potential_energy(name, z)).all()


def test_potential_reference_values():
    z = torch.tensor([[2.0, 0.0], [0.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    u1 = potential_energy("u1", z)

    def gauss(a: float) -> float:
        return math.exp(-0.5 * (a / 0.6) ** 2)

    assert abs(u1[0].item() - (-math.log(1.0 + gauss(4.0)))) < 1e-12
    assert abs(u1[1].item() - (0.5 * 25.0 - math.log(2 * gauss(2.0)))) < 1e-9
    u2 = potential_energy("u2", z)
    assert abs(u2[1].item()) < 1e-12  # z2 == w1(0) == 0
    assert abs(u2[2].item()) < 1e-12  # w1(1) == sin(pi/2) == 1
    # u3 at z = (1, 1): d = 0, w2(1) = 3
    expected_u3 = -math.log(1.0 + math.exp(-0.5 * (3 / 0.35) ** 2))
    assert abs(potential_energy("u3", z)[2].item() - expected_u3) < 1e-12
    # u4 at z = (1, 1): d = 0, w3(1) = 1.5
    expected_u4 = -math.log(1.0 + math.exp(-0.5 * (1.5 / 0.35) ** 2))
    assert abs(potential_energy("u4", z)[2].item() - expected_u4) < 1e-12


def test_potential_symmetries():
    z = torch.randn(100, 2, generator=_gen(2), dtype=torch.float64)
    flip = torch.tensor([-1.0, 1.0], dtype=torch.float64)
    torch.testing.assert_close(potential_energy("u1", z), potential_energy("u1", z * flip))
    torch.testing.assert_close(potential_energy("u1", z), potential_energy("u1", -z))
    shift = torch.tensor([4.0, 0.0], dtype=torch.float64)  # w1 has period 4 in z1
    torch.testing.assert_close(potential_energy("u2", z), potential_energy("u2", z + shift))


def test_potential_bad_input():
    with pytest.raises(ValueError, match=r"unknown potential 'u5'.*u1, u2, u3, u4"):
        potential_energy("u5", torch.zeros(1, 2))
    with pytest.raises(ValueError, match="shape"):
        potential_energy("u1", torch.zeros(2, 3))
    with pytest.raises(TypeError):
        potential_energy("u1", [[0.0, 0.0]])


# ------------------------------------------------------------------ errors


def test_unknown_name_lists_valid():
    with pytest.raises(ValueError) as info:
        sample_toy2d("swissroll", 10)
    msg = str(info.value)
    assert "'swissroll'" in msg
    for name in TOY_DATASETS:
        assert name in msg


@pytest.mark.parametrize("bad", [0, -3])
def test_non_positive_n(bad):
    with pytest.raises(ValueError, match="positive int"):
        sample_toy2d("moons", bad)


@pytest.mark.parametrize("bad", [2.5, 10.0, "10", True, None])
def test_non_int_n(bad):
    with pytest.raises(TypeError, match="positive int"):
        sample_toy2d("moons", bad)


def test_integer_like_n_accepted():
    assert sample_toy2d("rings", np.int64(4), _gen(0)).shape == (4, 2)


def test_bad_dtype():
    with pytest.raises(TypeError, match="dtype"):
        sample_toy2d("moons", 4, dtype=torch.int64)
