"""Tests for the latent ODE, its encoders, the RNN baseline and `neuralode train latent-ode`."""

from __future__ import annotations

import json
import math

import pytest
import torch

from neuralode.cli import main
from neuralode.data.spirals import gather_points, make_spirals
from neuralode.experiments import latent_ode as exp
from neuralode.experiments.runner import load_checkpoint
from neuralode.models.latent_ode import (
    GRUEncoder,
    LatentODE,
    ODERNNEncoder,
    RNNBaseline,
    check_sequences,
    gaussian_kl,
)

TINY = ["--n-spirals", "16", "--n-total", "60", "--n-obs", "12", "--batch-size", "6",
        "--latent-dim", "3", "--enc-hidden", "8", "--ode-hidden", "8", "--dec-hidden", "8",
        "--rnn-hidden", "8", "--eval-every", "2", "--ckpt-every", "2", "--quiet"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only add overhead on a shared machine
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny():
    return make_spirals(n_spirals=8, n_total=60, n_obs=10, seed=1)


def _cfg(**kw):
    p = __import__("argparse").ArgumentParser()
    exp.build_parser(p)
    args = p.parse_args(TINY)
    for k, v in kw.items():
        setattr(args, k, v)
    return exp._config(args)


# ------------------------------------------------------------------ data pipeline


def test_training_batches_shapes_and_time_order():
    train, test = exp.load_data(_cfg())
    assert len(train) + len(test) == 16 and len(test) == round(0.2 * 16)
    b = gather_points(train, "obs", torch.arange(5))
    assert b.times.shape == (5, 12) and b.values.shape == (5, 12, 2) and bool(b.mask.all())
    assert bool((b.times[:, 1:] > b.times[:, :-1]).all())
    assert float(b.times.max()) <= train.window_end
    # the validated encoder input is the same batch
    times, values, _mask = check_sequences(b.times, b.values, b.mask, obs_dim=2)
    assert torch.equal(times, b.times) and torch.equal(values, b.values)


def test_data_reproducible_by_seed_and_model_seed_independent():
    a_train, a_test = exp.load_data(_cfg(seed=0))
    b_train, b_test = exp.load_data(_cfg(seed=7))  # model seed does not change the data
    c_train, _ = exp.load_data(_cfg(data_seed=3))
    assert torch.equal(a_train.noisy, b_train.noisy) and torch.equal(a_test.obs_mask,
                                                                      b_test.obs_mask)
    assert not torch.equal(a_train.noisy, c_train.noisy)


# ------------------------------------------------------------------ ELBO


def test_gaussian_kl_closed_form():
    mu = torch.tensor([[0.0, 1.0]])
    logvar = torch.tensor([[0.0, math.log(4.0)]])
    # KL(N(1, 4) || N(0, 1)) = 0.5 * (1 + 4 - log 4 - 1)
    expected = 0.5 * (1 + 4 - math.log(4.0) - 1)
    torch.testing.assert_close(gaussian_kl(mu, logvar), torch.tensor([expected]))


def test_elbo_finite_and_decreasing_loss_on_tiny_set(tiny):
    torch.manual_seed(0)
    model = LatentODE(2, 3, enc_hidden=12, ode_hidden=12, dec_hidden=12, obs_std=0.1)
    b = gather_points(tiny, "obs")
    opt = torch.optim.Adam(model.parameters(), lr=0.02)

    def fixed_elbo():
        torch.manual_seed(123)  # same reparameterisation noise for the comparison
        with torch.no_grad():
            return model.elbo(b.times, b.values, b.mask)

    start = fixed_elbo()
    assert all(math.isfinite(float(v)) for v in start)
    assert float(start.kl) >= 0
    torch.testing.assert_close(start.elbo, start.log_lik - start.kl)
    for _ in range(12):
        terms = model.elbo(b.times, b.values, b.mask)
        assert math.isfinite(terms.elbo.item())
        opt.zero_grad()
        (-terms.elbo).backward()
        opt.step()
    end = fixed_elbo()
    assert float(end.elbo) > float(start.elbo) + 0.1 * abs(float(start.elbo))


def test_elbo_gradients_adjoint_match_backprop(tiny):
    b = gather_points(tiny, "obs", [0, 1, 2])
    grads = []
    # per-sample solves (backprop, adjoint); checkpointing solves on the union grid, so it
    # is compared with backprop on the union grid
    for gradient, union in (("backprop", False), ("adjoint", False), ("checkpoint", False),
                            ("backprop", True)):
        torch.manual_seed(0)
        model = LatentODE(2, 3, enc_hidden=6, ode_hidden=6, dec_hidden=6, rtol=1e-10,
                          atol=1e-10, gradient=gradient, union_grid=union).double()
        torch.manual_seed(5)
        model.elbo(b.times.double(), b.values.double(), b.mask).elbo.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    scale = float(grads[0].abs().max())
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6 * scale)
    # checkpointing: backprop's gradient to rounding
    torch.testing.assert_close(grads[2], grads[3], rtol=1e-10, atol=1e-12 * scale)
    # union grid and per-sample solves agree to the tolerance
    torch.testing.assert_close(grads[3], grads[0], rtol=1e-4, atol=1e-6 * scale)


def test_bad_model_arguments():
    with pytest.raises(ValueError, match=r"unknown encoder 'lstm'.*gru, ode-rnn"):
        LatentODE(encoder="lstm")
    with pytest.raises(ValueError, match="obs_std must be a positive number, got -1"):
        LatentODE(obs_std=-1.0)
    with pytest.raises(ValueError, match="latent_dim must be a positive int, got 0"):
        LatentODE(latent_dim=0)


# ------------------------------------------------------------------ encoders: irregular input


@pytest.mark.parametrize("make", [
    lambda: GRUEncoder(2, 3, hidden=7),
    lambda: ODERNNEncoder(2, 3, hidden=7, ode_hidden=7, method="dopri5", rtol=1e-8, atol=1e-9),
], ids=["gru", "ode-rnn"])
def test_encoder_padded_batch_equals_each_sequence_alone(tiny, make):
    torch.manual_seed(0)
    enc = make().double()
    # ragged: spiral i keeps its first 4 + 2 i observed points
    b = gather_points(tiny, "obs", [0, 1, 2])
    mask = b.mask.clone()
    for i in range(3):
        mask[i, 4 + 2 * i:] = False
    times, values = b.times.double(), b.values.double()
    mu, logvar = enc(times, values, mask)
    for i in range(3):
        k = 4 + 2 * i
        mu_i, lv_i = enc(times[i:i + 1, :k], values[i:i + 1, :k])
        torch.testing.assert_close(mu[i:i + 1], mu_i, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(logvar[i:i + 1], lv_i, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("encoder", ["gru", "ode-rnn"])
def test_encoder_ignores_padding_entries(tiny, encoder):
    torch.manual_seed(0)
    model = LatentODE(2, 3, encoder=encoder, enc_hidden=6)
    b = gather_points(tiny, "obs", [0, 1])
    mask = b.mask.clone()
    mask[:, 7:] = False
    mu, _ = model.encode(b.times, b.values, mask)
    values = b.values.clone()
    values[:, 7:] = 99.0
    times = b.times.clone()
    times[:, 7:] = -5.0  # invalid times are fine where masked
    mu2, _ = model.encode(times, values, mask)
    torch.testing.assert_close(mu, mu2)


def test_encoder_uses_time_gaps(tiny):
    torch.manual_seed(0)
    enc = GRUEncoder(2, 3, hidden=6)
    b = gather_points(tiny, "obs", [0])
    mu, _ = enc(b.times, b.values, b.mask)
    mu2, _ = enc(b.times * 1.5, b.values, b.mask)  # same values, stretched times
    assert not torch.allclose(mu, mu2)


@pytest.mark.parametrize("encoder", ["gru", "ode-rnn"])
def test_encoder_rejects_unsorted_times(tiny, encoder):
    model = LatentODE(2, 3, encoder=encoder)
    b = gather_points(tiny, "obs", [0, 1])
    times = b.times.clone()
    times[1, [3, 4]] = times[1, [4, 3]]
    with pytest.raises(ValueError, match=r"strictly increasing.*sequence 1 has times\[1, 4\]"):
        model.encode(times, b.values, b.mask)
    with pytest.raises(ValueError, match="strictly increasing"):
        model.elbo(times, b.values, b.mask)


def test_encoder_rejects_duplicate_and_early_times(tiny):
    enc = GRUEncoder(2, 3)
    b = gather_points(tiny, "obs", [0])
    times = b.times.clone()
    times[0, 2] = times[0, 1]
    with pytest.raises(ValueError, match="strictly increasing"):
        enc(times, b.values, b.mask)
    times = b.times.clone()
    times[0, 0] = -0.5
    with pytest.raises(ValueError, match=r"times\[0, 0\] = -0.5 precedes t0 = 0"):
        enc(times, b.values, b.mask)


@pytest.mark.parametrize("bad, match", [
    (lambda b: (b.times, b.values[0], b.mask), r"values must be a tensor of shape \(B, K, "),
    (lambda b: (b.times[:, :-1], b.values, b.mask), r"times must have shape \(10,\) or \(2, 10\)"),
    (lambda b: (b.times, b.values, b.mask[:, :-1]), r"mask must have shape \(2, 10\)"),
    (lambda b: (b.times, b.values, b.mask.float()), "mask must be a bool tensor"),
    (lambda b: (b.times, b.values[..., :1], b.mask), ("values have 1 channels but the model "
                                                      "expects obs_dim=2")),
    (lambda b: (b.times, b.values, b.mask & torch.tensor([[True], [False]])),
     "sequence 1 has no observed point"),
    (lambda b: (b.times, b.values.index_put((torch.tensor([0]), torch.tensor([3])),
                                            torch.tensor(float("nan"))), b.mask),
     r"values\[0, 3\] .* is not finite"),
])
def test_encoder_bad_input_errors(tiny, bad, match):
    enc = GRUEncoder(2, 3)
    b = gather_points(tiny, "obs", [0, 1])
    with pytest.raises((ValueError, TypeError), match=match):
        enc(*bad(b))


# ------------------------------------------------------------------ prediction / extrapolation


def test_latent_ode_extrapolation_finite_and_shaped(tiny):
    torch.manual_seed(0)
    model = LatentODE(2, 3, enc_hidden=6)
    b = gather_points(tiny, "obs", [0, 1, 2])
    t_out = torch.linspace(0.0, 3 * float(tiny.t[-1]), 40)  # far past the observation window
    with torch.no_grad():
        pred = model.predict(b.times, b.values, b.mask, t_out)
    assert pred.shape == (3, 40, 2) and bool(torch.isfinite(pred).all())
    # predictions use the posterior mean: deterministic
    with torch.no_grad():
        torch.testing.assert_close(pred, model.predict(b.times, b.values, b.mask, t_out))


def test_latent_ode_decode_prepends_t0_consistently():
    torch.manual_seed(0)
    model = LatentODE(2, 3, rtol=1e-8, atol=1e-9)
    z0 = torch.randn(2, 3)
    t_full = torch.tensor([0.0, 0.5, 1.0, 2.0])
    with torch.no_grad():
        full = model.decode(z0, t_full)
        tail = model.decode(z0, t_full[2:])
        first = model.decode(z0, t_full[:1])
    torch.testing.assert_close(tail, full[:, 2:], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(first[:, 0], model.readout(z0).detach())


def test_query_time_errors():
    model = LatentODE(2, 3)
    z0 = torch.zeros(1, 3)
    with pytest.raises(ValueError, match=r"strictly increasing: t\[2\] = 0.5 follows"):
        model.decode(z0, torch.tensor([0.0, 1.0, 0.5]))
    with pytest.raises(ValueError, match=r"precedes t0 = 0\.0"):
        model.decode(z0, torch.tensor([-1.0, 1.0]))


def test_rnn_prediction_is_causal_and_extrapolation_finite(tiny):
    torch.manual_seed(0)
    rnn = RNNBaseline(2, hidden=8, readout_hidden=8)
    b = gather_points(tiny, "obs", [0, 1])
    t_out = torch.cat([tiny.t, tiny.t[-1] + torch.linspace(0.1, 20.0, 30)])
    with torch.no_grad():
        pred = rnn.predict(b.times, b.values, b.mask, t_out)
        assert pred.shape == (2, t_out.numel(), 2) and bool(torch.isfinite(pred).all())
        # changing the 6th observation changes nothing at or before its time, but later
        values = b.values.clone()
        values[:, 5] += 1.0
        pred2 = rnn.predict(b.times, values, b.mask, t_out)
    t5 = b.times[0, 5]
    early = t_out <= t5
    torch.testing.assert_close(pred2[0, early], pred[0, early])
    assert not torch.allclose(pred2[0, ~early], pred[0, ~early])


def test_rnn_loss_decreases(tiny):
    torch.manual_seed(0)
    rnn = RNNBaseline(2, hidden=8, readout_hidden=8)
    b = gather_points(tiny, "obs")
    opt = torch.optim.Adam(rnn.parameters(), lr=0.02)
    first = rnn.loss(b.times, b.values, b.mask).item()
    for _ in range(30):
        loss = rnn.loss(b.times, b.values, b.mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert rnn.loss(b.times, b.values, b.mask).item() < 0.5 * first


def test_rmse_scores_against_clean_truth(tiny):
    scores = exp.rmse_scores(tiny.clean, tiny)
    assert scores["test_rmse"] == 0.0 and scores["rmse_extrap"] == 0.0
    shifted = exp.rmse_scores(tiny.clean + 0.3, tiny)
    for k in ("test_rmse", "rmse_interp", "rmse_extrap", "rmse_obs"):
        assert shifted[k] == pytest.approx(0.3, rel=1e-5)


# ------------------------------------------------------------------ command line


@pytest.mark.parametrize("model", ["latent-ode", "rnn"])
def test_train_command_tiny_run(tmp_path, model, capsys):
    out = tmp_path / model
    rc = main(["train", "latent-ode", "--model", model, "--iters", "4", "--out", str(out)]
              + TINY)
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    assert math.isfinite(m["test_rmse"]) and m["iters"] == 4 and m["model"] == model
    rows = (out / "metrics.csv").read_text().strip().splitlines()
    assert rows[0].startswith("iter,loss") and len(rows) == 5
    assert (out / "checkpoint.pt").is_file()
    for png in ["reconstructions.png", "training_curves.png"]:
        assert (out / png).stat().st_size > 1000
    assert (out / "latent_interpolation.png").is_file() == (model == "latent-ode")
    assert "test RMSE" in capsys.readouterr().out


def test_train_command_resume_continues_exactly(tmp_path):
    args = ["train", "latent-ode", "--iters", "6", "--no-plot"] + TINY
    assert main(args + ["--out", str(tmp_path / "a")]) == 0
    assert main(args + ["--out", str(tmp_path / "b"), "--stop-after", "3"]) == 0
    partial = load_checkpoint(tmp_path / "b" / "checkpoint.pt")
    assert partial["step"] == 3
    assert main(args + ["--out", str(tmp_path / "b"), "--resume"]) == 0
    a = load_checkpoint(tmp_path / "a" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "b" / "checkpoint.pt")
    assert a["step"] == b["step"] == 6
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert [r["loss"] for r in a["history"]] == [r["loss"] for r in b["history"]]
    ma = json.loads((tmp_path / "a" / "metrics.json").read_text())
    mb = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert ma["test_rmse"] == mb["test_rmse"]


def test_train_command_errors(tmp_path, capsys):
    base = ["train", "latent-ode", "--iters", "2", "--out", str(tmp_path)] + TINY
    assert main(base + ["--model", "rnn", "--encoder", "ode-rnn"]) == 2
    assert "--encoder ode-rnn applies to --model latent-ode" in capsys.readouterr().err
    assert main(base + ["--resume"]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # checked while parsing, before any work
        main(base + ["--method", "rk5"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "unknown method 'rk5'" in err and "dopri5" in err
    with pytest.raises(SystemExit):
        main(base + ["--model", "gru"])
    assert main(base + ["--iters", "2", "--no-plot"]) == 0
    assert main(base + ["--iters", "1", "--resume", "--no-plot"]) == 2  # fewer: refused
    assert "--iters 2 -> 1" in capsys.readouterr().err


def test_summarize_groups_runs_by_model_and_n_obs(tmp_path):
    for i, (model, n_obs, seed, rmse) in enumerate([("rnn", 30, 0, 0.5), ("rnn", 30, 1, 0.7),
                                                    ("latent-ode", 30, 0, 0.2)]):
        d = tmp_path / f"run{i}"
        d.mkdir()
        (d / "metrics.json").write_text(json.dumps({
            "model": model, "n_obs": n_obs, "seed": seed, "test_rmse": rmse,
            "rmse_interp": rmse / 2, "rmse_extrap": rmse * 2, "rmse_obs": 0.1,
            "train_time_s": 10.0}))
    table = exp.summarize(tmp_path)
    rows = table.splitlines()
    assert len(rows) == 4
    assert "| rnn | 30 | 0,1 | 0.6000 ± 0.1414 |" in table
    assert "| latent-ode | 30 | 0 | 0.2000 |" in table
    with pytest.raises(FileNotFoundError):
        exp.summarize(tmp_path / "missing")


def test_decode_solves_each_sequence_on_its_own_times(tiny):
    """decode_at: every sequence solved alone on its own observed times (per_sample), equal
    to a solve of that sequence by itself; padding entries cost no output of their own."""
    torch.manual_seed(0)
    model = LatentODE(2, 3, ode_hidden=8, rtol=1e-9, atol=1e-10).double()
    b = gather_points(tiny, "obs", [0, 1, 2])
    mask = b.mask.clone()
    mask[1, 5:] = False
    times = b.times.double().clone()
    times[1, 5:] = -3.0  # masked: any value
    z0 = torch.randn(3, 3, dtype=torch.float64)
    got = model.latent_at(z0, times, mask)
    for i in range(3):
        obs = times[i][mask[i]]
        alone = model.latent_trajectory(z0[i:i + 1], obs)[0]
        torch.testing.assert_close(got[i][mask[i]], alone, rtol=1e-7, atol=1e-8)
    model.union_grid = True
    union = model.decode_at(z0, times, mask)
    model.union_grid = False
    torch.testing.assert_close(model.decode_at(z0, times, mask)[mask], union[mask], rtol=1e-6,
                               atol=1e-7)
