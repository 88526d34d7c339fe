"""Run the test suites of public libraries that call torchdiffeq, unchanged, twice: with the
real torchdiffeq, then with ``import torchdiffeq`` resolving to neuralode (the shim package
of ``tools/torchdiffeq_compat.py``, first on ``PYTHONPATH``), and print the counts side by
side with every failure's first line.

    python tools/client_suites.py --clients DIR [--python PY] [--neuralode ROOT]
        [--only torchcde,strnn] [--timeout 1800] [--json report.json]

DIR holds each client's checkout (its public repository as it is) under the directory name
given in ``CLIENTS``; PY is an interpreter that has torch, pytest, the real torchdiffeq and
the clients' own dependencies (default: this one). The checkouts are never modified: each
suite runs from its checkout with the checkout on ``PYTHONPATH`` and pytest's cache off.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from torchdiffeq_compat import build_shim


@dataclass(frozen=True)
class Client:
    repo: str  # owner/name on GitHub
    directory: str  # the checkout's directory name under --clients
    tests: tuple[str, ...]  # pytest arguments, relative to the checkout
    uses: str  # how the library calls torchdiffeq


CLIENTS = {
    "torchcde": Client(
        "patrick-kidger/torchcde", "torchcde", ("test",),
        "cdeint: torchdiffeq.odeint / odeint_adjoint of a spline-driven vector field, "
        "adjoint_params including the spline coefficients"),
    "torchdyn": Client(
        "DiffEqML/torchdyn", "torchdyn", ("test/test_sensitivity.py",),
        "its adjoint tests use torchdiffeq.odeint_adjoint as the reference solution "
        "(the only torchdyn tests that import torchdiffeq)"),
    "strnn": Client(
        "rgklab/StructuredNNs", "StructuredNNs", ("test/models",),
        "continuous normalising flows (FFJORD's CNF on torchdiffeq.odeint_adjoint with "
        "t as a parameter); odenets tested with torchdiffeq.odeint"),
}


def commit_of(path: Path) -> str:
    proc = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True,
                          text=True, check=False)
    if proc.returncode == 0:
        return proc.stdout.strip()
    marker = path / ".commit"  # an exported snapshot may record its commit here
    return marker.read_text().strip() if marker.exists() else "unknown"


def run_suite(python: str, checkout: Path, client: Client, shim: Path | None,
              neuralode: Path | None, timeout: float, work: Path, label: str) -> dict:
    """pytest on the client's tests; counts and failures from its JUnit XML."""
    xml = work / f"{client.directory}-{label}.xml"
    env = dict(os.environ)
    parts = ([str(shim)] if shim is not None else []) + [str(checkout)]
    if shim is not None and neuralode is not None:
        parts.append(str(neuralode))
    if env.get("PYTHONPATH"):
        parts.append(env["PYTHONPATH"])
    env.update(PYTHONPATH=os.pathsep.join(parts), MPLBACKEND="Agg", PYTHONDONTWRITEBYTECODE="1",
               WANDB_MODE="disabled")
    cmd = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
           f"--junitxml={xml}", *client.tests]
    t0 = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=checkout, env=env, capture_output=True, text=True,
                              timeout=timeout, check=False)
        tail = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()][-1:]
    except subprocess.TimeoutExpired:
        tail = ["timed out"]
    counts: Counter = Counter()
    failures = []
    if xml.exists():
        for case in ET.parse(xml).getroot().iter("testcase"):
            name = f"{case.get('classname')}::{case.get('name')}"
            bad = case.find("failure")
            if bad is None:
                bad = case.find("error")
            if bad is not None:
                counts["failed" if bad.tag == "failure" else "errors"] += 1
                msg = (bad.get("message") or bad.text or "").strip().splitlines()
                failures.append((name, msg[0][:200] if msg else ""))
            elif case.find("skipped") is not None:
                counts["skipped"] += 1
            else:
                counts["passed"] += 1
    return {"counts": dict(counts), "failures": failures, "tail": tail[0] if tail else "",
            "seconds": round(time.monotonic() - t0, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=Path, required=True,
                    help="directory holding the clients' checkouts")
    ap.add_argument("--python", default=sys.executable,
                    help="interpreter with torch, pytest, torchdiffeq and the clients' deps")
    ap.add_argument("--neuralode", type=Path, default=Path(__file__).resolve().parents[1],
                    help="neuralode checkout to put behind the shim")
    ap.add_argument("--only", default=",".join(CLIENTS), help="comma-separated client names")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per suite run")
    ap.add_argument("--json", type=Path, help="write the full report here")
    args = ap.parse_args(argv)
    names = [n for n in args.only.split(",") if n]
    unknown = sorted(set(names) - set(CLIENTS))
    if unknown:
        ap.error(f"unknown clients {unknown}; known: {sorted(CLIENTS)}")
    report = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        shim = build_shim(work)
        for name in names:
            client = CLIENTS[name]
            checkout = (args.clients / client.directory).resolve()
            if not checkout.is_dir():
                print(f"{name}: no checkout at {checkout} (github:{client.repo})")
                continue
            entry = {"repo": client.repo, "commit": commit_of(checkout), "tests": client.tests}
            for label, sh in (("torchdiffeq", None), ("neuralode", shim)):
                res = run_suite(args.python, checkout, client, sh, args.neuralode.resolve(),
                                args.timeout, work, label)
                entry[label] = res
                print(f"{name} [{label}]: {res['counts']} ({res['seconds']} s) {res['tail']}",
                      flush=True)
            report[name] = entry
    print("\n| library | commit | tests | torchdiffeq pass / fail / error / skip | "
          "neuralode pass / fail / error / skip |")
    print("|---|---|---|---|---|")
    for e in report.values():
        def cell(res):
            c = res["counts"]
            return (f"{c.get('passed', 0)} / {c.get('failed', 0)} / {c.get('errors', 0)} / "
                    f"{c.get('skipped', 0)}")
        print(f"| {e['repo']} | `{e['commit'][:12]}` | {' '.join(e['tests'])} | "
              f"{cell(e['torchdiffeq'])} | {cell(e['neuralode'])} |")
    for name, e in report.items():
        for label in ("torchdiffeq", "neuralode"):
            for test, msg in e[label]["failures"]:
                print(f"{name} [{label}] {test}: {msg}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
