"""Tests for neuralode.data.spirals."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from neuralode.data.spirals import (
    GridBatch,
    IrregularBatch,
    SpiralData,
    gather_points,
    grid_points,
    make_spirals,
    masked_to_padded,
    train_test_split,
)


@pytest.fixture(scope="module")
def data() -> SpiralData:
    return make_spirals()  # paper-sized defaults: 1000 spirals x 500 points


@pytest.fixture(scope="module")
def small() -> SpiralData:
    return make_spirals(n_spirals=40, n_total=120, n_obs=30, seed=3)


# ------------------------------------------------------------------ structure


def test_defaults_and_shapes(data):
    n, t = 1000, 500
    assert len(data) == n and data.n_total == t
    assert data.t.shape == (t,)
    assert data.clean.shape == data.noisy.shape == (n, t, 2)
    assert data.direction.shape == (n,) and data.direction.dtype == torch.int64
    for m in (data.obs_mask, data.interp_mask, data.extrap_mask):
        assert m.shape == (n, t) and m.dtype == torch.bool
    assert data.n_obs == 100 and data.n_window == 250 and data.noise_std == 0.1
    assert data.clean.dtype == data.noisy.dtype == data.t.dtype == torch.float32


def test_times_strictly_increasing(data):
    assert data.t[0] == 0.0
    assert (torch.diff(data.t) > 0).all()
    torch.testing.assert_close(data.t[-1], torch.tensor(10.0))
    assert abs(data.window_end - data.t[249].item()) < 1e-12


def test_dtype_option():
    d = make_spirals(n_spirals=4, n_total=20, n_obs=5, dtype=torch.float64)
    assert d.t.dtype == d.clean.dtype == d.noisy.dtype == torch.float64
    d32 = make_spirals(n_spirals=4, n_total=20, n_obs=5)
    torch.testing.assert_close(d.clean.float(), d32.clean)


# ------------------------------------------------------------ reproducibility


def test_same_seed_same_data():
    a = make_spirals(n_spirals=20, n_total=60, n_obs=10, seed=11)
    b = make_spirals(n_spirals=20, n_total=60, n_obs=10, seed=11)
    for name in ("t", "clean", "noisy", "direction", "obs_mask", "interp_mask", "extrap_mask"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_different_seed_differs():
    a = make_spirals(n_spirals=20, n_total=60, n_obs=10, seed=11)
    b = make_spirals(n_spirals=20, n_total=60, n_obs=10, seed=12)
    assert not torch.allclose(a.clean, b.clean)
    assert not torch.equal(a.obs_mask, b.obs_mask)


def test_global_rngs_untouched():
    torch.manual_seed(0)
    np.random.seed(0)
    expected_t = torch.rand(3)
    expected_np = np.random.rand(3)
    torch.manual_seed(0)
    np.random.seed(0)
    make_spirals(n_spirals=10, n_total=40, n_obs=5)
    assert torch.equal(torch.rand(3), expected_t)
    assert np.array_equal(np.random.rand(3), expected_np)


# ---------------------------------------------------------------- geometry


def test_half_each_direction(data):
    assert set(data.direction.tolist()) == {-1, 1}
    assert (data.direction == 1).sum() == 500
    odd = make_spirals(n_spirals=7, n_total=20, n_obs=5)
    assert (odd.direction == -1).sum() == 3 and (odd.direction == 1).sum() == 4
    # directions are shuffled, not in two blocks
    assert 0 < (data.direction[:100] == 1).sum() < 100


def test_rotation_sense_matches_direction(data):
    z = data.clean.double()
    cross = z[:, :-1, 0] * z[:, 1:, 1] - z[:, :-1, 1] * z[:, 1:, 0]
    sense = torch.sign(cross)
    assert (sense == data.direction[:, None].double()).all()


def test_archimedean_radius_linear_in_angle(data):
    z = data.clean.double()
    r = torch.linalg.norm(z, dim=-1)
    ang = torch.atan2(z[..., 1], z[..., 0])
    unwrapped = torch.from_numpy(np.unwrap(ang.numpy(), axis=1))
    # r = b * theta with |d theta / dt| = 1, b = 0.3
    dr = torch.diff(r, dim=1)
    dtheta = torch.diff(unwrapped, dim=1).abs()
    torch.testing.assert_close(dr / dtheta, torch.full_like(dr, 0.3), atol=1e-4, rtol=0)
    total_turns = (unwrapped[:, -1] - unwrapped[:, 0]).abs() / (2 * math.pi)
    assert ((total_turns > 1.0) & (total_turns < 2.0)).all()
    assert z.abs().max() < 6.0


def test_distinct_starting_points(data):
    start = data.clean[:, 0].double()
    dist = torch.cdist(start, start) + torch.eye(len(data), dtype=torch.float64) * 1e9
    assert dist.min() > 1e-6
    r0 = torch.linalg.norm(start, dim=1)
    assert r0.max() - r0.min() > 1.5  # random phase along the spiral, not just rotated copies
    ang0 = torch.atan2(start[:, 1], start[:, 0])
    assert ang0.std() > 1.5  # spread around the circle


def test_noise_level(data):
    resid = (data.noisy - data.clean).double()
    assert abs(resid.std().item() - 0.1) < 0.002
    assert abs(resid.mean().item()) < 0.002
    noiseless = make_spirals(n_spirals=5, n_total=30, n_obs=5, noise_std=0.0)
    assert torch.equal(noiseless.noisy, noiseless.clean)
    loud = make_spirals(n_spirals=200, n_total=100, n_obs=5, noise_std=0.5)
    assert abs((loud.noisy - loud.clean).std().item() - 0.5) < 0.01


# ------------------------------------------------------------------- masks


def test_exact_obs_count_inside_window(data):
    assert (data.obs_mask.sum(dim=1) == 100).all()
    assert not data.obs_mask[:, data.n_window :].any()


def test_masks_disjoint_and_cover(data):
    o, i, e = data.obs_mask, data.interp_mask, data.extrap_mask
    assert not (o & i).any() and not (o & e).any() and not (i & e).any()
    assert (o | i | e).all()
    assert (i.sum(dim=1) == data.n_window - data.n_obs).all()
    assert (e.sum(dim=1) == data.n_total - data.n_window).all()
    # extrapolation strictly after every observed / interpolation point
    idx = torch.arange(data.n_total)
    assert (idx[None].expand_as(e)[e] >= data.n_window).all()
    assert torch.equal(data.window_mask, o | i)


def test_observation_sets_irregular_and_varied(data):
    assert len({tuple(row.nonzero().flatten().tolist()) for row in data.obs_mask}) == len(data)
    gaps = torch.diff(torch.nonzero(data.obs_mask[0]).flatten())
    assert gaps.unique().numel() > 1  # irregular spacing
    # every window index is observed somewhere (uniform without replacement)
    frac = data.obs_mask[:, : data.n_window].double().mean(dim=0)
    assert (frac - 0.4).abs().max() < 0.1


@pytest.mark.parametrize("n_obs", [30, 50, 100])
def test_paper_observation_counts(n_obs):
    d = make_spirals(n_spirals=10, n_obs=n_obs)
    assert (d.obs_mask.sum(dim=1) == n_obs).all()


def test_full_window_has_no_extrapolation():
    d = make_spirals(n_spirals=4, n_total=20, n_obs=20, n_window=20)
    assert d.obs_mask.all() and not d.interp_mask.any() and not d.extrap_mask.any()
    assert gather_points(d, "extrap").values.shape == (4, 0, 2)


# ------------------------------------------------------------------- split


def test_train_test_split(data):
    train, test = train_test_split(data, test_fraction=0.2, seed=1)
    assert len(train) == 800 and len(test) == 200
    again_train, again_test = train_test_split(data, test_fraction=0.2, seed=1)
    assert torch.equal(train.clean, again_train.clean)
    assert torch.equal(test.obs_mask, again_test.obs_mask)
    other_train, _ = train_test_split(data, test_fraction=0.2, seed=2)
    assert not torch.equal(train.clean, other_train.clean)
    # a partition: every starting point appears exactly once
    starts = torch.cat((train.clean[:, 0], test.clean[:, 0]))
    assert torch.unique(starts, dim=0).shape[0] == len(data)
    assert train.t is data.t and test.n_obs == data.n_obs and test.n_window == data.n_window
    assert 60 < (test.direction == 1).sum() < 140


@pytest.mark.parametrize("frac", [0.0, 1.0, -0.1, 1.5])
def test_split_bad_fraction(small, frac):
    with pytest.raises(ValueError, match="test_fraction"):
        train_test_split(small, test_fraction=frac)


def test_split_empty_part():
    tiny = make_spirals(n_spirals=2, n_total=10, n_obs=2)
    with pytest.raises(ValueError, match="empty"):
        train_test_split(tiny, test_fraction=0.1)


def test_subset_and_to(small):
    sub = small.subset([0, 5, 7])
    assert len(sub) == 3
    assert torch.equal(sub.clean[1], small.clean[5])
    assert torch.equal(sub.obs_mask[2], small.obs_mask[7])
    moved = small.to(dtype=torch.float64)
    assert moved.clean.dtype == torch.float64 and moved.obs_mask.dtype == torch.bool
    assert moved.direction.dtype == torch.int64


# ---------------------------------------------------------------- batching


def test_gather_obs(small):
    batch = gather_points(small, "obs", index=torch.arange(10))
    assert isinstance(batch, IrregularBatch)
    assert batch.times.shape == (10, 30) and batch.values.shape == (10, 30, 2)
    assert batch.mask.all()
    assert (torch.diff(batch.times, dim=1) > 0).all()
    assert (batch.times <= small.window_end).all()
    for b in range(10):
        m = small.obs_mask[b]
        assert torch.equal(batch.times[b], small.t[m])
        assert torch.equal(batch.values[b], small.noisy[b][m])
    clean = gather_points(small, "obs", index=torch.arange(10), noisy=False)
    assert torch.equal(clean.values[3], small.clean[3][small.obs_mask[3]])


def test_gather_interp_and_extrap(small):
    interp = gather_points(small, "interp", noisy=False)
    extrap = gather_points(small, "extrap", noisy=False)
    assert interp.times.shape == (40, small.n_window - 30)
    assert extrap.times.shape == (40, small.n_total - small.n_window)
    assert (interp.times <= small.window_end).all()
    assert (extrap.times > small.window_end).all()
    assert gather_points(small, "all").times.shape == (40, small.n_total)
    assert gather_points(small, "window").times.shape == (40, small.n_window)


def test_masked_to_padded_ragged():
    t = torch.arange(6, dtype=torch.float32)
    values = torch.arange(2 * 6 * 1, dtype=torch.float32).reshape(2, 6, 1) + 1
    mask = torch.tensor([[0, 1, 0, 1, 1, 0], [1, 0, 0, 0, 0, 0]], dtype=torch.bool)
    out = masked_to_padded(t, values, mask)
    assert torch.equal(out.mask, torch.tensor([[True, True, True], [True, False, False]]))
    assert torch.equal(out.times, torch.tensor([[1.0, 3.0, 4.0], [0.0, 0.0, 0.0]]))
    assert torch.equal(out.values[..., 0], torch.tensor([[2.0, 4.0, 5.0], [7.0, 0.0, 0.0]]))
    # per-row times accepted too; padding repeats the last valid time
    out2 = masked_to_padded(t.expand(2, 6) + 10, values, mask)
    assert torch.equal(out2.times[1], torch.tensor([10.0, 10.0, 10.0]))
    with pytest.raises(ValueError, match="mask"):
        masked_to_padded(t, values, mask[:, :5])
    with pytest.raises(TypeError, match="bool"):
        masked_to_padded(t, values, mask.int())


def test_grid_points_union(small):
    idx = torch.tensor([1, 2, 3])
    batch = grid_points(small, "obs", index=idx)
    assert isinstance(batch, GridBatch)
    union = small.obs_mask[idx].any(dim=0)
    assert torch.equal(batch.times, small.t[union])
    assert (torch.diff(batch.times) > 0).all()
    assert batch.mask.shape == batch.values.shape[:2] == (3, int(union.sum()))
    assert torch.equal(batch.mask.sum(dim=1), torch.full((3,), 30))
    assert (batch.values[~batch.mask] == 0).all()
    for row, i in enumerate(idx.tolist()):
        assert torch.equal(batch.values[row][batch.mask[row]], small.noisy[i][small.obs_mask[i]])


def test_bad_point_set(small):
    with pytest.raises(ValueError, match="unknown point set 'test'"):
        gather_points(small, "test")  # type: ignore[arg-type]


# ------------------------------------------------------------------ errors


def test_n_obs_larger_than_window():
    with pytest.raises(ValueError, match=r"n_obs \(300\).*n_window=250"):
        make_spirals(n_spirals=4, n_obs=300)
    with pytest.raises(ValueError, match=r"n_obs \(11\).*n_window=10"):
        make_spirals(n_spirals=4, n_total=100, n_obs=11, n_window=10)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n_spirals": 0}, "n_spirals"),
        ({"n_spirals": -5}, "n_spirals"),
        ({"n_total": 1}, "n_total"),
        ({"n_obs": 0}, "n_obs"),
        ({"n_window": 0}, "n_window"),
        ({"n_window": 600}, "n_window"),
        ({"noise_std": -0.1}, "noise_std"),
        ({"noise_std": float("nan")}, "noise_std"),
        ({"t_max": 0.0}, "t_max"),
        ({"radius_growth": -1.0}, "radius_growth"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_spirals(**{"n_spirals": 4, **kwargs})


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n_spirals": 4.0}, "n_spirals"),
        ({"n_obs": "30"}, "n_obs"),
        ({"n_total": True}, "n_total"),
        ({"noise_std": "0.1"}, "noise_std"),
        ({"dtype": torch.int32}, "dtype"),
    ],
)
def test_bad_types(kwargs, match):
    with pytest.raises(TypeError, match=match):
        make_spirals(**{"n_spirals": 4, **kwargs})
