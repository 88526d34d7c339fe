"""Training flags shared by the ``neuralode train`` commands for dynamics that stay cheap to
solve (issue 21): the regularisers of ``neuralode.regularizers`` (RNODE's kinetic energy and
Jacobian Frobenius norm, TayNODE's second derivative), STEER's random end times and
augmented dimensions; and the plot of NFE per training step.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from neuralode.experiments.runner import (
    UsageError,
    nonnegative_float,
    nonnegative_int,
    pyplot,
    save_figure,
)
from neuralode.regularizers import (
    JacobianFrobenius,
    KineticEnergy,
    Regularizer,
    SecondDerivative,
    controls_step_size,
)

__all__ = ["REGULARIZATION_KEYS", "add_regularization_arguments", "build_regularizers",
           "check_compile", "plot_nfe_per_step", "regularization_label"]

REGULARIZATION_KEYS = ("kinetic", "jacobian_frobenius", "jacobian_estimator",
                       "second_derivative", "steer", "augment_dims")
"""Config keys the flags set (they must agree between a checkpoint and ``--resume``)."""


def add_regularization_arguments(parser: argparse.ArgumentParser, *, steer: bool = True,
                                 augment: bool = True, default_estimator: str = "hutchinson",
                                 steer_help: str = "the end time T") -> None:
    """Add ``--kinetic``, ``--jacobian-frobenius``, ``--jacobian-estimator``,
    ``--second-derivative`` and (optionally) ``--steer``, ``--augment-dims``."""
    g = parser.add_argument_group(
        "regularisation (dynamics that stay cheap to solve; neuralode.regularizers)")
    g.add_argument("--kinetic", type=nonnegative_float, default=0.0, metavar="WEIGHT",
                   help="weight of the kinetic energy int ||f||^2 dt added to the loss "
                        "(RNODE, Finlay et al. 2020; default 0: off)")
    g.add_argument("--jacobian-frobenius", type=nonnegative_float, default=0.0,
                   metavar="WEIGHT",
                   help="weight of the Jacobian Frobenius norm int ||df/dz||_F^2 dt added to "
                        "the loss (RNODE; default 0: off)")
    g.add_argument("--jacobian-estimator", choices=("exact", "hutchinson"),
                   default=default_estimator,
                   help=f"how ||df/dz||_F^2 is computed: exactly (one vector-Jacobian product "
                        f"per state dimension) or by Hutchinson's estimator with one probe per "
                        f"solve (default {default_estimator})")
    g.add_argument("--second-derivative", type=nonnegative_float, default=0.0,
                   metavar="WEIGHT",
                   help="weight of int ||d^2z/dt^2||^2 dt added to the loss (TayNODE, Kelly "
                        "et al. 2020, order 2; default 0: off)")
    if steer:
        g.add_argument("--steer", type=nonnegative_float, default=0.0, metavar="B",
                       help=f"STEER (Ghosh et al. 2020): during training, draw {steer_help} "
                            f"of each solve uniformly from [T - B, T + B]; evaluation uses T "
                            f"(default 0: off)")
    if augment:
        g.add_argument("--augment-dims", type=nonnegative_int, default=0, metavar="K",
                       help="augmented neural ODE (Dupont et al. 2019): append K zero "
                            "channels to the ODE's state (default 0: off)")


def build_regularizers(cfg: dict[str, Any]) -> list[Regularizer]:
    """The regularisers the config's weights switch on (an empty list: none)."""
    regs: list[Regularizer] = []
    if cfg.get("kinetic", 0.0) > 0:
        regs.append(KineticEnergy(weight=cfg["kinetic"]))
    if cfg.get("jacobian_frobenius", 0.0) > 0:
        regs.append(JacobianFrobenius(cfg.get("jacobian_estimator", "hutchinson"),
                                      weight=cfg["jacobian_frobenius"]))
    if cfg.get("second_derivative", 0.0) > 0:
        regs.append(SecondDerivative(weight=cfg["second_derivative"]))
    return regs


def check_compile(cfg: dict[str, Any], args: argparse.Namespace) -> None:
    """Refuse ``--compile`` with a regulariser and an adaptive method before the run starts:
    :func:`neuralode.regularizers.regularized_solve` would refuse the compiled solve, because
    the integrals stay out of the step-size control (fixed grids compile)."""
    regs = build_regularizers(cfg)
    if getattr(args, "compile", False) and regs and cfg.get("method") is not None \
            and controls_step_size(cfg["method"]):
        flags = ", ".join("--" + r.name.replace("_", "-") for r in regs)
        raise UsageError(
            f"--compile cannot run the regularisers ({flags}) with the adaptive method "
            f"{cfg['method']}: their integrals stay out of the step-size control, which the "
            f"compiled solve does not serve; drop --compile or the regulariser flags, or "
            f"choose a fixed-grid --method")


def regularization_label(cfg: dict[str, Any]) -> str:
    """A short description, e.g. ``kinetic 0.01 + jacobian 0.01 + steer 0.25`` (``none``)."""
    parts = []
    for key, name in (("kinetic", "kinetic"), ("jacobian_frobenius", "jacobian"),
                      ("second_derivative", "second-derivative"), ("steer", "steer"),
                      ("augment_dims", "augment")):
        v = cfg.get(key) or 0
        if v:
            parts.append(f"{name} {v:g}")
    return " + ".join(parts) or "none"


def plot_nfe_per_step(history: Sequence[dict[str, Any]], path: Path, *, x_key: str = "iter",
                      title: str = "") -> bool:
    """NFE per training step (forward, and backward where recorded) against ``x_key``;
    False (no file) when the history has no NFE."""
    xs = [r[x_key] for r in history if r.get("nfe_forward") is not None]
    if not xs:
        return False
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(xs, [r["nfe_forward"] for r in history if r.get("nfe_forward") is not None],
            label="forward", lw=1)
    back = [(r[x_key], r["nfe_backward"]) for r in history if r.get("nfe_backward") is not None]
    if back:
        ax.plot([b[0] for b in back], [b[1] for b in back], label="backward", lw=1)
    ax.set_xlabel(x_key)
    ax.set_ylabel("NFE per training step")
    ax.legend()
    save_figure(fig, path, title=title)
    return True
