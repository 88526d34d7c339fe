"""tools/client_suites.py: a client library's tests run unchanged with ``import torchdiffeq``
resolving to neuralode (the shim), counted from pytest's JUnit report. (The measured
client suites and their counts: docs/torchdiffeq_compat.md.)"""

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CLIENT_TEST = '''\
import torch
import torchdiffeq


def test_odeint_through_the_shim():
    assert "neuralode" in torchdiffeq.__version__
    y = torchdiffeq.odeint(lambda t, y: -y, torch.tensor([1.0]), torch.tensor([0.0, 1.0]),
                           options={"max_num_steps": 100})
    assert abs(float(y[-1]) - 0.36787944) < 1e-6


def test_adjoint_params_outside_func():
    p = torch.tensor([0.5, 0.3], requires_grad=True)
    q = p * 2

    class F(torch.nn.Module):
        def forward(self, t, y):
            return -q[0] * y + q[1]
    torchdiffeq.odeint_adjoint(F(), torch.tensor([1.0]), torch.tensor([0.0, 1.0]),
                               adjoint_params=(p,))[-1].sum().backward()
    assert p.grad is not None


def test_expected_to_fail():
    assert False, "a failure is counted with its message"
'''


def load_tool():
    spec = importlib.util.spec_from_file_location("client_suites", ROOT / "tools" /
                                                  "client_suites.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # (its dataclass resolves annotations through it)
    spec.loader.exec_module(mod)
    return mod


def test_a_client_suite_runs_through_the_shim_and_is_counted(tmp_path):
    tool = load_tool()
    checkout = tmp_path / "client"
    (checkout / "tests").mkdir(parents=True)
    (checkout / "tests" / "test_client.py").write_text(CLIENT_TEST)
    client = tool.Client("example/client", "client", ("tests",), "odeint, odeint_adjoint")
    shim = tool.build_shim(tmp_path)
    res = tool.run_suite(sys.executable, checkout, client, shim, ROOT, 300, tmp_path,
                         "neuralode")
    assert res["counts"] == {"passed": 2, "failed": 1}, res
    assert res["failures"] == [("tests.test_client::test_expected_to_fail",
                                "AssertionError: a failure is counted with its message")]
    assert sorted(tool.CLIENTS) == ["strnn", "torchcde", "torchdyn"]
