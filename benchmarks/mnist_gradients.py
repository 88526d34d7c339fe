"""ODE-Net runs trained with different ``--gradient`` strategies (issue 12), side by side:
test error and NFE from each run's ``metrics.json``, training time per step, and the peak
memory and median time of one SGD step with the trained weights, each measured in a fresh
process (``neuralode.experiments.mnist_analysis.measure_training_step``: VmHWM after a
``clear_refs`` reset, minus the resident memory before the step).

    python benchmarks/mnist_gradients.py RUN_DIR [RUN_DIR ...] [--batch-size 32] [--steps 3]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from neuralode.experiments.mnist_analysis import _measure_in_subprocess


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    rows = []
    for run in args.runs:
        m = json.loads((run / "metrics.json").read_text())
        steps = m.get("step")
        meas = _measure_in_subprocess("odenet", {}, args.batch_size, args.steps, 1,
                                      str(run / "checkpoint.pt"), None)
        rows.append({"run": str(run), "gradient": m.get("gradient"),
                     "test_error": m.get("test_error"), "train_time_s": m.get("train_time_s"),
                     "steps": steps, "nfe_forward": m.get("nfe_forward"),
                     "nfe_backward": m.get("nfe_backward"), **{f"measured_{k}": v
                                                                for k, v in meas.items()}})
    print(f"\n| run | gradient | test error % | train s/step | step memory (MiB, batch "
          f"{args.batch_size}) | time/step (s, batch {args.batch_size}) | NFE fwd/bwd |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        per_step = (f"{r['train_time_s'] / r['steps']:.3f}" if r["steps"] and r["train_time_s"]
                    else "?")
        err = r["test_error"]
        err = f"{100 * err:.2f}" if isinstance(err, float) and err < 1 else f"{err}"
        print(f"| {r['run']} | {r['gradient']} | {err} | {per_step} | "
              f"{r['measured_step_memory_mib']:.0f} | {r['measured_time_per_step_s']:.3f} | "
              f"{r['measured_nfe_forward']}/{r['measured_nfe_backward']} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
