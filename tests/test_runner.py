"""The shared training runner (neuralode/experiments/runner.py): safe checkpoints, run
directories that are never lost, Ctrl-C / SIGTERM, bounded work and clear command-line
errors. Tiny budgets throughout."""

from __future__ import annotations

import hashlib
import io
import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from neuralode.cli import main
from neuralode.experiments.runner import (
    CHECKPOINT_MAGIC,
    CheckpointError,
    load_checkpoint,
    max_threads,
    save_checkpoint,
)

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "mnist"
# A linear field on a fixed RK4 grid: a few milliseconds per iteration.
FAST = ["train", "dynamics", "--model", "linear", "--method", "rk4", "--gradient", "backprop",
        "--n-points", "50", "--batch-size", "4", "--batch-time", "3", "--batch-stride", "1",
        "--eval-every", "1000", "--no-plot", "--quiet", "--threads", "1"]


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


class _RunsCode:
    """Unpickling this creates ``marker``: what a malicious checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def _crafted(path: Path, marker: Path, with_header: bool) -> None:
    buf = io.BytesIO()
    torch.save({"format": 2, "experiment": "dynamics", "model": _RunsCode(marker)}, buf)
    payload = buf.getvalue()
    head = (CHECKPOINT_MAGIC + b" sha256=" + hashlib.sha256(payload).hexdigest().encode()
            + b" size=" + str(len(payload)).encode() + b"\n")
    path.write_bytes((head if with_header else b"") + payload)


# --------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("with_header", [True, False])
def test_crafted_checkpoint_is_refused_and_runs_nothing(tmp_path, capsys, with_header):
    run, marker = tmp_path / "run", tmp_path / "pwned"
    run.mkdir()
    _crafted(run / "checkpoint.pt", marker, with_header)
    assert main([*FAST, "--iters", "4", "--out", str(run), "--resume"]) == 2
    err = capsys.readouterr().err
    assert str(run / "checkpoint.pt") in err and "refus" in err and "Traceback" not in err
    assert main(["analyze", "mnist-fig3", "--run", str(run), "--out", str(tmp_path / "f3")]) == 2
    assert "refus" in capsys.readouterr().err
    with pytest.raises(CheckpointError):
        load_checkpoint(run / "checkpoint.pt")
    assert not marker.exists()


def test_truncated_empty_or_corrupted_checkpoint_is_named_and_not_loaded(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*FAST, "--iters", "4", "--ckpt-every", "2", "--out", str(out)]) == 0
    capsys.readouterr()
    ckpt = out / "checkpoint.pt"
    data = ckpt.read_bytes()
    cases = {"truncated": data[: len(data) // 2], "empty": b"",
             "SHA-256 mismatch": data[:-5] + bytes(5 - i for i in range(5))}
    for word, content in cases.items():
        ckpt.write_bytes(content)
        assert main([*FAST, "--iters", "8", "--out", str(out), "--resume"]) == 2
        err = capsys.readouterr().err
        assert str(ckpt) in err and word in err and "Traceback" not in err, err
        assert len(err.strip().splitlines()) == 1


def test_checkpoint_holds_only_tensors_and_plain_values(tmp_path):
    save_checkpoint({"w": torch.ones(2), "rng": [1, (2, 3)], "x": None}, tmp_path / "c.pt")
    assert load_checkpoint(tmp_path / "c.pt")["rng"] == [1, (2, 3)]
    with pytest.raises(TypeError, match=r"checkpoint\['f'\] holds a function"):
        save_checkpoint({"f": lambda: 0}, tmp_path / "d.pt")


# --------------------------------------------------------------------------- run directory


def test_existing_run_is_never_overwritten_without_resume_or_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*FAST, "--iters", "3", "--out", str(out)]) == 0
    before = (out / "checkpoint.pt").read_bytes()
    assert main([*FAST, "--iters", "5", "--lr", "0.1", "--out", str(out)]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (out / "checkpoint.pt").read_bytes() == before
    assert main([*FAST, "--iters", "5", "--out", str(out), "--overwrite"]) == 0
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 5
    assert main([*FAST, "--iters", "5", "--out", str(out), "--overwrite", "--resume"]) == 2


def test_a_finished_run_is_extended_by_a_larger_iters(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*FAST, "--iters", "3", "--lr", "0.02", "--out", str(out)]) == 0
    assert main([*FAST, "--iters", "5", "--lr", "0.02", "--out", str(out), "--resume"]) == 0
    assert "extending the finished run of 3 iterations to 5" in capsys.readouterr().err
    ck = load_checkpoint(out / "checkpoint.pt")
    assert ck["step"] == 5 and [r["iter"] for r in ck["history"]] == [1, 2, 3, 4, 5]
    m = json.loads((out / "metrics.json").read_text())
    assert m["finished"] is True and m["iters"] == 5 and m["config"]["extended_from"] == [3]
    # iterations 1-3 followed the 3-iteration cosine schedule, 4-5 that of a 5-iteration run
    lr = [r["lr"] for r in ck["history"]]

    def cosine(step, total):
        return 0.02 * (0.05 + 0.95 * (1 + math.cos(math.pi * step / total)) / 2)

    assert lr[:3] == pytest.approx([cosine(i, 3) for i in range(3)], rel=1e-6)
    assert lr[3:] == pytest.approx([cosine(i, 5) for i in (3, 4)], rel=1e-6)


def test_resume_still_refuses_what_cannot_be_extended(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*FAST, "--iters", "4", "--stop-after", "2", "--out", str(out)]) == 0
    assert main([*FAST, "--iters", "6", "--out", str(out), "--resume"]) == 2  # unfinished
    err = capsys.readouterr().err
    assert "stopped at iteration 2 of 4" in err and "--iters 4" in err
    assert main([*FAST, "--iters", "4", "--out", str(out), "--resume"]) == 0
    assert main([*FAST, "--iters", "3", "--out", str(out), "--resume"]) == 2  # fewer
    assert "--iters 4 -> 3" in capsys.readouterr().err
    assert main([*FAST, "--iters", "6", "--lr", "0.5", "--out", str(out), "--resume"]) == 2
    err = capsys.readouterr().err  # another setting: refused, and named
    assert "--lr 0.02 -> 0.5" in err and "--iters" not in err
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 4


def test_out_that_is_a_file_and_bad_threads_are_one_line_errors(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    assert main([*FAST, "--iters", "2", "--out", str(f)]) == 2
    err = capsys.readouterr().err
    assert "is a file" in err and len(err.strip().splitlines()) == 1
    for bad in ("100000", "0", "two"):
        with pytest.raises(SystemExit) as e:
            main([*FAST[:-2], "--threads", bad, "--out", str(tmp_path / "r")])
        assert e.value.code == 2
        assert f"thread count from 1 to {max_threads()}" in capsys.readouterr().err


@pytest.mark.skipif(max_threads() < 2, reason="needs 2 CPUs")
def test_resume_with_other_threads_is_refused_and_says_which(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*FAST, "--iters", "4", "--stop-after", "2", "--out", str(out)]) == 0
    assert main([*FAST[:-2], "--threads", "2", "--iters", "4", "--out", str(out),
                 "--resume"]) == 2
    assert "--threads 1, now 2" in capsys.readouterr().err


def test_a_two_process_checkpoint_does_not_resume_silently_in_one(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*FAST, "--iters", "4", "--stop-after", "2", "--out", str(out)]) == 0
    ckpt = load_checkpoint(out / "checkpoint.pt")
    ckpt["world_size"] = 2  # as written by torchrun --nproc_per_node=2
    save_checkpoint(ckpt, out / "checkpoint.pt")
    assert main([*FAST, "--iters", "4", "--out", str(out), "--resume"]) == 2
    assert "2 process(es), now 1" in capsys.readouterr().err


def test_tensorboard_logs_the_metrics_or_says_what_is_missing(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main([*FAST, "--iters", "2", "--out", str(out), "--tensorboard"])
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        assert rc == 2 and "pip install tensorboard" in capsys.readouterr().err
    else:
        assert rc == 0 and any((out / "tensorboard").iterdir())


def test_tolerance_below_the_dtype_resolution_is_rejected(tmp_path, capsys):
    assert main([*FAST, "--iters", "2", "--rtol", "1e-30", "--out", str(tmp_path / "r")]) == 2
    assert "--rtol 1e-30 is below what float32 can resolve" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


# --------------------------------------------------------------------------- signals


def test_sigint_saves_a_checkpoint_and_the_resumed_run_is_bit_identical(tmp_path):
    iters = ["--iters", "200", "--ckpt-every", "5"]
    part, full = tmp_path / "part", tmp_path / "full"
    proc = subprocess.Popen([sys.executable, "-m", "neuralode", *FAST, *iters, "--out",
                             str(part)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (part / "checkpoint.pt").exists() and proc.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint within 120 s"
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "SIGINT" in err
    # the command that resumes is spelled the way this run was started
    assert "--resume" in err and " -m neuralode train dynamics " in err
    stopped = load_checkpoint(part / "checkpoint.pt")["step"]
    assert 5 <= stopped < 200
    status = json.loads((part / "metrics.json").read_text())
    assert status["finished"] is False and status["status"] == "interrupted"

    (part / ".checkpoint.pt.x1y2.neuralode-tmp").write_bytes(b"left by kill -9")
    assert main([*FAST, *iters, "--out", str(part), "--resume"]) == 0
    assert not list(part.glob("*.neuralode-tmp"))
    assert main([*FAST, *iters, "--out", str(full)]) == 0
    a, b = load_checkpoint(full / "checkpoint.pt"), load_checkpoint(part / "checkpoint.pt")
    assert a["step"] == b["step"] == 200
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    assert [r["loss"] for r in a["history"]] == [r["loss"] for r in b["history"]]
    assert json.loads((part / "metrics.json").read_text())["finished"] is True


def test_sigterm_exits_143_with_a_checkpoint(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "neuralode", *FAST, "--iters", "100000",
                             "--ckpt-every", "1", "--out", str(out)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "checkpoint.pt").exists() and proc.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint within 120 s"
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "SIGTERM" in err and "Traceback" not in err and "--resume" in err
    assert 1 <= load_checkpoint(out / "checkpoint.pt")["step"] < 100000


# --------------------------------------------------------------------------- bounded work


def test_too_large_lr_stops_with_the_stiffness_message_in_bounded_time(tmp_path, capsys):
    out = tmp_path / "run"
    t0 = time.perf_counter()
    rc = main(["train", "dynamics", "--model", "mlp", "--hidden", "16", "--lr", "1e6",
               "--n-points", "100", "--batch-size", "4", "--batch-time", "5", "--iters", "50",
               "--ckpt-every", "1", "--max-num-steps", "300", "--no-plot", "--quiet",
               "--threads", "1", "--out", str(out)])
    assert time.perf_counter() - t0 < 60
    assert rc == 1
    err = capsys.readouterr().err
    assert "the learned dynamics became stiff at iteration" in err and "lower --lr" in err
    assert "Traceback" not in err
    status = json.loads((out / "metrics.json").read_text())
    assert status["finished"] is False and status["status"] == "failed"
    if status["checkpoint_step"]:  # the last good checkpoint is kept and loads
        assert load_checkpoint(out / "checkpoint.pt")["step"] == status["checkpoint_step"]


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    out = tmp_path / "mlp"
    rc = main(["train", "mnist", "--model", "mlp", "--train-split", "train-5k",
               "--train-limit", "96", "--test-limit", "32", "--batch-size", "32",
               "--data-dir", str(SHARED), "--threads", "1", "--no-plot", "--quiet",
               "--epochs", "3", "--decay-epochs", "1", "--decay-factor", "1e7",
               "--lr", "0.1", "--out", str(out)])
    assert rc == 1
    err = capsys.readouterr().err
    assert "non-finite" in err and "at iteration" in err and "Traceback" not in err
    status = json.loads((out / "metrics.json").read_text())
    assert status["finished"] is not True and status["status"] == "failed"
    good = load_checkpoint(out / "checkpoint.pt")
    assert good["step"] == status["checkpoint_step"] in (3, 6)  # an epoch's end
    assert all(torch.isfinite(v).all() for v in good["model"].values())
    with pytest.raises(SystemExit):
        main(["train", "mnist", "--momentum", "nan", "--out", str(tmp_path / "m")])


def test_step_cap_goes_to_adaptive_methods_only():
    from neuralode.experiments.runner import solver_options
    assert solver_options("dopri5", 10) == {"max_num_steps": 10}
    assert solver_options("rk4", 10, {"step_size": 0.1}) == {"step_size": 0.1}
    assert solver_options("implicit_adams", 10) is None
