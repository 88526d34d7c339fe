"""Butcher tableaux as data.

A tableau describes one explicit Runge–Kutta step of ``s`` stages:

    k_i = f(t + c_i h, y + h * sum_j a_ij k_j),     y1 = y + h * sum_i b_i k_i

Adaptive methods add ``b_err = b - b_hat`` (the difference between the propagated
solution and the embedded one), so that ``err = h * sum_i b_err_i k_i``.

Dense output is described by a coefficient matrix ``dense`` of shape ``(s_ext, degree)``:
the interpolant on one step is

    y(t + theta h) = y + h * sum_i (sum_m dense[i, m] * theta**(m + 1)) * k_i

over the *extended* stages ``k_1..k_s, f(t + h, y1)``. For FSAL tableaux the last stage
already is ``f(t + h, y1)`` and ``s_ext == s``; otherwise ``s_ext == s + 1``.
Methods without an interpolant of their own get the cubic Hermite one, built from the
same data (``hermite_dense``), so one interpolation routine serves every method.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction as F

import numpy as np


@dataclass(frozen=True, eq=False)  # compared and hashed by identity (one object per method)
class RungeKuttaCoefficients:
    """What every Runge–Kutta tableau has (float64 numpy arrays); ``b_err = b - b_hat`` for
    an embedded pair (error estimate h sum_i b_err_i k_i)."""

    name: str
    order: int  # order of the propagated solution
    a: np.ndarray  # (s, s)
    b: np.ndarray  # (s,)
    c: np.ndarray  # (s,)
    b_err: np.ndarray | None = None  # (s,) b - b_hat; None for fixed-step methods
    error_order: int | None = None  # order of the embedded solution

    def __post_init__(self):
        s = len(self.b)
        if self.a.shape != (s, s) or self.c.shape != (s,):
            raise ValueError(f"tableau {self.name}: inconsistent shapes")

    @property
    def stages(self) -> int:
        return len(self.b)

    @property
    def adaptive(self) -> bool:
        return self.b_err is not None


@dataclass(frozen=True, eq=False)
class ButcherTableau(RungeKuttaCoefficients):
    """Coefficients of an explicit Runge–Kutta method (``a`` strictly lower triangular)."""

    dense: np.ndarray | None = None  # (s_ext, degree); filled by __post_init__ if None
    dense_name: str = "hermite"
    fsal: bool = field(init=False)

    def __post_init__(self):
        super().__post_init__()
        # FSAL: the last stage is evaluated at (t + h, y1).
        fsal = bool(len(self.b) > 1 and self.c[-1] == 1.0
                    and np.allclose(self.a[-1], self.b, atol=0, rtol=0))
        object.__setattr__(self, "fsal", fsal)
        if self.dense is None:
            object.__setattr__(self, "dense", hermite_dense(self.b, fsal))


def _arr(rows, n=None) -> np.ndarray:
    return np.array([float(x) for x in rows], dtype=np.float64)


def _lower(rows: list[list]) -> np.ndarray:
    s = len(rows) + 1
    a = np.zeros((s, s), dtype=np.float64)
    for i, row in enumerate(rows, start=1):
        for j, v in enumerate(row):
            a[i, j] = float(v)
    return a


def hermite_dense(b: np.ndarray, fsal: bool) -> np.ndarray:
    """Cubic Hermite interpolant through (y0, f0) and (y1, f1) in the extended-stage form.

    With d = y1 - y0 = h sum b_i k_i, f0 = k_1, f1 = k_ext:
      y(theta) - y0 = h [ (theta - 2 theta^2 + theta^3) f0 + (3 theta^2 - 2 theta^3) sum b_i k_i
                          + (theta^3 - theta^2) f1 ]
    """
    s = len(b)
    s_ext = s if fsal else s + 1
    bb = np.zeros(s_ext)
    bb[:s] = b
    e0 = np.zeros(s_ext)
    e0[0] = 1.0
    e1 = np.zeros(s_ext)
    e1[-1] = 1.0
    # columns: theta^1, theta^2, theta^3
    return np.stack([e0, -2 * e0 + 3 * bb - e1, e0 - 2 * bb + e1], axis=1)


# ----------------------------------------------------------------------------------------
# Fixed-step methods
# ----------------------------------------------------------------------------------------
EULER = ButcherTableau("euler", 1, _lower([]), _arr([1]), _arr([0]))
MIDPOINT = ButcherTableau("midpoint", 2, _lower([[F(1, 2)]]), _arr([0, 1]), _arr([0, F(1, 2)]))
HEUN2 = ButcherTableau("heun2", 2, _lower([[1]]), _arr([F(1, 2), F(1, 2)]), _arr([0, 1]))
HEUN3 = ButcherTableau(
    "heun3", 3, _lower([[F(1, 3)], [0, F(2, 3)]]), _arr([F(1, 4), 0, F(3, 4)]),
    _arr([0, F(1, 3), F(2, 3)]),
)
# The 3/8 rule (Kutta 1901); torchdiffeq's "rk4".
RK4_38 = ButcherTableau(
    "rk4", 4, _lower([[F(1, 3)], [F(-1, 3), 1], [1, -1, 1]]),
    _arr([F(1, 8), F(3, 8), F(3, 8), F(1, 8)]), _arr([0, F(1, 3), F(2, 3), 1]),
)
RK4_CLASSIC = ButcherTableau(
    "rk4_classic", 4, _lower([[F(1, 2)], [0, F(1, 2)], [0, 0, 1]]),
    _arr([F(1, 6), F(1, 3), F(1, 3), F(1, 6)]), _arr([0, F(1, 2), F(1, 2), 1]),
)

# ----------------------------------------------------------------------------------------
# Adaptive embedded pairs
# ----------------------------------------------------------------------------------------
ADAPTIVE_HEUN = ButcherTableau(
    "adaptive_heun", 2, _lower([[1]]), _arr([F(1, 2), F(1, 2)]), _arr([0, 1]),
    b_err=_arr([F(1, 2) - 1, F(1, 2)]), error_order=1,
)

# Fehlberg's RK2(1) (3 stages); the order-2 solution is propagated.
FEHLBERG2 = ButcherTableau(
    "fehlberg2", 2, _lower([[F(1, 2)], [F(1, 256), F(255, 256)]]),
    _arr([F(1, 512), F(255, 256), F(1, 512)]), _arr([0, F(1, 2), 1]),
    b_err=_arr([F(1, 512) - F(1, 256), 0, F(1, 512)]), error_order=1,
)

# Bogacki–Shampine 3(2), FSAL; its natural interpolant is the cubic Hermite one.
BOSH3 = ButcherTableau(
    "bosh3", 3, _lower([[F(1, 2)], [0, F(3, 4)], [F(2, 9), F(1, 3), F(4, 9)]]),
    _arr([F(2, 9), F(1, 3), F(4, 9), 0]), _arr([0, F(1, 2), F(3, 4), 1]),
    b_err=_arr([F(2, 9) - F(7, 24), F(1, 3) - F(1, 4), F(4, 9) - F(1, 3), F(-1, 8)]),
    error_order=2,
)


def _dopri5() -> ButcherTableau:
    a = _lower([
        [F(1, 5)],
        [F(3, 40), F(9, 40)],
        [F(44, 45), F(-56, 15), F(32, 9)],
        [F(19372, 6561), F(-25360, 2187), F(64448, 6561), F(-212, 729)],
        [F(9017, 3168), F(-355, 33), F(46732, 5247), F(49, 176), F(-5103, 18656)],
        [F(35, 384), 0, F(500, 1113), F(125, 192), F(-2187, 6784), F(11, 84)],
    ])
    b = a[-1].copy()
    # Embedded 4th-order solution: the alternative weights that torchdiffeq uses, so that a
    # solve switched over from torchdiffeq takes the same steps. Hairer's (and scipy's)
    # weights (5179/57600, 0, 7571/16695, 393/640, -92097/339200, 187/2100, 1/40) give a
    # ~1.5x larger error estimate: ~7% more evaluations for ~1.4x smaller errors at the same
    # tolerance (measured on five problems at rtol = atol = 1e-4..1e-10).
    b_hat = _arr([F(1951, 21600), 0, F(22642, 50085), F(451, 720), F(-12231, 42400),
                  F(649, 6300), F(1, 60)])
    c = _arr([0, F(1, 5), F(3, 10), F(4, 5), F(8, 9), 1, 1])
    # Shampine's 4th-order continuous extension (Hairer, Norsett & Wanner, II.6):
    # y(theta) - y0 = h [theta b + theta(1-theta) B + theta^2(1-theta) C + theta^2(1-theta)^2 d]
    # with B = e1 - b, C = 2b - e1 - e7 and the d coefficients below.
    d = _arr([F(-12715105075, 11282082432), 0, F(87487479700, 32700410799),
              F(-10690763975, 1880347072), F(701980252875, 199316789632),
              F(-1453857185, 822651844), F(69997945, 29380423)])
    e1 = np.eye(7)[0]
    e7 = np.eye(7)[6]
    terms = [  # (vector, polynomial coefficients in theta, lowest power first, from theta^0)
        (b, [0, 1]),
        (e1 - b, [0, 1, -1]),
        (2 * b - e1 - e7, [0, 0, 1, -1]),
        (d, [0, 0, 1, -2, 1]),
    ]
    dense = np.zeros((7, 4))
    for vec, poly in terms:
        for power, coef in enumerate(poly):
            if power and coef:
                dense[:, power - 1] += coef * vec
    return ButcherTableau("dopri5", 5, a, b, c, b_err=b - b_hat, error_order=4, dense=dense,
                          dense_name="4th-order continuous extension")


DOPRI5 = _dopri5()


def _tsit5() -> ButcherTableau:
    # Tsitouras (2011), "Runge–Kutta pairs of order 5(4) satisfying only the first column
    # simplifying assumption", Comput. Math. Appl. 62, 770–775.
    a = _lower([
        [0.161],
        [-0.008480655492356989, 0.335480655492357],
        [2.897153057105493, -6.359448489975075, 4.3622954328695815],
        [5.325864828439257, -11.748883564062828, 7.4955393428898365, -0.09249506636175525],
        [5.86145544294642, -12.92096931784711, 8.159367898576159, -0.071584973281401,
         -0.028269050394068383],
        [0.09646076681806523, 0.01, 0.4798896504144996, 1.379008574103742, -3.290069515436081,
         2.324710524099774],
    ])
    b = a[-1].copy()
    c = _arr([0, 0.161, 0.327, 0.9, 0.9800255409045097, 1, 1])
    b_err = _arr([-0.00178001105222577714, -0.0008164344596567469, 0.007880878010261995,
                  -0.1447110071732629, 0.5823571654525552, -0.45808210592918697,
                  0.015151515151515152])
    # The paper's 4th-order dense output b_i(theta), written as polynomials in theta.
    polys = [
        -1.0530884977290216 * np.polymul(np.polymul([1, 0], [1, -1.3299890189751412]),
                                         [1, -1.4364028541716351, 0.7139816917074209]),
        0.1017 * np.polymul([1, 0, 0], [1, -2.1966568338249754, 1.2949852507374631]),
        2.490627285651252793 * np.polymul([1, 0, 0], [1, -2.38535645472061657,
                                                      1.57803468208092486]),
        -16.54810288924490272 * np.polymul(np.polymul([1, -1.21712927295533244],
                                                      [1, -0.61620406037800089]), [1, 0, 0]),
        47.37952196281928122 * np.polymul(np.polymul([1, -1.203071208372362603],
                                                     [1, -0.658047292653547382]), [1, 0, 0]),
        -34.87065786149660974 * np.polymul(np.polymul([1, -1.2], [1, -0.666666666666666667]),
                                           [1, 0, 0]),
        2.5 * np.polymul(np.polymul([1, -1], [1, -0.6]), [1, 0, 0]),
    ]
    dense = np.zeros((7, 4))
    for i, p in enumerate(polys):
        coeffs = np.asarray(p)[::-1]  # lowest power first
        assert abs(coeffs[0]) < 1e-14
        dense[i, : len(coeffs) - 1] = coeffs[1:]
    return ButcherTableau("tsit5", 5, a, b, c, b_err=b_err, error_order=4, dense=dense,
                          dense_name="Tsitouras 4th-order dense output")


TSIT5 = _tsit5()


def _dopri8() -> ButcherTableau:
    # Prince & Dormand (1981) RK8(7)13M, the pair torchdiffeq calls "dopri8". Not FSAL:
    # the interpolant uses a 14th extended stage f(t + h, y1).
    c = _arr([0, F(1, 18), F(1, 12), F(1, 8), F(5, 16), F(3, 8), F(59, 400), F(93, 200),
              F(5490023248, 9719169821), F(13, 20), F(1201146811, 1299019798), 1, 1])
    a = _lower([
        [F(1, 18)],
        [F(1, 48), F(1, 16)],
        [F(1, 32), 0, F(3, 32)],
        [F(5, 16), 0, F(-75, 64), F(75, 64)],
        [F(3, 80), 0, 0, F(3, 16), F(3, 20)],
        [F(29443841, 614563906), 0, 0, F(77736538, 692538347), F(-28693883, 1125000000),
         F(23124283, 1800000000)],
        [F(16016141, 946692911), 0, 0, F(61564180, 158732637), F(22789713, 633445777),
         F(545815736, 2771057229), F(-180193667, 1043307555)],
        [F(39632708, 573591083), 0, 0, F(-433636366, 683701615), F(-421739975, 2616292301),
         F(100302831, 723423059), F(790204164, 839813087), F(800635310, 3783071287)],
        [F(246121993, 1340847787), 0, 0, F(-37695042795, 15268766246),
         F(-309121744, 1061227803), F(-12992083, 490766935), F(6005943493, 2108947869),
         F(393006217, 1396673457), F(123872331, 1001029789)],
        [F(-1028468189, 846180014), 0, 0, F(8478235783, 508512852), F(1311729495, 1432422823),
         F(-10304129995, 1701304382), F(-48777925059, 3047939560), F(15336726248, 1032824649),
         F(-45442868181, 3398467696), F(3065993473, 597172653)],
        [F(185892177, 718116043), 0, 0, F(-3185094517, 667107341), F(-477755414, 1098053517),
         F(-703635378, 230739211), F(5731566787, 1027545527), F(5232866602, 850066563),
         F(-4093664535, 808688257), F(3962137247, 1805957418), F(65686358, 487910083)],
        [F(403863854, 491063109), 0, 0, F(-5068492393, 434740067), F(-411421997, 543043805),
         F(652783627, 914296604), F(11173962825, 925320556), F(-13158990841, 6184727034),
         F(3936647629, 1978049680), F(-160528059, 685178525), F(248638103, 1413531060), 0],
    ])
    b = _arr([F(14005451, 335480064), 0, 0, 0, 0, F(-59238493, 1068277825),
              F(181606767, 758867731), F(561292985, 797845732), F(-1041891430, 1371343529),
              F(760417239, 1151165299), F(118820643, 751138087), F(-528747749, 2220607170),
              F(1, 4)])
    b_hat = _arr([F(13451932, 455176623), 0, 0, 0, 0, F(-808719846, 976000145),
                  F(1757004468, 5645159321), F(656045339, 265891186),
                  F(-3867574721, 1518517206), F(465885868, 322736535),
                  F(53011238, 667516719), F(2, 45), 0])
    # Continuous extension over the 14 extended stages: b_i(theta) = theta * p_i(theta) with
    # p_i of degree 5 (coefficients of theta^5 .. theta^0); stages 2-5 have zero weight.
    p = {
        0: [-6.3448349392860401388, 22.1396504998094068976, -30.0610568289666450593,
            19.9990069333683970610, -6.6910181737837595697, 1.0],
        5: [-39.6107919852202505218, 116.4422149550342161651, -121.4999627731334642623,
            52.2273532792945524050, -7.6142658045872677172, 0.0],
        6: [20.3761213808791436958, -67.1451318825957197185, 83.1721004639847717481,
            -46.8919164181093621583, 10.7281392630428866124, 0.0],
        7: [7.3347098826795362023, -16.5672243527496524646, 9.5724507555993664382,
            -0.1890893225010595467, 0.5526637063753648783, 0.0],
        8: [32.8801774352459155182, -89.9916014847245016028, 87.8406057677205645007,
            -35.7075975946222072821, 4.2186562625665153803, 0.0],
        9: [-10.1588990526426760954, 22.6237489648532849093, -17.4152107770762969005,
            6.2736448083240352160, -0.6627209125361597559, 0.0],
        10: [-12.5401268098782561200, 32.2362340167355370113, -28.5903289514790976966,
             10.3160881272450748458, -1.2636789001135462218, 0.0],
        11: [29.5553001484516038033, -82.1020315488359848644, 81.6630950584341412934,
             -34.7650769866611817349, 5.4106037898590422230, 0.0],
        12: [-41.7923486424390588923, 116.2662185791119533462, -114.9375291377009418170,
             47.7457971078225540396, -7.0321379067945741781, 0.0],
        13: [20.3006925822100825485, -53.9020777466385396792, 50.2558364226176017553,
             -19.0082099341608028453, 2.3537586759714983486, 0.0],
    }
    dense = np.zeros((14, 6))
    for i, coeffs in p.items():
        dense[i] = np.asarray(coeffs)[::-1]  # theta^1 .. theta^6
    return ButcherTableau("dopri8", 8, a, b, c, b_err=b - b_hat, error_order=7, dense=dense,
                          dense_name="6th-degree continuous extension")


DOPRI8 = _dopri8()

TABLEAUX = {
    t.name: t
    for t in (EULER, MIDPOINT, HEUN2, HEUN3, RK4_38, RK4_CLASSIC, ADAPTIVE_HEUN, FEHLBERG2,
              BOSH3, DOPRI5, TSIT5, DOPRI8)
}
