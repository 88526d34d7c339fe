"""Tests for neuralode.models.classifiers: the four MNIST models of the paper's Table 1."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from neuralode.models.classifiers import (
    MODEL_NAMES,
    PAPER_TABLE1,
    build_classifier,
    count_parameters,
)
from neuralode.nn import ODEBlock


def gn(c):  # GroupNorm: weight and bias
    return 2 * c


def conv(cin, cout, k, bias=True):
    return cin * cout * k * k + (cout if bias else 0)


STEM = conv(1, 64, 3) + gn(64) + conv(64, 64, 4) + gn(64) + conv(64, 64, 4)
HEAD = gn(64) + 64 * 10 + 10
EXPECTED_PARAMS = {
    "odenet": STEM + gn(64) + conv(65, 64, 3) + gn(64) + conv(65, 64, 3) + gn(64) + HEAD,
    "resnet": STEM + 6 * (gn(64) + conv(64, 64, 3, False) + gn(64) + conv(64, 64, 3, False))
    + HEAD,
    "mlp": 784 * 300 + 300 + 300 * 10 + 10,
}
EXPECTED_PARAMS["rknet"] = EXPECTED_PARAMS["odenet"]


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_parameter_counts_follow_the_architecture_and_the_paper(name):
    n = count_parameters(build_classifier(name))
    assert n == EXPECTED_PARAMS[name]
    paper = PAPER_TABLE1[name]["params_m"] * 1e6
    assert abs(n - paper) / paper < 0.1, f"{name}: {n} parameters vs the paper's {paper:.0f}"


def test_odenet_has_about_a_third_of_the_resnet_parameters():
    ratio = count_parameters(build_classifier("odenet")) / count_parameters(
        build_classifier("resnet"))
    assert 0.3 < ratio < 0.4


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_models_map_images_to_logits(name):
    model = build_classifier(name, method="rk4", options={"step_size": 0.5}) \
        if name in ("odenet", "rknet") else build_classifier(name)
    out = model(torch.randn(3, 1, 28, 28))
    assert out.shape == (3, 10)


def test_stem_downsamples_to_64_by_6_by_6():
    model = build_classifier("resnet")
    assert model.downsample(torch.randn(2, 1, 28, 28)).shape == (2, 64, 6, 6)


def test_ode_models_use_the_adjoint_as_the_paper_says():
    odenet, rknet = build_classifier("odenet"), build_classifier("rknet")
    assert isinstance(odenet.ode_block, ODEBlock) and odenet.ode_block.adjoint
    assert isinstance(rknet.ode_block, ODEBlock) and not rknet.ode_block.adjoint
    assert build_classifier("resnet").ode_block is None
    assert build_classifier("mlp").ode_block is None


def test_build_classifier_rejects_bad_choices():
    with pytest.raises(ValueError, match="unknown model 'vgg'; valid models are: odenet, rknet"):
        build_classifier("vgg")
    with pytest.raises(ValueError, match="rknet's gradient is the solver's own"):
        build_classifier("rknet", gradient="adjoint")
    with pytest.raises(ValueError, match="gradient must be one of"):
        build_classifier("odenet", gradient="exact")
    with pytest.raises(ValueError, match="n_blocks must be a positive integer, got 0"):
        build_classifier("resnet", n_blocks=0)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_one_training_step_lowers_the_loss(name):
    torch.manual_seed(0)
    # the ODE models at width 16 (one step at width 64 takes seconds)
    model = build_classifier(name, width=16 if name in ("odenet", "rknet") else 64)
    x, y = torch.randn(10, 1, 28, 28), torch.arange(10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    before = F.cross_entropy(model(x), y)
    before.backward()
    optimizer.step()
    with torch.no_grad():
        after = F.cross_entropy(model(x), y)
    assert after < before
    if model.ode_block is not None:
        assert model.ode_block.nfe_forward > 0


def _grads_odenet_vs_rknet(activation: str, tol: float):
    torch.manual_seed(0)
    kw = {"width": 8, "rtol": tol, "atol": tol, "activation": activation}
    odenet = build_classifier("odenet", **kw).double()
    rknet = build_classifier("rknet", **kw).double()
    rknet.load_state_dict(odenet.state_dict())
    x, y = torch.randn(4, 1, 28, 28, dtype=torch.float64), torch.tensor([0, 3, 5, 9])
    for model in (odenet, rknet):
        F.cross_entropy(model(x), y).backward()
    assert odenet.ode_block.nfe_backward > 0 and rknet.ode_block.nfe_backward > 0
    return odenet, rknet


def test_odenet_adjoint_and_rknet_gradients_match_on_the_same_weights():
    # A smooth ODE function: both gradients converge to the exact one as tol -> 0. (With the
    # paper's ReLU, f is not differentiable at the kinks and the two differ by ~1% even at
    # tol 1e-8: the adaptive steps cannot resolve the kinks.)
    odenet, rknet = _grads_odenet_vs_rknet("softplus", 1e-7)
    for (name, p), q in zip(odenet.named_parameters(), rknet.parameters()):
        scale = q.grad.abs().max()
        assert (p.grad - q.grad).abs().max() <= 1e-4 * scale + 1e-12, name


def test_unknown_activation_is_rejected():
    with pytest.raises(ValueError, match="unknown activation 'gelu'; valid activations are: "
                                         "relu, softplus, tanh"):
        build_classifier("odenet", activation="gelu")
