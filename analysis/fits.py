"""Scaling-law fits: power, saturating, loss, sigmoid (ScaleRL) and Chinchilla's L(N, D).

Forms (parameter names are part of the interface):
    power        y = a * x^b                                  fitted by least squares on log y
    saturating   y = E - A * x^(-alpha)                       least squares on y, A >= 0 (rises to ceiling E)
    loss         y = E + A * x^(-alpha)                       least squares on y, A >= 0 (falls to floor E)
    sigmoid      y = R0 + (A - R0) / (1 + (C_mid / x)^B)      least squares on y (ScaleRL, arXiv 2510.13786)
    chinchilla   L = E + A / N^alpha + B / D^beta             x = N, x2 = D; Huber(1e-3) on log L (approach 3)

Single-variable forms are fitted in u = log x - mean(log x), started from a grid over the nonlinear parameters
with the linear ones solved exactly, and refined from the best starts; optional per-point `weights` (e.g. the
number of eval problems behind each score) make it weighted least squares. r2 and rmse are always measured on y
itself, unweighted (on the loss, not its log, for chinchilla). Intervals are percentiles of refits on points
resampled with replacement.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike
from scipy.optimize import least_squares, minimize
from scipy.special import expit, huber, logit, logsumexp
from threadpoolctl import ThreadpoolController  # installed with mlflow (via scikit-learn)

FORMS: dict[str, tuple[str, ...]] = {
    "power": ("a", "b"),
    "saturating": ("E", "A", "alpha"),
    "loss": ("E", "A", "alpha"),
    "sigmoid": ("R0", "A", "B", "C_mid"),
    "chinchilla": ("E", "A", "B", "alpha", "beta"),
}
HUBER_DELTA = 1e-3
# Chinchilla's grid of initialisations over (a, b, e, alpha, beta); every point is scored, the best few refined.
_A_B, _E, _EXPONENTS = np.arange(0, 30, 5), np.arange(-1, 1.5, 0.5), np.arange(0, 2.5, 0.5)
CHINCHILLA_GRID = np.array(list(itertools.product(_A_B, _A_B, _E, _EXPONENTS, _EXPONENTS)))
N_REFINED = 3


def _saturating(u: np.ndarray, E: float, A: float, alpha: float) -> np.ndarray:
    return E - A * np.exp(-alpha * u)


def _loss(u: np.ndarray, E: float, A: float, alpha: float) -> np.ndarray:
    return E + A * np.exp(-alpha * u)


def _sigmoid(u: np.ndarray, R0: float, A: float, B: float, m: float) -> np.ndarray:
    return R0 + (A - R0) * expit(B * (u - m))


def _saturating_jac(u: np.ndarray, E: float, A: float, alpha: float) -> np.ndarray:
    decay = np.exp(-alpha * u)
    return np.column_stack([np.ones_like(u), -decay, A * u * decay])


def _loss_jac(u: np.ndarray, E: float, A: float, alpha: float) -> np.ndarray:
    decay = np.exp(-alpha * u)
    return np.column_stack([np.ones_like(u), decay, -A * u * decay])


def _sigmoid_jac(u: np.ndarray, R0: float, A: float, B: float, m: float) -> np.ndarray:
    s = expit(B * (u - m))
    slope = (A - R0) * s * (1 - s)
    return np.column_stack([1 - s, s, slope * (u - m), -slope * B])


# Models in the normalised variable u; each is linear in its first two parameters. Their Jacobians (one column a
# parameter) save least_squares the finite differences, most of a bootstrap's time.
_MODELS: dict[str, Callable[..., np.ndarray]] = {"saturating": _saturating, "loss": _loss, "sigmoid": _sigmoid}
_JACOBIANS: dict[str, Callable[..., np.ndarray]] = {"saturating": _saturating_jac, "loss": _loss_jac,
                                                    "sigmoid": _sigmoid_jac}
_BOUNDS = {  # A >= 0: saturating rises to its ceiling E, loss falls to its floor E
    "saturating": ([-np.inf, 0.0, 0.0], [np.inf, np.inf, 10.0]),
    "loss": ([-np.inf, 0.0, 0.0], [np.inf, np.inf, 10.0]),
    "sigmoid": ([-np.inf, -np.inf, 0.0, -np.inf], [np.inf] * 4),
}
_SCORE_BOUNDS = {  # a score in [0, 1]: its levels too
    "saturating": ([0.0, 0.0, 0.0], [1.0, np.inf, 10.0]),
    "sigmoid": ([0.0, 0.0, 0.0, -np.inf], [1.0, 1.0, np.inf, np.inf]),
}


@functools.cache
def _thread_pools() -> ThreadpoolController:
    """The BLAS and OpenMP thread pools of this process, found once: finding them takes milliseconds, longer than
    one bootstrap refit."""
    return ThreadpoolController()


@dataclass
class Fit:
    """A fitted form: estimates, bootstrap 95% intervals, and r2 / rmse on the fitted y (loss for chinchilla)."""

    form: str
    params: dict[str, float]
    ci: dict[str, tuple[float, float]]
    r2: float
    rmse: float
    n: int
    n_excluded: int = 0
    exclude_below: float | None = None
    draws: np.ndarray = field(default_factory=lambda: np.empty((0, 0)), repr=False)

    def predict(self, x: ArrayLike, x2: ArrayLike | None = None) -> np.ndarray:
        """The fitted curve at x (and x2 = D for chinchilla)."""
        return _curve(self.form, np.array(list(self.params.values())), *self._inputs(x, x2))

    def predict_interval(
        self, x: ArrayLike, level: float = 0.95, *, x2: ArrayLike | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Pointwise (low, high) band of the bootstrap curves at x."""
        if len(self.draws) == 0:
            raise ValueError("no bootstrap draws: fit with n_boot > 0")
        curves = _curve(self.form, self.draws.T[..., None], *self._inputs(x, x2))
        low, high = np.nanquantile(curves, [(1 - level) / 2, (1 + level) / 2], axis=0)
        return low, high

    def invert(self, y_target: float) -> float:
        """The x at which the curve reaches y_target; ValueError if it never does."""
        p = {k: np.float64(v) for k, v in self.params.items()}
        y = np.float64(y_target)
        with np.errstate(all="ignore"):
            if self.form == "power":
                x = (y / p["a"]) ** (1 / p["b"])
            elif self.form == "saturating":
                x = ((p["E"] - y) / p["A"]) ** (-1 / p["alpha"])
            elif self.form == "loss":
                x = ((y - p["E"]) / p["A"]) ** (-1 / p["alpha"])
            elif self.form == "sigmoid":
                x = p["C_mid"] * np.exp(logit((y - p["R0"]) / (p["A"] - p["R0"])) / p["B"])
            else:
                raise ValueError(f"invert needs a single-variable form, not {self.form}")
        if not (np.isfinite(x) and x > 0):
            shown = ", ".join(f"{k}={v:.4g}" for k, v in self.params.items())
            raise ValueError(f"target {y_target:g} is unreachable by the {self.form} fit ({shown})")
        return float(x)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (no bootstrap draws)."""
        return {
            "form": self.form,
            "params": dict(self.params),
            "ci": {k: list(v) for k, v in self.ci.items()},
            "r2": self.r2,
            "rmse": self.rmse,
            "n": self.n,
            "n_excluded": self.n_excluded,
            "exclude_below": self.exclude_below,
            "n_boot": len(self.draws),
        }

    def _inputs(self, x: ArrayLike, x2: ArrayLike | None) -> tuple[np.ndarray, np.ndarray | None]:
        if (self.form == "chinchilla") != (x2 is not None):
            raise ValueError("chinchilla needs x2 (tokens D); other forms take no x2")
        return np.asarray(x, dtype=float), None if x2 is None else np.asarray(x2, dtype=float)


def fit(
    x: ArrayLike,
    y: ArrayLike,
    form: str,
    *,
    x2: ArrayLike | None = None,
    exclude_below: float | None = None,
    n_boot: int = 200,
    seed: int = 0,
    score: bool = False,
    weights: ArrayLike | None = None,
    start: Sequence[float] | None = None,
) -> Fit:
    """Fit `form` to (x, y), dropping points with x < exclude_below; x2 is D for chinchilla (x is then N). With
    `score`, y is a score in [0, 1] and so are the fitted levels (sigmoid R0 and A, saturating E) and intervals.
    `weights` (> 0, one a point; not for chinchilla) weight each point's squared residual. `start` (parameters in
    FORMS order, e.g. an earlier fit's) is refined alone instead of searching a grid of starts: a bootstrap refit."""
    x, y, x2 = _data(x, y, form, x2)
    w = _weights(weights, len(x), form)
    if n_boot < 0:
        raise ValueError(f"n_boot must be >= 0, got {n_boot}")
    if start is not None and len(start) != len(FORMS[form]):
        raise ValueError(f"start must have {len(FORMS[form])} values for {form}, got {len(start)}")
    keep = np.ones(len(x), dtype=bool) if exclude_below is None else x >= exclude_below
    x, y, x2, w = x[keep], y[keep], None if x2 is None else x2[keep], w[keep]
    k = len(FORMS[form])
    distinct = len(np.unique(x)) if x2 is None else len(np.unique(np.column_stack([x, x2]), axis=0))
    if distinct < k:
        raise ValueError(f"{form} has {k} parameters but only {distinct} distinct points remain to fit")
    lx, lx2 = np.log(x), None if x2 is None else np.log(x2)
    with _thread_pools().limit(limits=1):  # threaded BLAS makes L-BFGS-B on these tiny problems ~15x slower
        best = _estimate(form, lx, y, lx2, None if start is None else np.asarray(start, float), score, w)
        draws = _bootstrap(form, lx, y, lx2, best, n_boot, seed, score, w)
    residual = _curve(form, best, x, x2) - y
    total = np.sum((y - y.mean()) ** 2)
    ci = {}
    if len(draws):
        low, high = np.percentile(draws, [2.5, 97.5], axis=0)
        ci = {name: (float(lo), float(hi)) for name, lo, hi in zip(FORMS[form], low, high, strict=True)}
    return Fit(
        form=form,
        params={name: float(v) for name, v in zip(FORMS[form], best, strict=True)},
        ci=ci,
        r2=float(1 - np.sum(residual**2) / total) if total > 0 else float("nan"),
        rmse=float(np.sqrt(np.mean(residual**2))),
        n=len(y),
        n_excluded=int(np.sum(~keep)),
        exclude_below=exclude_below,
        draws=draws,
    )


def extrapolation(
    x: ArrayLike,
    y: ArrayLike,
    form: str,
    cut: float,
    *,
    x2: ArrayLike | None = None,
    exclude_below: float | None = None,
    n_boot: int = 0,
    seed: int = 0,
    score: bool = False,
    weights: ArrayLike | None = None,
) -> dict[str, Any]:
    """Fit on points with x < cut (with their `weights`); errors (mae, rmse, mean relative mre; unweighted) on the
    held-out points with x >= cut.

    The returned "fit" is the Fit object; every other value is JSON-ready.
    """
    x, y, x2 = _data(x, y, form, x2)
    w = _weights(weights, len(x), form)
    train, test = x < cut, x >= cut
    if not test.any():
        raise ValueError(f"no points with x >= cut={cut:g} to test on")
    result = fit(
        x[train],
        y[train],
        form,
        x2=None if x2 is None else x2[train],
        exclude_below=exclude_below,
        n_boot=n_boot,
        seed=seed,
        score=score,
        weights=None if weights is None else w[train],
    )
    error = result.predict(x[test], None if x2 is None else x2[test]) - y[test]
    return {
        "form": form,
        "cut": cut,
        "n_train": result.n,
        "n_test": int(test.sum()),
        "mae": float(np.mean(np.abs(error))),
        "rmse": float(np.sqrt(np.mean(error**2))),
        "mre": float(np.mean(np.abs(error / y[test]))),
        "fit": result,
    }


def compare_forms(
    x: ArrayLike, y: ArrayLike, forms: Sequence[str], cut: float, *, exclude_below: float | None = None,
    score: bool = False,
) -> pd.DataFrame:
    """Single-variable forms ranked by held-out rmse when fitted below `cut` (r2 is on the training points)."""
    rows = []
    for form in forms:
        result = extrapolation(x, y, form, cut, exclude_below=exclude_below, score=score)
        rows.append({k: v for k, v in result.items() if k != "fit"} | {"r2_train": result["fit"].r2})
    return pd.DataFrame(rows).sort_values("rmse", ignore_index=True)


def fit_csv(
    path: str | Path,
    x: str,
    y: str,
    form: str,
    x2: str | None = None,
    exclude_below: float | None = None,
    *,
    n_boot: int = 200,
    seed: int = 0,
) -> Fit:
    """Fit `form` to the named columns of a CSV file."""
    try:
        frame = pd.read_csv(path)
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from exc
    columns = {}
    for name in (x, y) if x2 is None else (x, y, x2):
        if name not in frame.columns:
            raise ValueError(f"column {name!r} not in {path}; available: {', '.join(map(str, frame.columns))}")
        columns[name] = pd.to_numeric(frame[name], errors="coerce").to_numpy(dtype=float)
        if np.isnan(columns[name]).any():
            raise ValueError(f"column {name!r} in {path} has missing or non-numeric values")
    return fit(
        columns[x],
        columns[y],
        form,
        x2=None if x2 is None else columns[x2],
        exclude_below=exclude_below,
        n_boot=n_boot,
        seed=seed,
    )


def _data(x: ArrayLike, y: ArrayLike, form: str, x2: ArrayLike | None) -> tuple[np.ndarray, ...]:
    """Validated float arrays (x, y, x2)."""
    if form not in FORMS:
        raise ValueError(f"unknown form {form!r}; choose one of {', '.join(FORMS)}")
    if (form == "chinchilla") != (x2 is not None):
        raise ValueError("chinchilla needs x2 (tokens D); other forms take no x2")
    arrays = {"x": x, "y": y} | ({} if x2 is None else {"x2": x2})
    out = {}
    for name, values in arrays.items():
        out[name] = np.asarray(values, dtype=float)
        if out[name].ndim != 1:
            raise ValueError(f"{name} must be one-dimensional, got shape {out[name].shape}")
        if not np.isfinite(out[name]).all():
            raise ValueError(f"{name} contains NaN or inf")
    if len({len(a) for a in out.values()}) > 1:
        raise ValueError(f"lengths differ: {', '.join(f'{k}={len(a)}' for k, a in out.items())}")
    for name in ("x", "x2"):
        if name in out and (out[name] <= 0).any():
            raise ValueError(f"{name} must be > 0 for the {form} form, got min {out[name].min():g}")
    if form in ("power", "chinchilla") and (out["y"] <= 0).any():
        raise ValueError(f"y must be > 0 for the {form} form (fitted on log y), got min {out['y'].min():g}")
    return out["x"], out["y"], out.get("x2")


def _weights(weights: ArrayLike | None, n: int, form: str) -> np.ndarray:
    """Validated point weights, scaled to mean 1 (all 1 when None)."""
    if weights is None:
        return np.ones(n)
    if form == "chinchilla":
        raise ValueError("weights are not supported for the chinchilla form")
    w = np.asarray(weights, dtype=float)
    if w.shape != (n,):
        raise ValueError(f"weights must have one value a point ({n}), got shape {w.shape}")
    if not (np.isfinite(w).all() and (w > 0).all()):
        raise ValueError("weights must be finite and > 0")
    return w / w.mean()


def _curve(form: str, p: np.ndarray, x: np.ndarray, x2: np.ndarray | None) -> np.ndarray:
    """The form at x from parameters p (in FORMS order; entries may be column arrays to evaluate many at once)."""
    lx = np.log(x)
    if form == "power":
        a, b = p
        return a * np.exp(b * lx)
    if form == "saturating":
        E, A, alpha = p
        return E - A * np.exp(-alpha * lx)
    if form == "loss":
        E, A, alpha = p
        return E + A * np.exp(-alpha * lx)
    if form == "sigmoid":
        R0, A, B, C_mid = p
        return R0 + (A - R0) * expit(B * (lx - np.log(C_mid)))
    E, A, B, alpha, beta = p
    return E + A * np.exp(-alpha * lx) + B * np.exp(-beta * np.log(x2))


def _estimate(form: str, lx: np.ndarray, y: np.ndarray, lx2: np.ndarray | None, start: np.ndarray | None,
              score: bool = False, w: np.ndarray | None = None) -> np.ndarray:
    """Parameters (FORMS order) fitted to one sample; `start` (a previous estimate) replaces the search for starts;
    `score` keeps the levels in [0, 1]; `w` weights the squared residuals."""
    sw = np.ones(len(y)) if w is None else np.sqrt(w)
    if form == "power":
        b, log_a = np.polyfit(lx, np.log(y), 1, w=sw)
        return np.array([np.exp(log_a), b])
    if form == "chinchilla":
        return _fit_chinchilla(lx, lx2, np.log(y), start)
    ref = lx.mean()
    u = lx - ref
    model, jacobian = _MODELS[form], _JACOBIANS[form]
    starts = _starts(form, u, y, sw) if start is None else [_to_u(form, start, ref)]
    low, high = _SCORE_BOUNDS.get(form, _BOUNDS[form]) if score else _BOUNDS[form]
    results = [
        least_squares(lambda p: sw * (model(u, *p) - y), np.clip(p0, low, high), bounds=(low, high), x_scale="jac",
                      jac=lambda p: sw[:, None] * jacobian(u, *p))
        for p0 in starts
    ]
    converged = [r for r in results if r.status > 0]
    if not converged:
        raise RuntimeError(f"{form} fit did not converge")
    with np.errstate(over="ignore", under="ignore"):
        params = _from_u(form, min(converged, key=lambda r: r.cost).x, ref)
    if not np.all(np.isfinite(params)) or (form == "sigmoid" and not params[3] > 0):
        # ran off to a step at 0 or infinity (C_mid = 0 or inf): no curve
        raise RuntimeError(f"{form} fit did not converge (a parameter ran off to infinity)")
    return params


def _to_u(form: str, p: np.ndarray, ref: float) -> np.ndarray:
    """Parameters in x's units to those in u = log x - ref."""
    q = np.array(p, dtype=float)
    if form == "sigmoid":
        q[3] = np.log(q[3]) - ref
    else:
        q[1] *= np.exp(-q[2] * ref)
    return q


def _from_u(form: str, q: np.ndarray, ref: float) -> np.ndarray:
    """Parameters in u = log x - ref to those in x's units."""
    p = np.array(q, dtype=float)
    if form == "sigmoid":
        p[3] = np.exp(p[3] + ref)
    else:
        p[1] *= np.exp(p[2] * ref)
    return p


def _starts(form: str, u: np.ndarray, y: np.ndarray, sw: np.ndarray) -> list[np.ndarray]:
    """Best starting points from a grid over the nonlinear parameters, the two linear ones solved by least squares
    (residuals scaled by `sw`, the square roots of the weights)."""
    span = np.ptp(u)
    if form == "sigmoid":
        grid = itertools.product(
            np.geomspace(1, 50, 8) / span, np.linspace(u.min() - span / 4, u.max() + span / 2, 9)
        )
    else:
        grid = ((alpha,) for alpha in np.geomspace(0.01, 5, 30))
    scored = []
    for nonlinear in grid:
        design = np.column_stack([_MODELS[form](u, 1.0, 0.0, *nonlinear), _MODELS[form](u, 0.0, 1.0, *nonlinear)])
        coef = np.linalg.lstsq(design * sw[:, None], y * sw, rcond=None)[0]
        scored.append((np.sum((sw * (design @ coef - y)) ** 2), np.array([*coef, *nonlinear])))
    scored.sort(key=lambda s: s[0])
    return [p for _, p in scored[:N_REFINED]]


def _log_terms(theta: np.ndarray, lN: np.ndarray, lD: np.ndarray) -> np.ndarray:
    """The three log terms of L(N, D) for theta = (a, b, e, alpha, beta), each entry scalar or a column of starts."""
    a, b, e, alpha, beta = (np.expand_dims(t, -1) for t in theta)
    return np.stack(np.broadcast_arrays(a - alpha * lN, b - beta * lD, e))


def _huber_objective(theta: np.ndarray, lN: np.ndarray, lD: np.ndarray, lL: np.ndarray) -> tuple[float, np.ndarray]:
    """Sum of Huber losses of log-loss residuals, and its gradient."""
    terms = _log_terms(theta, lN, lD)
    log_pred = logsumexp(terms, axis=0)
    residual = log_pred - lL
    weight = np.clip(residual, -HUBER_DELTA, HUBER_DELTA) * np.exp(terms - log_pred)
    gradient = [weight[0].sum(), weight[1].sum(), weight[2].sum(), -(weight[0] * lN).sum(), -(weight[1] * lD).sum()]
    return float(huber(HUBER_DELTA, residual).sum()), np.array(gradient)


def _fit_chinchilla(lN: np.ndarray, lD: np.ndarray, lL: np.ndarray, start: np.ndarray | None) -> np.ndarray:
    """Chinchilla approach 3: L-BFGS on the Huber objective from the best grid starts (or from `start`)."""
    if start is None:
        scores = huber(HUBER_DELTA, logsumexp(_log_terms(CHINCHILLA_GRID.T, lN, lD), axis=0) - lL).sum(axis=-1)
        starts = CHINCHILLA_GRID[np.argsort(scores)[:N_REFINED]]
    else:
        E, A, B, alpha, beta = start
        starts = [np.array([np.log(A), np.log(B), np.log(E), alpha, beta])]
    options = {"maxiter": 10_000, "ftol": 1e-15, "gtol": 1e-12}
    results = [
        minimize(_huber_objective, s, args=(lN, lD, lL), jac=True, method="L-BFGS-B", options=options) for s in starts
    ]
    a, b, e, alpha, beta = min(results, key=lambda r: r.fun).x
    return np.array([np.exp(e), np.exp(a), np.exp(b), alpha, beta])


def _bootstrap(
    form: str, lx: np.ndarray, y: np.ndarray, lx2: np.ndarray | None, best: np.ndarray, n_boot: int, seed: int,
    score: bool = False, w: np.ndarray | None = None,
) -> np.ndarray:
    """Estimates refitted (from `best`) on n_boot resamples of the points (each keeps its weight in `w`);
    degenerate resamples are skipped."""
    rng = np.random.default_rng(seed)
    point = np.unique(np.column_stack([lx] if lx2 is None else [lx, lx2]), axis=0, return_inverse=True)[1].ravel()
    k = len(FORMS[form])
    draws = []
    for _ in range(n_boot):
        i = rng.integers(0, len(y), len(y))
        if len(np.unique(point[i])) < k:  # distinct points (x, and x2) in the resample
            continue
        try:
            draws.append(_estimate(form, lx[i], y[i], None if lx2 is None else lx2[i], best, score,
                                   None if w is None else w[i]))
        except RuntimeError:
            continue
    return np.array(draws).reshape(-1, k)
