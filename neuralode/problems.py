"""Standard stiff test problems as ``nn.Module``\\s: Robertson, Van der Pol, HIRES, OREGO.

Each problem is ``dy/dt = f(t, y)`` with its rate constants held in one tensor (a buffer, or
a parameter with ``learnable=True``; plain values or their logarithms with ``log=True``),
its standard initial state ``y0`` and time span ``(t0, t1)``, and

* ``forward(t, y)`` / ``func(t, y)``: the right-hand side for a state of shape ``(n,)`` or a
  batch of independent systems ``(B, n)``; constants of shape ``(P,)`` are shared by the
  batch, constants of shape ``(B, P)`` give every system its own;
* ``jacobian(t, y)``: the analytic Jacobian ``df/dy``, ``(n, n)`` or ``(B, n, n)`` (the
  block-diagonal of a batch, one block per system);
* ``numpy_func`` / ``numpy_jacobian``: the same for one system as NumPy arrays (what scipy
  is given in the benchmarks and the reference);
* ``reference(t_eval)``: a reference solution by scipy's Radau IIA (rtol 1e-12 by default,
  the analytic Jacobian, restarted at every output time so that every value is a step end
  rather than a dense-output value), computed on first use and cached in memory.

The problems (equations as in Hairer & Wanner, *Solving ODEs II*, and the Test Set for IVP
Solvers of the University of Bari):

* ``Robertson`` (3 species; k1 = 0.04, k2 = 3e7, k3 = 1e4; t in [0, 1e5]):
      y1' = -k1 y1 + k3 y2 y3,  y2' = k1 y1 - k3 y2 y3 - k2 y2^2,  y3' = k2 y2^2.
* ``VanDerPol`` (mu = 1000; y0 = (2, 0); t in [0, 3000]): x' = v, v' = mu (1 - x^2) v - x.
* ``Hires`` (8 species; t in [0, 321.8122]): plant physiology, ten constants.
* ``Oregonator`` (3 species; s = 77.27, q = 8.375e-6, w = 0.161; y0 = (1, 2, 3);
  t in [0, 360]): the Belousov-Zhabotinskii reaction.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from neuralode.errors import ODEInputError, StepSizeError

__all__ = [
    "PROBLEMS",
    "Hires",
    "Oregonator",
    "Robertson",
    "StiffProblem",
    "VanDerPol",
    "make_problem",
]

REFERENCE_CACHE_SIZE = 32


def _matrix(rows: list[list], like: Tensor) -> Tensor:
    """Stack nested rows of entries (tensors of the batch shape, or numbers) into a
    ``(*batch, n, n)`` matrix shaped and typed like ``like`` (a ``(*batch,)`` tensor)."""
    entries = [[e if isinstance(e, Tensor) else torch.full_like(like, float(e)) for e in row]
               for row in rows]
    entries = [[e.expand_as(like) for e in row] for row in entries]
    return torch.stack([torch.stack(row, -1) for row in entries], -2)


class StiffProblem(nn.Module):
    """Base of the test problems. Subclasses set the class attributes and implement
    ``_f(c, y)``, ``_jac(c, y)`` (torch, ``c`` the constants unbound along their last dim,
    ``y`` the state's components; or override ``func`` / ``jacobian`` with fewer tensor
    operations) and, where those expressions do not serve NumPy values too, ``_np_f``,
    ``_np_jac`` (NumPy, one system)."""

    name: ClassVar[str] = ""
    #: names of the state's components and of the constants
    species: ClassVar[tuple[str, ...]] = ()
    constant_names: ClassVar[tuple[str, ...]] = ()
    defaults: ClassVar[tuple[float, ...]] = ()
    y0_default: ClassVar[tuple[float, ...]] = ()
    t_span: ClassVar[tuple[float, float]] = (0.0, 1.0)
    #: absolute tolerance of the reference solve (its rtol is 1e-12)
    reference_atol: ClassVar[float] = 1e-14
    #: the absolute tolerance the benchmarks pair with a relative tolerance: atol_ratio * rtol
    atol_ratio: ClassVar[float] = 1.0

    constants_param: Tensor
    y0: Tensor

    def __init__(self, constants: Sequence | Tensor | None = None, *, log: bool = False,
                 learnable: bool = False, dtype: torch.dtype = torch.float64):
        super().__init__()
        p = len(self.constant_names)
        c = torch.as_tensor(self.defaults if constants is None else constants, dtype=dtype)
        if c.dim() not in (1, 2) or c.shape[-1] != p:
            raise ODEInputError(f"{self.name}: the constants must have shape ({p},) or (B, {p}) "
                                f"({', '.join(self.constant_names)}), got {tuple(c.shape)}")
        if not bool(torch.isfinite(c).all()):
            raise ODEInputError(f"{self.name}: the constants must be finite, got {c.tolist()}")
        if log and bool((c <= 0).any()):
            raise ODEInputError(f"{self.name}: log=True needs positive constants, got "
                                f"{c.tolist()}")
        self.log = bool(log)
        theta = torch.log(c) if log else c.clone()
        if learnable:
            self.constants_param = nn.Parameter(theta)
        else:
            self.register_buffer("constants_param", theta)
        self.register_buffer("y0", torch.tensor(self.y0_default, dtype=dtype))
        self._reference_cache: OrderedDict = OrderedDict()

    # ------------------------------------------------------------------ constants and shapes
    @property
    def n(self) -> int:
        return len(self.species)

    @property
    def t0(self) -> float:
        return self.t_span[0]

    @property
    def t1(self) -> float:
        return self.t_span[1]

    @property
    def constants(self) -> Tensor:
        """The constants in their plain (not logarithmic) values, ``(P,)`` or ``(B, P)``."""
        return self.constants_param.exp() if self.log else self.constants_param

    @property
    def batch_size(self) -> int | None:
        """B when every system of a batch has its own constants, else None."""
        c = self.constants_param
        return c.shape[0] if c.dim() == 2 else None

    def initial_state(self, batch: int | None = None) -> Tensor:
        """The standard ``y0``, ``(n,)``, or repeated for a batch, ``(batch, n)``."""
        batch = self.batch_size if batch is None else batch
        return self.y0.clone() if batch is None else self.y0.expand(batch, self.n).clone()

    def tolerances(self, rtol: float) -> tuple[float, float]:
        """``(rtol, atol)`` as the benchmarks pair them for this problem."""
        return rtol, self.atol_ratio * rtol

    def _checked(self, y: Tensor) -> Tensor:
        """The constants ``(P,)`` or ``(B, P)`` in ``y``'s dtype and device, after checking
        the state's shape."""
        if not isinstance(y, Tensor) or y.dim() not in (1, 2) or y.shape[-1] != self.n:
            shape = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
            raise ODEInputError(f"{self.name}: the state must have shape ({self.n},) or "
                                f"(B, {self.n}), got {shape}")
        b = self.batch_size
        if b is not None and (y.dim() != 2 or y.shape[0] != b):
            raise ODEInputError(f"{self.name}: the constants are per system for a batch of {b}; "
                                f"the state must have shape ({b}, {self.n}), got "
                                f"{tuple(y.shape)}")
        c = self.constants
        if c.dtype != y.dtype or c.device != y.device:
            c = c.to(dtype=y.dtype, device=y.device)
        return c

    # ------------------------------------------------------------------ the ODE
    def forward(self, t, y: Tensor) -> Tensor:
        return self.func(t, y)

    def func(self, t, y: Tensor) -> Tensor:
        """dy/dt at ``y`` of shape ``(n,)`` or ``(B, n)``."""
        c = self._checked(y)
        return torch.stack(self._f(c.unbind(-1), y.unbind(-1)), -1)

    def jacobian(self, t, y: Tensor) -> Tensor:
        """df/dy at ``y``: ``(n, n)`` for ``(n,)``; ``(B, n, n)`` (one block per system) for
        ``(B, n)``."""
        c = self._checked(y)
        return _matrix(self._jac(c.unbind(-1), y.unbind(-1)), y[..., 0])

    def _f(self, c, y) -> list[Tensor]:
        raise NotImplementedError

    def _jac(self, c, y) -> list[list]:
        raise NotImplementedError

    def _sample_constants(self, index: int | None = None) -> tuple[float, ...]:
        c = self.constants.detach().to("cpu", torch.float64)
        if c.dim() == 2:
            if index is None:
                raise ODEInputError(f"{self.name}: the constants are per system; name the system")
            c = c[index]
        return tuple(c.tolist())

    def numpy_func(self, t: float, y: np.ndarray, index: int | None = None) -> np.ndarray:
        """dy/dt for one system (``index``: which system of a per-system batch)."""
        return np.asarray(self._np_f(self._sample_constants(index), y), dtype=np.float64)

    def numpy_jacobian(self, t: float, y: np.ndarray, index: int | None = None) -> np.ndarray:
        return np.asarray(self._np_jac(self._sample_constants(index), y), dtype=np.float64)

    def numpy_callables(self, index: int | None = None):
        """``(fun(t, y), jac(t, y))`` for scipy, with the constants bound once (fast)."""
        c = self._sample_constants(index)
        np_f, np_jac = self._np_f, self._np_jac
        return (lambda t, y: np_f(c, y)), (lambda t, y: np.asarray(np_jac(c, y)))

    def _np_f(self, c, y):
        """dy/dt of one system for NumPy (``c`` the constants, ``y`` the state): by default
        :meth:`_f`'s expressions on NumPy values."""
        return np.array(self._f(c, y))

    def _np_jac(self, c, y):
        """df/dy of one system for NumPy: by default :meth:`_jac`'s entries."""
        return self._jac(c, y)

    # ------------------------------------------------------------------ reference solution
    def reference(self, t_eval, y0: Tensor | None = None, *, rtol: float = 1e-12,
                  atol: float | None = None) -> Tensor:
        """The solution at ``t_eval`` (1-D, increasing, from ``t0`` on; later than ``t1`` is
        allowed) by scipy's Radau with the analytic Jacobian, integrated from ``t0`` to each
        output time in turn: float64, ``(T, n)``, or ``(T, B, n)`` for a batch (``y0`` of
        shape ``(B, n)``, or constants per system). Cached in memory per times, ``y0``,
        constants and tolerances (the last 32)."""
        from scipy.integrate import Radau

        ts = np.asarray(torch.as_tensor(t_eval, dtype=torch.float64).detach().cpu(),
                        dtype=np.float64)
        if ts.ndim != 1 or ts.size == 0:
            raise ODEInputError(f"{self.name}.reference: t_eval must be a non-empty 1-D sequence "
                                f"of times, got shape {ts.shape}")
        if not np.isfinite(ts).all() or (np.diff(ts) <= 0).any() or ts[0] < self.t0:
            raise ODEInputError(f"{self.name}.reference: t_eval must be finite, strictly "
                                f"increasing and >= t0 = {self.t0}, got {ts.tolist()[:6]}")
        atol = self.reference_atol if atol is None else float(atol)
        y0_t = self.y0 if y0 is None else torch.as_tensor(y0, dtype=torch.float64)
        y0_np = np.asarray(y0_t.detach().to("cpu", torch.float64), dtype=np.float64)
        if y0_np.ndim not in (1, 2) or y0_np.shape[-1] != self.n:
            raise ODEInputError(f"{self.name}.reference: y0 must have shape ({self.n},) or "
                                f"(B, {self.n}), got {y0_np.shape}")
        consts = self.constants.detach().to("cpu", torch.float64).numpy()
        batch = self.batch_size
        if y0_np.ndim == 2:
            if batch is not None and batch != y0_np.shape[0]:
                raise ODEInputError(f"{self.name}.reference: y0 has {y0_np.shape[0]} systems, "
                                    f"the constants {batch}")
            batch = y0_np.shape[0]
        key = (ts.tobytes(), y0_np.tobytes(), y0_np.shape, consts.tobytes(), float(rtol), atol)
        hit = self._reference_cache.get(key)
        if hit is not None:
            self._reference_cache.move_to_end(key)
            return hit.clone()
        if batch is None:
            out = self._reference_one(ts, y0_np, None, rtol, atol, Radau)
        else:
            rows = [self._reference_one(ts, y0_np if y0_np.ndim == 1 else y0_np[i],
                                        i if self.batch_size is not None else None,
                                        rtol, atol, Radau)
                    for i in range(batch)]
            out = np.stack(rows, 1)
        result = torch.from_numpy(out)
        self._reference_cache[key] = result
        while len(self._reference_cache) > REFERENCE_CACHE_SIZE:
            self._reference_cache.popitem(last=False)
        return result.clone()

    def _reference_one(self, ts, y0, index, rtol, atol, radau_cls) -> np.ndarray:
        fun, jac = self.numpy_callables(index)
        out = np.empty((ts.size, self.n))
        t, y = self.t0, np.array(y0, dtype=np.float64)
        h = None
        for k, t_out in enumerate(ts):
            if t_out > t:
                span = t_out - t
                solver = radau_cls(fun, t, y, t_out, rtol=rtol, atol=atol, jac=jac,
                                   first_step=None if h is None else min(h, span))
                while solver.status == "running":
                    h_full = solver.h_abs
                    solver.step()
                if solver.status != "finished":
                    raise StepSizeError(f"{self.name}.reference: scipy Radau failed between "
                                        f"t={t:g} and t={t_out:g}: {solver.status}")
                t, y = t_out, solver.y.copy()
                h = h_full if math.isfinite(h_full) and h_full > 0 else None
            out[k] = y
        return out

    def extra_repr(self) -> str:
        c = self.constants.detach()
        shown = (", ".join(f"{n}={v:.6g}" for n, v in zip(self.constant_names, c.tolist()))
                 if c.dim() == 1 else f"{c.shape[0]} systems")
        return f"{shown}, log={self.log}"


class Robertson(StiffProblem):
    """Robertson's chemical kinetics (1966), the classic stiff test:
    A -> B (k1), B + B -> C + B (k2), B + C -> A + C (k3)."""

    name = "robertson"
    species = ("y1", "y2", "y3")
    constant_names = ("k1", "k2", "k3")
    defaults = (0.04, 3e7, 1e4)
    y0_default = (1.0, 0.0, 0.0)
    t_span = (0.0, 1e5)
    reference_atol = 1e-24
    atol_ratio = 1e-6

    def __init__(self, k1=0.04, k2=3e7, k3=1e4, *, log: bool = False, learnable: bool = False,
                 dtype: torch.dtype = torch.float64):
        ks = torch.broadcast_tensors(*(torch.as_tensor(k, dtype=dtype) for k in (k1, k2, k3)))
        super().__init__(torch.stack(ks, -1), log=log, learnable=learnable, dtype=dtype)
        # f = rates @ S^T, rates = (k1 y1, k2 y2^2, k3 y2 y3): one row per reaction
        self.register_buffer("stoich_t", torch.tensor(
            [[-1.0, 1.0, 0.0], [0.0, -1.0, 1.0], [1.0, -1.0, 0.0]], dtype=dtype),
            persistent=False)

    def func(self, t, y: Tensor) -> Tensor:
        c = self._checked(y)
        y2 = y[..., 1:2]
        rates = c * torch.cat([y[..., :1], y2 * y2, y2 * y[..., 2:]], -1)
        s = self.stoich_t
        return rates @ (s if s.dtype == y.dtype and s.device == y.device else s.to(y))

    def _jac(self, c, y):
        k1, k2, k3 = c
        _, y2, y3 = y
        return [[-k1, k3 * y3, k3 * y2],
                [k1, -k3 * y3 - 2 * k2 * y2, -k3 * y2],
                [0.0, 2 * k2 * y2, 0.0]]

    @staticmethod
    def _np_f(c, y):
        k1, k2, k3 = c
        a, b, r = k1 * y[0], k2 * y[1] * y[1], k3 * y[1] * y[2]
        return np.array([r - a, a - r - b, b])


class VanDerPol(StiffProblem):
    """Van der Pol's oscillator x'' = mu (1 - x^2) x' - x as the system (x, v = x')."""

    name = "vdp"
    species = ("x", "v")
    constant_names = ("mu",)
    defaults = (1000.0,)
    y0_default = (2.0, 0.0)
    t_span = (0.0, 3000.0)
    reference_atol = 1e-12
    atol_ratio = 1.0

    def __init__(self, mu=1000.0, *, log: bool = False, learnable: bool = False,
                 dtype: torch.dtype = torch.float64):
        super().__init__(torch.as_tensor(mu, dtype=dtype)[..., None], log=log,
                         learnable=learnable, dtype=dtype)

    def _f(self, c, y):
        (mu,) = c
        x, v = y
        return [v, mu * (1 - x * x) * v - x]

    def _jac(self, c, y):
        (mu,) = c
        x, v = y
        return [[0.0, 1.0], [-2 * mu * x * v - 1, mu * (1 - x * x)]]


class Hires(StiffProblem):
    """HIRES: 'High Irradiance RESponse' of plant morphogenesis (Schäfer 1975), 8 species,
    constants k1..k9 and the source term oks (Hairer & Wanner II, Test Set for IVP Solvers)."""

    name = "hires"
    species = tuple(f"y{i}" for i in range(1, 9))
    constant_names = ("k1", "k2", "k3", "k4", "k5", "k6", "k7", "k8", "k9", "oks")
    defaults = (1.71, 0.43, 8.32, 0.69, 0.035, 8.32, 280.0, 0.69, 0.69, 0.0007)
    y0_default = (1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0057)
    t_span = (0.0, 321.8122)
    reference_atol = 1e-16
    atol_ratio = 1e-4
    # f = L y + oks e1 + k7 y6 y8 d: the linear part L (8 x 8) is linear in the constants,
    # L = (LINEAR @ c).reshape(8, 8); d = (0, 0, 0, 0, 0, -1, 1, -1)
    _LINEAR_TERMS = (  # (row, column, constant, sign), 0-based, constants k1..k9 = 0..8
        (0, 0, 0, -1), (0, 1, 1, 1), (0, 2, 5, 1),
        (1, 0, 0, 1), (1, 1, 1, -1), (1, 1, 2, -1),
        (2, 2, 5, -1), (2, 2, 0, -1), (2, 3, 1, 1), (2, 4, 4, 1),
        (3, 1, 2, 1), (3, 2, 0, 1), (3, 3, 3, -1), (3, 3, 1, -1),
        (4, 4, 4, -1), (4, 4, 0, -1), (4, 5, 1, 1), (4, 6, 1, 1),
        (5, 3, 7, 1), (5, 4, 0, 1), (5, 5, 1, -1), (5, 6, 7, 1),
        (6, 6, 1, -1), (6, 6, 7, -1), (6, 6, 8, -1),
        (7, 6, 1, 1), (7, 6, 7, 1), (7, 6, 8, 1))

    def __init__(self, constants=None, *, log: bool = False, learnable: bool = False,
                 dtype: torch.dtype = torch.float64):
        super().__init__(constants, log=log, learnable=learnable, dtype=dtype)
        lin = torch.zeros(64, 10, dtype=dtype)
        for i, j, k, sign in self._LINEAR_TERMS:
            lin[8 * i + j, k] += sign
        self.register_buffer("linear", lin, persistent=False)
        self.register_buffer("direction", torch.tensor([0.0] * 5 + [-1.0, 1.0, -1.0],
                                                       dtype=dtype), persistent=False)

    def _linear_part(self, c: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        lin, d = self.linear, self.direction
        if lin.dtype != y.dtype or lin.device != y.device:
            lin, d = lin.to(y), d.to(y)
        L = (c @ lin.T).reshape(*c.shape[:-1], 8, 8)
        return L, d, c[..., 6]

    def func(self, t, y: Tensor) -> Tensor:
        c = self._checked(y)
        L, d, k7 = self._linear_part(c, y)
        ly = y @ L.T if L.dim() == 2 else (L @ y[..., None])[..., 0]
        r = k7 * y[..., 5] * y[..., 7]
        src = c[..., 9]
        out = ly + r[..., None] * d
        return torch.cat([out[..., :1] + src[..., None], out[..., 1:]], -1)

    def jacobian(self, t, y: Tensor) -> Tensor:
        c = self._checked(y)
        L, d, k7 = self._linear_part(c, y)
        # d/dy of k7 y6 y8 d: column 6 gets k7 y8 d, column 8 gets k7 y6 d (1-based)
        g = torch.zeros_like(y)
        g[..., 5] = k7 * y[..., 7]
        g[..., 7] = k7 * y[..., 5]
        return L + d[:, None] * g[..., None, :]

    @staticmethod
    def _np_f(c, y):
        k1, k2, k3, k4, k5, k6, k7, k8, k9, oks = c
        y1, y2, y3, y4, y5, y6, y7, y8 = y
        r = k7 * y6 * y8
        f7 = r - (k2 + k8 + k9) * y7
        return np.array([-k1 * y1 + k2 * y2 + k6 * y3 + oks,
                         k1 * y1 - (k2 + k3) * y2,
                         -(k6 + k1) * y3 + k2 * y4 + k5 * y5,
                         k3 * y2 + k1 * y3 - (k4 + k2) * y4,
                         -(k5 + k1) * y5 + k2 * (y6 + y7),
                         -r + k8 * y4 + k1 * y5 - k2 * y6 + k8 * y7,
                         f7, -f7])

    @staticmethod
    def _np_jac(c, y):
        k1, k2, k3, k4, k5, k6, k7, k8, k9, _ = c
        y6, y8 = y[5], y[7]
        s = k2 + k8 + k9
        j = np.zeros((8, 8))
        j[0, :3] = -k1, k2, k6
        j[1, :2] = k1, -(k2 + k3)
        j[2, 2:5] = -(k6 + k1), k2, k5
        j[3, 1:4] = k3, k1, -(k4 + k2)
        j[4, 4:7] = -(k5 + k1), k2, k2
        j[5, 3:8] = k8, k1, -k7 * y8 - k2, k8, -k7 * y6
        j[6, 5:8] = k7 * y8, -s, k7 * y6
        j[7, 5:8] = -k7 * y8, s, -k7 * y6
        return j


class Oregonator(StiffProblem):
    """OREGO: the Oregonator model of the Belousov-Zhabotinskii reaction (Field & Noyes
    1974) in the scaling of Hairer & Wanner II: constants s, q, w."""

    name = "orego"
    species = ("y1", "y2", "y3")
    constant_names = ("s", "q", "w")
    defaults = (77.27, 8.375e-6, 0.161)
    y0_default = (1.0, 2.0, 3.0)
    t_span = (0.0, 360.0)
    reference_atol = 1e-12
    atol_ratio = 1.0

    def _f(self, c, y):
        s, q, w = c
        y1, y2, y3 = y
        return [s * (y2 + y1 * (1 - q * y1 - y2)), (y3 - (1 + y1) * y2) / s, w * (y1 - y3)]

    def _jac(self, c, y):
        s, q, w = c
        y1, y2, _ = y
        return [[s * (1 - 2 * q * y1 - y2), s * (1 - y1), 0.0],
                [-y2 / s, -(1 + y1) / s, 1 / s],
                [w, 0.0, -w]]


PROBLEMS: dict[str, type[StiffProblem]] = {
    cls.name: cls for cls in (Robertson, VanDerPol, Hires, Oregonator)}


def make_problem(name: str, **kwargs) -> StiffProblem:
    """The problem called ``name`` (robertson, vdp, hires, orego) with its standard constants
    unless ``kwargs`` say otherwise."""
    cls = PROBLEMS.get(name)
    if cls is None:
        raise ODEInputError(f"unknown problem {name!r}; valid problems are: "
                            f"{', '.join(PROBLEMS)}")
    return cls(**kwargs)
