"""The calibrated logistic probe: a standardised logistic regression whose strength is chosen by question-grouped
inner cross-validation, with Platt calibration (`fit_probe`, `LinearProbe`); numpy and scikit-learn only."""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass

import numpy as np

from .answers import InstrumentError


CS = tuple(np.logspace(-4, 0, 5))  # inverse L2 strengths tried (features standardised)
INNER_FOLDS = 4
DECISION_BYTES = 256 * 2 ** 20  # `LinearProbe.decision` standardises about this much of its rows at a time


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-np.clip(x, -50, 50)))


@dataclass
class LinearProbe:
    """A standardised logistic regression and its Platt calibration: confidence = sigmoid(a * decision + b)."""

    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: float
    platt: tuple[float, float]
    C: float
    penalty: str = "l2"

    def decision(self, X: np.ndarray) -> np.ndarray:
        if hasattr(X, "project"):  # features too large to hold (`features.PrefixFeatures`): read projected
            weights = self.coef / self.scale
            return X.project(weights)[:, 0] - self.mean @ weights + self.intercept
        X = np.asarray(X)
        step = max(1, DECISION_BYTES // (8 * max(1, X.shape[1])))  # rows standardised at once (float64 copies)
        return np.concatenate([((np.asarray(X[i:i + step], np.float64) - self.mean) / self.scale) @ self.coef
                               + self.intercept for i in range(0, len(X), step)] or [np.zeros(0)])

    def confidence(self, X: np.ndarray) -> np.ndarray:
        return sigmoid(self.platt[0] * self.decision(X) + self.platt[1])

    def arrays(self, prefix: str) -> dict[str, np.ndarray]:
        return {f"{prefix}.mean": self.mean, f"{prefix}.scale": self.scale, f"{prefix}.coef": self.coef,
                f"{prefix}.scalars": np.array([self.intercept, *self.platt, self.C])}

    @classmethod
    def from_arrays(cls, arrays, prefix: str, penalty: str = "l2") -> "LinearProbe":
        intercept, a, b, c = arrays[f"{prefix}.scalars"]
        return cls(arrays[f"{prefix}.mean"], arrays[f"{prefix}.scale"], arrays[f"{prefix}.coef"], float(intercept),
                   (float(a), float(b)), float(c), penalty)


def inner_splits(y: np.ndarray, groups: np.ndarray, n_splits: int = INNER_FOLDS, seed: int = 0) -> list:
    """Question-grouped, class-stratified folds (no question in two folds); remembered for the same labels,
    groups and seed (every probe of an outer fold uses the same inner folds)."""
    y = np.asarray(y, int)
    key = (y.tobytes(), hashlib.sha1("\0".join(map(str, groups)).encode()).hexdigest(), n_splits, seed)
    if key not in _INNER_SPLITS:
        from sklearn.model_selection import StratifiedGroupKFold

        n = min(n_splits, int(np.bincount(y, minlength=2).min()))
        if n < 2:
            raise InstrumentError(f"too few answers of one class to cross-validate ({np.bincount(y)})")
        if len(_INNER_SPLITS) > 256:
            _INNER_SPLITS.clear()
        _INNER_SPLITS[key] = list(StratifiedGroupKFold(n, shuffle=True, random_state=seed).split(y, y, groups))
    return _INNER_SPLITS[key]


_INNER_SPLITS: dict = {}


def _logistic(C: float, penalty: str, balanced: bool):
    from sklearn.linear_model import LogisticRegression

    kwargs = dict(C=C, class_weight="balanced" if balanced else None, max_iter=300, tol=1e-4)
    if penalty == "l1":
        # liblinear shuffles the rows: a fixed seed makes the fit (and the figures) repeatable
        return LogisticRegression(l1_ratio=1.0, solver="liblinear", random_state=0, **kwargs)
    return LogisticRegression(warm_start=True, **kwargs)


def column_std(X: np.ndarray, mean: np.ndarray | float = 0.0) -> np.ndarray:
    """Each column's standard deviation about `mean` (0 for a centred matrix), accumulated a row at a time:
    `np.std` would make a copy of the matrix. It takes the same deviations and sums their squares in the same order,
    so with the matrix's own column means (or on the matrix centred by them) the values are np.std's to the last
    bit."""
    sum_squares, square = np.zeros(X.shape[1]), np.empty(X.shape[1])
    for row in X:
        deviation = row - mean
        sum_squares += np.multiply(deviation, deviation, out=square)
    return np.sqrt(sum_squares / len(X))


def _row_space(Z: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """(R, V^T) with Z = R V^T when Z has far fewer rows than columns, else (Z, None). An L2-penalised logistic
    regression's weights lie in the row space of its training rows, so fitting on R (n x n) and mapping the weights
    back with V is exactly the same model, fitted on n columns instead of p. From the eigendecomposition of the
    Gram matrix Z Z^T = U S^2 U^T: R = U S, V^T = S^-1 U^T Z."""
    if Z.shape[1] < 2 * Z.shape[0]:
        return Z, None
    eigenvalues, u = np.linalg.eigh(Z @ Z.T)
    keep = eigenvalues > eigenvalues.max() * 1e-12
    singular = np.sqrt(eigenvalues[keep])
    u = u[:, keep]
    vt = u.T @ Z
    vt /= singular[:, None]
    return u * singular, vt


def _fit_path(Z: np.ndarray, y: np.ndarray, Cs, penalty: str, balanced: bool) -> list[tuple[np.ndarray, float]]:
    """(weights over Z's columns, intercept) for each C, fitted in increasing C with warm starts."""
    R, vt = _row_space(Z) if penalty == "l2" else (Z, None)
    out, model = [], None
    for C in Cs:
        if model is None or penalty == "l1":
            model = _logistic(C, penalty, balanced)
        model.set_params(C=C)
        model.fit(R, y)
        coef = model.coef_[0] if vt is None else vt.T @ model.coef_[0]
        out.append((coef.copy(), float(model.intercept_[0])))
    return out


def platt(decision: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(a, b) of the calibration sigmoid(a * decision + b), fitted on (decision, y)."""
    from sklearn.linear_model import LogisticRegression

    if len(np.unique(y)) < 2:
        return 0.0, float(np.log((y.mean() + 1e-3) / (1 - y.mean() + 1e-3)))
    m = LogisticRegression(C=1e4).fit(decision[:, None], y)
    return float(m.coef_[0, 0]), float(m.intercept_[0])


def fit_probe(X: np.ndarray, y: np.ndarray, groups: np.ndarray, *, Cs=CS, penalty: str = "l2",
              balanced: bool = False, seed: int = 0) -> tuple[LinearProbe, np.ndarray]:
    """A logistic probe on X (standardised), its inverse regularisation C chosen by question-grouped inner
    cross-validation (highest pooled inner AUROC) and its calibration fitted on the inner out-of-fold decisions at
    that C. Returns the probe (refitted on all of X) and the inner out-of-fold confidences of X's rows: honest
    training-set confidences (e.g. to choose an abstention threshold)."""
    from sklearn.metrics import roc_auc_score

    Z = np.array(X, np.float64)  # a copy, standardised in place (Z holds the features once: 0.3 GB at the 90B shape)
    mean = Z.mean(0)
    Z -= mean
    scale = column_std(Z)
    scale[scale < 1e-12] = 1.0
    Z /= scale
    y = np.asarray(y, int)
    Cs = sorted(Cs)
    oof = np.zeros((len(Cs), len(y)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence warnings at the weakest regularisation of a grid
        for train, test in inner_splits(y, groups, seed=seed):
            for i, (coef, intercept) in enumerate(_fit_path(Z[train], y[train], Cs, penalty, balanced)):
                oof[i, test] = Z[test] @ coef + intercept
        best = int(np.argmax([roc_auc_score(y, o) for o in oof]))
        coef, intercept = _fit_path(Z, y, [Cs[best]], penalty, balanced)[0]
    calibration = platt(oof[best], y)
    probe = LinearProbe(mean, scale, coef, intercept, calibration, float(Cs[best]), penalty)
    return probe, sigmoid(calibration[0] * oof[best] + calibration[1])
