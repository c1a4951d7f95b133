"""The instrument built to hold on question kinds it was not fitted on: a training-free anchor (mean log-prob, mean
next-token entropy or RAUQ, whichever ranks answers best within the training kinds) plus a correction from a few
attention statistics, shrunk toward zero, everything chosen by leave-one-kind-out inside the training kinds.

Fitting, on training answers of kinds K_1..K_m:
1. For each attention feature (6 statistics x layer x head, averaged over the answer) and each training kind, the
   within-kind AUROC. A feature is *stable* when its effect has one sign in every training kind; stable features
   are ranked by their smallest effect over the kinds (|AUROC - 0.5| in the kind where it is weakest).
2. Candidates: the anchor alone, or the anchor plus the k best stable features for k in KS, each as a logistic
   regression whose anchor column is left (almost) unpenalised and whose correction is L2-shrunk with strength C.
3. Each candidate is scored by leave-one-kind-out inside the training kinds (steps 1-2 redone without the held-out
   kind): the mean over held-out kinds of the within-kind AUROC. The chosen candidate is the simplest one within
   one standard error of the best (Breiman's one-standard-error rule), so that where attention does not transfer
   between the training kinds the instrument is the anchor.
4. Applicability: the correction a new answer receives is clipped to the range it spans on the training answers; an
   answer whose correction had to be clipped lies outside what the instrument was fitted on (`Fitted.detail`).

Two more detectors come from the same fit: `anchor_chosen`, the anchor alone (the training-free score chosen on the
training folds, the comparator a transfer claim needs), and `anchored_attention`, the candidate with a correction
that did best in step 3, however small its gain (what attention does on a new kind when it is always used)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from ..features import answer_features, answer_logit_statistics, prefix_features
from ..probe import platt, sigmoid
from .detector import Detector
from .fitting import Fitted
from .rauq import rauq_features, rauq_prefix_uncertainty, rauq_uncertainty

ANCHORS = ("mean_logprob", "logit_entropy", "rauq")  # training-free, higher = more confident
KS = (0, 2, 8, 32)  # attention features in the correction (0: the anchor alone)
CS = (0.01, 0.1, 1.0)  # inverse L2 strength of the correction (features standardised)
ANCHOR_WEIGHT = 100.0  # the anchor column is scaled up so its L2 penalty is negligible (it is never shrunk)
MIN_KINDS = 3  # training kinds (each with both classes) needed to choose by leave-one-kind-out
RANK_BYTES = 32 * 2 ** 20  # `within_kind_auroc` ranks about this much of the answers' columns at a time


def anchored_inputs(a) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(anchors [n, 3]: mean log-prob, negated mean entropy, negated RAUQ uncertainty; `answer_features` [n, 6 L H + 4]
    (the attention statistics per layer x head averaged over the answer, then the logit statistics; the correction
    reads the attention columns); kinds [n]: each answer's question kind, read only to fit and to route)."""
    logit = answer_logit_statistics(a)
    anchors = np.column_stack([logit[:, 0], -logit[:, 2], -rauq_uncertainty(rauq_features(a))])
    return anchors, answer_features(a), a.answers.kind.to_numpy().astype(str)


def anchored_prefix_inputs(a) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`anchored_inputs` of each answer's tokens up to and including this one: [n_tokens, ...] (the pooled features
    an array, or `features.PrefixFeatures` when the answers' attention is read from the runs). Computed once."""
    def compute(a):
        pooled = prefix_features(a)
        logit = pooled[:, [-4, -2]]
        anchors = np.column_stack([logit[:, 0], -logit[:, 1], -rauq_prefix_uncertainty(a)])
        return anchors, pooled, a.answers.kind.to_numpy().astype(str)[a.answer_of_token]
    return a.memo("anchored_prefix_inputs", compute)


def within_kind_auroc(X: np.ndarray, y: np.ndarray, kinds: np.ndarray) -> np.ndarray:
    """[n_kinds, F]: the AUROC of every column within each kind that has both classes (ties count one half).
    Columns are ranked a block at a time: ranking makes about eight arrays of the block's size (30,724 columns of
    1,319 answers at the 90B shape: 324 MB each, whole)."""
    from scipy.stats import rankdata

    out = []
    for kind in np.unique(kinds):
        m = kinds == kind
        n_pos, n_neg = int(y[m].sum()), int((1 - y[m]).sum())
        if min(n_pos, n_neg) == 0:
            continue
        auroc = np.empty(X.shape[1])
        step = max(1, RANK_BYTES // (8 * int(m.sum())))
        for c in range(0, X.shape[1], step):
            ranks = rankdata(X[m, c:c + step], axis=0)
            auroc[c:c + step] = (ranks[y[m] == 1].sum(0) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
        out.append(auroc)
    return np.array(out).reshape(len(out), X.shape[1])


def stable_order(X: np.ndarray, y: np.ndarray, kinds: np.ndarray) -> np.ndarray:
    """Columns whose within-kind effect has one sign in every kind, strongest weakest-kind effect first."""
    effect = within_kind_auroc(X, y, kinds) - 0.5
    same_sign = (np.all(effect > 0, axis=0) | np.all(effect < 0, axis=0))
    weakest = np.abs(effect).min(axis=0)
    order = np.argsort(-weakest, kind="stable")
    return order[same_sign[order]]


@dataclass
class AnchoredModel:
    """confidence = sigmoid(platt(anchor_coef * z_anchor + clip(correction . z_features) + intercept))."""

    anchor: int  # column of ANCHORS
    columns: np.ndarray  # attention features of the correction
    mean: np.ndarray  # standardisation of [anchor, features]
    scale: np.ndarray
    coef: np.ndarray  # [1 + k]
    intercept: float
    correction_range: tuple[float, float]  # of the training answers' corrections
    calibration: tuple[float, float] = (1.0, 0.0)

    def parts(self, anchors: np.ndarray, attention: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        Z = (np.column_stack([anchors[:, self.anchor], attention[:, self.columns]]) - self.mean) / self.scale
        return Z[:, 0] * self.coef[0] + self.intercept, Z[:, 1:] @ self.coef[1:]

    def decision(self, anchors, attention, clip: bool = True) -> np.ndarray:
        base, correction = self.parts(anchors, attention)
        return base + (np.clip(correction, *self.correction_range) if clip else correction)

    def outside(self, anchors, attention) -> np.ndarray:
        """Whether each answer's correction lies outside the range of the training answers'."""
        correction = self.parts(anchors, attention)[1]
        return (correction < self.correction_range[0]) | (correction > self.correction_range[1])

    def confidence(self, anchors, attention) -> np.ndarray:
        return sigmoid(self.calibration[0] * self.decision(anchors, attention) + self.calibration[1])

    def arrays(self, prefix: str) -> dict[str, np.ndarray]:
        return {f"{prefix}.columns": self.columns, f"{prefix}.mean": self.mean, f"{prefix}.scale": self.scale,
                f"{prefix}.coef": self.coef, f"{prefix}.scalars": np.array(
                    [self.anchor, self.intercept, *self.correction_range, *self.calibration])}

    @classmethod
    def from_arrays(cls, arrays, prefix: str) -> "AnchoredModel":
        anchor, intercept, lo, hi, a, b = arrays[f"{prefix}.scalars"]
        return cls(int(anchor), arrays[f"{prefix}.columns"].astype(int), arrays[f"{prefix}.mean"],
                   arrays[f"{prefix}.scale"], arrays[f"{prefix}.coef"], float(intercept), (float(lo), float(hi)),
                   (float(a), float(b)))


def fit_anchored_model(anchors, attention, y, kinds, anchor: int, k: int, C: float, order=None) -> AnchoredModel:
    """The anchor plus the `k` most stable attention features of these kinds (`order`: their `stable_order`, when
    computed already), the correction L2-shrunk by `C`."""
    from sklearn.linear_model import LogisticRegression

    columns = (np.arange(0) if k == 0 else stable_order(attention, y, kinds) if order is None else order)[:k]
    X = np.column_stack([anchors[:, anchor], attention[:, columns]])
    mean, scale = X.mean(0), X.std(0)
    scale[scale < 1e-12] = 1.0
    Z = (X - mean) / scale
    Z[:, 0] *= ANCHOR_WEIGHT
    model = LogisticRegression(C=C, max_iter=500).fit(Z, y)
    coef = model.coef_[0].copy()
    coef[0] *= ANCHOR_WEIGHT
    fitted = AnchoredModel(anchor, columns, mean, scale, coef, float(model.intercept_[0]), (0.0, 0.0))
    correction = fitted.parts(anchors, attention)[1]
    fitted.correction_range = (float(correction.min()), float(correction.max())) if k else (0.0, 0.0)
    return fitted


def _mean_within_kind_auroc(score: np.ndarray, y: np.ndarray, kinds: np.ndarray) -> float:
    auc = within_kind_auroc(score[:, None], y, kinds)
    return float(auc.mean()) if len(auc) else np.nan


@dataclass
class InnerChoice:
    """What leave-one-kind-out inside the training kinds saw of each candidate (anchor alone, or anchor + k features
    at strength C): per held-out kind, the gain of its within-kind AUROC over the anchor alone's, and each
    candidate's held-out-kind decisions of the training answers (kinds of one class: the candidate fitted on the
    kinds with both classes; left 0 for the anchor alone, which is never calibrated on them). `gain` and `held` are
    None where too few training kinds have both classes."""

    anchor: int
    candidates: list[tuple[int, float]]
    gain: np.ndarray | None  # [candidates, usable kinds]
    held: np.ndarray | None  # [candidates, n]
    usable: int


# `inner_choice`'s recent tables and `fit_anchored`'s recent fits by their inputs: the instrument,
# `instrument_anchored` and `anchored_attention` fit the same training answers in every fold of an evaluation
_TABLES: dict[str, InnerChoice] = {}
_FITS: dict[str, Fitted] = {}
MAX_CACHED = 64


def _digest(X, y) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for part in (*X, np.asarray(y)):
        part = np.ascontiguousarray(part)
        digest.update(f"{part.dtype}{part.shape}".encode())
        digest.update(part.astype(str) if part.dtype.kind in "OU" else part)  # (the array's buffer: no copy)
    return digest.hexdigest()


def _remember(cache: dict, key: str, compute):
    if key not in cache:
        if len(cache) >= MAX_CACHED:
            cache.pop(next(iter(cache)))
        cache[key] = compute()
    return cache[key]


def inner_choice(X, y: np.ndarray) -> InnerChoice:
    """Every candidate scored by leave-one-kind-out inside the training kinds (once for the same inputs)."""
    return _remember(_TABLES, _digest(X, y), lambda: _inner_choice(X, np.asarray(y, int)))


def choose_anchor(anchors: np.ndarray, y: np.ndarray, kinds: np.ndarray) -> int:
    """The column of `anchors` (training-free scores) that ranks answers best within the training kinds."""
    return int(np.argmax([_mean_within_kind_auroc(anchors[:, j], y, kinds) for j in range(anchors.shape[1])]))


def _inner_choice(X, y: np.ndarray) -> InnerChoice:
    anchors, pooled, kinds = X
    attention = pooled[:, :-4]
    usable = [kd for kd in np.unique(kinds) if 0 < y[kinds == kd].sum() < (kinds == kd).sum()]
    anchor = choose_anchor(anchors, y, kinds)
    candidates = [(0, CS[-1])] + [(k, C) for k in KS if k for C in CS]
    if len(usable) < MIN_KINDS:  # too few kinds to tell what transfers
        return InnerChoice(anchor, candidates, None, None, len(usable))
    per_kind = np.full((len(candidates), len(usable)), np.nan)
    held = np.zeros((len(candidates), len(y)))
    for j, kind in enumerate(usable):
        train, test = kinds != kind, kinds == kind
        attention_train = attention[train]  # (one copy for every candidate)
        order = stable_order(attention_train, y[train], kinds[train])  # the same for every candidate
        for i, (k, C) in enumerate(candidates):
            model = fit_anchored_model(anchors[train], attention_train, y[train], kinds[train], anchor, k, C, order)
            held[i, test] = model.decision(anchors[test], attention[test])
            per_kind[i, j] = _mean_within_kind_auroc(held[i, test], y[test], kinds[test])
    rest = ~np.isin(kinds, usable)  # kinds of one class: decided by each candidate with a correction fitted without
    if rest.any():                  # them (the anchor alone is calibrated on its own decisions, which read no label)
        order = stable_order(attention[~rest], y[~rest], kinds[~rest])
        for i, (k, C) in enumerate(candidates):
            if k:
                outer = fit_anchored_model(anchors[~rest], attention[~rest], y[~rest], kinds[~rest], anchor, k, C,
                                           order)
                held[i, rest] = outer.decision(anchors[rest], attention[rest])
    return InnerChoice(anchor, candidates, per_kind - per_kind[0], held, len(usable))


# how a variant chooses among `InnerChoice.candidates`
ONE_STANDARD_ERROR = "one_se"  # the simplest within one standard error of the best (the anchor alone if it is)
WITH_ATTENTION = "attention"  # the best candidate with a correction (k > 0): attention always used
ANCHOR_ALONE = "anchor"  # the anchor alone: the training-free score chosen on the training kinds (no table needed)
# WITH_ATTENTION's candidate where too few kinds to choose (then calibrated on the answers it was fitted on)
FALLBACK_WITH_ATTENTION = (8, 0.1)


def choose(table: InnerChoice, rule: str) -> tuple[int, str]:
    """The chosen candidate's index in `table.candidates`, and how it was chosen."""
    if rule not in (ONE_STANDARD_ERROR, WITH_ATTENTION):
        raise ValueError(f"unknown rule {rule!r}; expected {ONE_STANDARD_ERROR!r} or {WITH_ATTENTION!r}")
    if table.gain is None:
        if rule == WITH_ATTENTION:
            return (table.candidates.index(FALLBACK_WITH_ATTENTION),
                    f"{table.usable} training kinds with both classes: a fixed candidate, calibrated in sample")
        return 0, f"{table.usable} training kinds with both classes: anchor alone"
    mean_gain = table.gain.mean(1)
    if rule == WITH_ATTENTION:
        return 1 + int(np.argmax(mean_gain[1:])), "leave one training kind out: best with a correction"
    best = int(np.argmax(mean_gain))
    se = table.gain[best].std(ddof=1) / np.sqrt(table.usable)  # (a table has at least MIN_KINDS kinds)
    return (next(i for i in range(len(mean_gain)) if mean_gain[i] >= mean_gain[best] - se),
            "leave one training kind out")


def fit_anchored(X, y: np.ndarray, groups=None, seed: int = 0, rule: str = ONE_STANDARD_ERROR) -> Fitted:
    """`fit_anchored_on` these answers, once: a fit with the same inputs (the same arrays' bytes) is reused."""
    return _remember(_FITS, _digest(X, y) + rule, lambda: fit_anchored_on(X, y, rule))


def fit_anchored_on(X, y: np.ndarray, rule: str = ONE_STANDARD_ERROR) -> Fitted:
    """Choose the anchor, k and C by leave-one-kind-out inside the training kinds (`rule`: by default the
    one-standard-error rule), refit on every training answer, calibrate by Platt on the held-out-kind decisions of
    the chosen candidate."""
    anchors, pooled, kinds = X
    attention = pooled[:, :-4]
    y = np.asarray(y, int)
    if rule == ANCHOR_ALONE:
        table, index, chosen_by = None, 0, "the anchor alone"
        anchor, (k, C) = choose_anchor(anchors, y, kinds), (0, CS[-1])
    else:
        table = inner_choice(X, y)
        index, chosen_by = choose(table, rule)
        anchor, (k, C) = table.anchor, table.candidates[index]
    model = fit_anchored_model(anchors, attention, y, kinds, anchor, k, C)
    honest = k > 0 and table.held is not None  # held-out-kind decisions to calibrate on
    decisions = table.held[index] if honest else model.decision(anchors, attention)
    model.calibration = platt(decisions, y)
    detail = {"chosen_by": chosen_by, "anchor": ANCHORS[anchor], "k": int(k), "C": float(C),
              "columns": model.columns.tolist(), "model": model}
    if table is not None and table.gain is not None:
        detail["inner_gain"] = float(table.gain[index].mean())

    def confidence(x):
        return model.confidence(x[0], x[1])
    return Fitted(confidence, sigmoid(model.calibration[0] * decisions + model.calibration[1]), detail)


def fit_anchor_alone(X, y, groups=None, seed: int = 0) -> Fitted:
    return fit_anchored(X, y, groups, seed, ANCHOR_ALONE)


def fit_with_attention(X, y, groups=None, seed: int = 0) -> Fitted:
    return fit_anchored(X, y, groups, seed, WITH_ATTENTION)


ANCHORED = Detector("instrument_anchored", "answer", "instrument", "attention",
                    "a training-free anchor (mean log-prob, entropy or RAUQ, best within the training kinds) plus a "
                    "shrunk correction from the attention statistics stable across kinds; anchor, features and "
                    "shrinkage chosen by leave-one-kind-out inside the training kinds; correction clipped to its "
                    "training range", anchored_inputs, fit_anchored, prefix_features=anchored_prefix_inputs)
ANCHOR_CHOSEN = Detector("anchor_chosen", "answer", "baseline", "training_free",
                         "the training-free score (mean log-prob, mean next-token entropy or RAUQ) that ranks answers "
                         "best within the training kinds: instrument_anchored's anchor alone", anchored_inputs,
                         fit_anchor_alone, training_free=True)
ANCHORED_ATTENTION = Detector("anchored_attention", "answer", "instrument", "attention",
                              "instrument_anchored without its fallback: the anchor plus the attention correction "
                              "that did best by leave-one-kind-out inside the training kinds, however small its gain",
                              anchored_inputs, fit_with_attention)
