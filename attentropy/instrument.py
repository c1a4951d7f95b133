"""The confidence instrument: per-answer and per-token confidence scores learned from the stored statistics, and
their evaluation against the published baselines and controls on the same question-grouped folds.

What it scores (all calibrated probabilities in [0, 1]):
  answer confidence  P(the answer is correct), from the answer's mean attention statistics per layer x head and its
                     logit statistics (one model per protocol kind: factual, math);
  prefix confidence  the same model on the tokens so far (means over the prefix): what a live system reads to stop
                     or abstain early; at the last token it equals the answer confidence;
  token confidence   P(this token is not where the answer goes wrong), trained on the critic's wrong-moment spans of
                     math runs, from the token's own attention statistics and logit statistics.
Features come from the stored statistics only (no second forward): attention entropy and varentropy divided by ln K
and (ln K)^2 (K visible keys: both maxima grow with position), the four attention masses, and the next-token
log-probability, entropy and varentropy.

The fitted instrument is a directory (`save` / `load`): probe.json (the model it belongs to, features, training runs
and labels, versions), arrays.npz (standardisation, coefficients, calibration; no pickle), evaluation.json and
evaluation.csv (the cross-validated evaluation), predictions.parquet and token_predictions.parquet (out-of-fold
confidences of every method, the report's figures are drawn from them).
"""

from __future__ import annotations

import hashlib
import json
import time
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from . import stats
from .data import FREE, MATH, protocol_kind, question_kind

ATTN_FEATURES = ("entropy_norm", "varentropy_norm", "sink_mass", "prompt_mass", "diag_mass", "prev_mass")
TOKEN_LOGIT = ("logprob", "logit_entropy", "logit_varentropy")
FORMAT = "attentropy-instrument/1"
CS = tuple(np.logspace(-4, 0, 5))  # inverse L2 strengths tried (features standardised)
INNER_FOLDS = 4
OUTER_FOLDS = 5
WINDOW = 8  # the position-matched token comparison: tokens within this many positions of the wrong moment
PREFIX_LENGTHS = (1, 2, 4, 8, 16, 32)


class InstrumentError(ValueError):
    """A probe that does not fit the runs or the model it is applied to."""


# ---------------------------------------------------------------- answers and their per-token statistics

@dataclass
class Answers:
    """Answers (of one or several runs of one model) with their tokens' statistics, the input of every feature.

    Tokens of an answer are contiguous and in answer order; `answers.start` is the row of its first token."""

    answers: pd.DataFrame  # run, benchmark, task, question_id, group (the question's text), kind, label, y, n_tokens,
    #                        start; y: 1 correct, 0 incorrect, -1 neither (not attempted, unparsed, ungraded)
    tokens: pd.DataFrame  # answer (row of `answers`), pos, token, logprob, logit_entropy, logit_varentropy, n_keys,
    #                       target: 1 wrong moment, 0 not, -1 unknown (an incorrect answer without a located span)
    attn: dict[str, np.ndarray]  # ATTN_FEATURES -> [n_tokens, L, H] float32
    layers: list[int]
    n_heads: int
    hidden: dict[str, np.ndarray] = field(default_factory=dict)  # last_prompt, answer_mean -> [n_answers, L_h, d]
    hidden_layers: list[int] = field(default_factory=list)  # their output_hidden_states indices
    hidden_tokens: np.ndarray | None = None  # [n_tokens, L_t, d] float16
    hidden_token_layers: list[int] = field(default_factory=list)

    @property
    def answer_of_token(self) -> np.ndarray:
        return self.tokens["answer"].to_numpy()

    def subset(self, answer_rows: np.ndarray) -> "Answers":
        answer_rows = np.asarray(answer_rows)
        starts, counts = self.answers.start.to_numpy()[answer_rows], self.answers.n_tokens.to_numpy()[answer_rows]
        token_rows = np.concatenate([np.arange(s, s + n) for s, n in zip(starts, counts)] or [np.zeros(0, int)])
        answers = self.answers.iloc[answer_rows].reset_index(drop=True)
        answers["start"] = np.r_[0, np.cumsum(answers.n_tokens.to_numpy())[:-1]].astype(int)
        tokens = self.tokens.iloc[token_rows].reset_index(drop=True)
        tokens["answer"] = np.repeat(np.arange(len(answers)), answers.n_tokens.to_numpy())
        return Answers(answers, tokens, {k: v[token_rows] for k, v in self.attn.items()}, self.layers, self.n_heads,
                       {k: v[answer_rows] for k, v in self.hidden.items()}, self.hidden_layers,
                       None if self.hidden_tokens is None else self.hidden_tokens[token_rows],
                       self.hidden_token_layers)


def _task(benchmark: str) -> str:
    if benchmark == FREE:
        raise InstrumentError(f"no instrument task for benchmark {benchmark!r}: free prompts are never graded")
    return protocol_kind(benchmark)


def normalised_attention(stat_arrays: dict[str, np.ndarray], n_keys: np.ndarray) -> dict[str, np.ndarray]:
    """ATTN_FEATURES from the stored statistics: entropy / ln K and varentropy / (ln K)^2 (the maximal entropy of K
    keys is ln K and the maximal varentropy grows like (ln K)^2, so raw values rise with position), masses as
    they are."""
    log_k = np.log(np.maximum(np.asarray(n_keys, np.float32), 2.0))[:, None, None]
    out = {"entropy_norm": stat_arrays["entropy"] / log_k, "varentropy_norm": stat_arrays["varentropy"] / log_k ** 2}
    out.update({k: stat_arrays[k] for k in ("sink_mass", "prompt_mass", "diag_mass", "prev_mass")})
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


def load_answers(run_dirs: list[str | Path], *, require_labels: bool = True, skip_damaged: bool = False
                 ) -> tuple[Answers, list[dict], dict]:
    """The answers of graded runs of one model, one description per run (path, fingerprint, benchmark, labels)
    and the model's identity (`model_identity`). `skip_damaged`: read the intact batches of a damaged run."""
    from .schema import ATTN_STATS
    from .store import load_run

    parts, infos = [], []
    model = None
    for run_dir in run_dirs:
        run = load_run(run_dir, skip_damaged=skip_damaged)
        if require_labels and "label" not in run.samples:
            raise InstrumentError(f"{run.path} has no labels: run `attentropy grade {run.path}` first")
        identity = model_identity(run.config, run.layers, run.n_heads)
        if model is None:
            model = identity
        elif identity != model:
            raise InstrumentError(f"{run.path} is a run of {identity}, not of {model} like the runs before it; an "
                                  "instrument belongs to one model")
        infos.append(run_info(run))
        stat_arrays = {s: run.attn(s) for s in ATTN_STATS}
        part = _answers_of(run.samples, run.tokens, stat_arrays, run.layers, run.n_heads, str(run.path),
                           hidden_of(run))
        part.answers["run_fingerprint"] = infos[-1]["fingerprint"]
        parts.append(part)
    if not parts:
        raise InstrumentError("no runs given")
    return concat_answers(parts), infos, model


def hidden_of(run) -> dict:
    """A run's stored hidden states (Answers' hidden fields; rows aligned with `run.samples` / `run.tokens`)."""
    spec = run.config.get("capture", {}).get("hidden") or {}
    out = {}
    if spec.get("layers"):
        out.update(hidden={k: run.hidden(k) for k in ("last_prompt", "answer_mean")}, hidden_layers=spec["layers"])
    if spec.get("token_layers"):
        out.update(hidden_tokens=run.hidden_tokens(), hidden_token_layers=spec["token_layers"])
    return out


def _answers_of(samples: pd.DataFrame, tokens: pd.DataFrame, stat_arrays: dict[str, np.ndarray], layers, n_heads,
                run_name: str, hidden: dict | None = None) -> Answers:
    """Answers of one run (rows in the order of its tokens; `hidden`: `hidden_of`'s fields, aligned with
    `samples` and `tokens`)."""
    benchmark = samples.benchmark.iloc[0] if len(samples) else ""
    order = pd.Index(tokens.question_id.unique())
    sample_rows = pd.Index(samples.question_id).get_indexer(order)
    s = samples.set_index("question_id").loc[order].reset_index()
    labels = s["label"] if "label" in s else pd.Series(["ungraded"] * len(s))
    n_tokens = tokens.groupby("question_id", sort=False).size().loc[order].to_numpy()
    answers = pd.DataFrame({
        "run": run_name, "benchmark": s.benchmark.to_numpy(), "task": [_task(b) for b in s.benchmark],
        "question_id": s.question_id.to_numpy(), "group": (s.benchmark + "\n" + s.question).to_numpy(),
        "kind": [question_kind(b, m) for b, m in zip(s.benchmark, s.metadata)], "label": labels.to_numpy(),
        "y": np.select([labels == "correct", labels == "incorrect"], [1, 0], -1), "n_tokens": n_tokens,
        "start": np.r_[0, np.cumsum(n_tokens)[:-1]].astype(int)})
    tok = pd.DataFrame({"answer": np.repeat(np.arange(len(answers)), n_tokens), "pos": tokens.pos.to_numpy(),
                        "token": tokens.token.to_numpy(),
                        **{k: tokens[k].to_numpy(np.float32) for k in TOKEN_LOGIT},
                        "n_keys": tokens.n_keys.to_numpy()})
    target = np.zeros(len(tok), int)
    if "in_error" in tokens:
        located = s.set_index("question_id").get("error_token_start", pd.Series(dtype=float)).reindex(order)
        located = (located.fillna(-1).to_numpy() >= 0)[tok.answer.to_numpy()]
        target = np.where(tokens.in_error.to_numpy(bool), 1, 0)
        wrong = (answers.y.to_numpy() == 0)[tok.answer.to_numpy()]
        target[wrong & ~located] = -1  # an incorrect answer whose wrong moment the critic did not find
    if benchmark not in MATH:
        target[:] = -1
    target[(answers.y.to_numpy() == -1)[tok.answer.to_numpy()]] = -1  # not attempted, unparsed, ungraded
    tok["target"] = target
    hidden = dict(hidden or {})
    if "hidden" in hidden:
        hidden["hidden"] = {k: v[sample_rows] for k, v in hidden["hidden"].items()}
    return Answers(answers, tok, normalised_attention(stat_arrays, tok.n_keys.to_numpy()), list(layers), n_heads,
                   **hidden)


def concat_answers(parts: list[Answers]) -> Answers:
    offsets = np.r_[0, np.cumsum([len(p.answers) for p in parts])[:-1]]
    token_offsets = np.r_[0, np.cumsum([len(p.tokens) for p in parts])[:-1]]
    answers = pd.concat([p.answers.assign(start=p.answers.start + t) for p, t in zip(parts, token_offsets)],
                        ignore_index=True)
    tokens = pd.concat([p.tokens.assign(answer=p.tokens.answer + o) for p, o in zip(parts, offsets)],
                       ignore_index=True)
    attn = {k: np.concatenate([p.attn[k] for p in parts]) for k in ATTN_FEATURES}
    out = Answers(answers, tokens, attn, parts[0].layers, parts[0].n_heads)
    # hidden states only where every run kept the same ones
    if all(p.hidden and p.hidden_layers == parts[0].hidden_layers for p in parts):
        out.hidden = {k: np.concatenate([p.hidden[k] for p in parts]) for k in parts[0].hidden}
        out.hidden_layers = parts[0].hidden_layers
    if all(p.hidden_tokens is not None and p.hidden_token_layers == parts[0].hidden_token_layers for p in parts):
        out.hidden_tokens = np.concatenate([p.hidden_tokens for p in parts])
        out.hidden_token_layers = parts[0].hidden_token_layers
    return out


def answers_from_generations(generations, layers: list[int], n_heads: int, attn_dtype: str = "float32") -> Answers:
    """Unlabelled answers of freshly generated (recorded) generations: what `attentropy run --probe` scores. The
    statistics are rounded to the run's storage type first, so live scores equal scores of the stored run."""
    from .schema import ATTN_STATS

    rows = []
    for g in generations:
        c = g.capture
        for t, token_id in enumerate(g.completion_ids):
            rows.append((g.question.id, t, token_id, c.logprob[t], c.logit_entropy[t], c.logit_varentropy[t],
                         c.n_keys[t]))
    tokens = pd.DataFrame(rows, columns=["question_id", "pos", "token", *TOKEN_LOGIT, "n_keys"])
    attn = np.concatenate([g.capture.attn for g in generations]).astype(attn_dtype).astype(np.float32)
    samples = pd.DataFrame({"question_id": [g.question.id for g in generations],
                            "benchmark": [g.question.benchmark for g in generations],
                            "question": [g.question.question for g in generations],
                            "metadata": [g.question.metadata for g in generations]})
    stat_arrays = {s: attn[..., i] for i, s in enumerate(ATTN_STATS)}
    return _answers_of(samples, tokens, stat_arrays, layers, n_heads, "live")


def model_identity(config: dict, layers: list[int], n_heads: int) -> dict:
    """What an instrument must match: the model (name, source, revision) and the recorded layer x head layout."""
    model = config.get("model", {})
    return {"name": model.get("name"), "source": model.get("source"), "revision": model.get("revision"),
            "architecture": model.get("architecture"), "layers": list(layers), "n_heads": int(n_heads)}


def run_info(run) -> dict:
    """A run's description; its fingerprint (config.json and the first committed batch's answers) survives copying
    the directory and resuming the run, and tells two runs of the same settings apart."""
    digest = hashlib.sha256((Path(run.path) / "config.json").read_bytes())
    if run.parts:
        digest.update((Path(run.path) / "samples" / f"{run.parts[0]}.parquet").read_bytes())
    labels = run.samples["label"].value_counts().to_dict() if "label" in run.samples else {}
    return {"path": str(Path(run.path).resolve()), "fingerprint": digest.hexdigest()[:16],
            "benchmark": run.config["benchmark"], "answers": len(run.samples),
            "labels": {k: int(v) for k, v in labels.items()}}


# ---------------------------------------------------------------- features

def _segment_means(values: np.ndarray, starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    return np.add.reduceat(values, starts, axis=0) / counts[:, None] if len(starts) else values[:0]


def _prefix_means(values: np.ndarray, a: Answers) -> np.ndarray:
    """[n_tokens, C]: the mean of each column over the answer's tokens up to and including this one."""
    csum = np.cumsum(values, axis=0, dtype=np.float64)
    first = a.answers.start.to_numpy()[a.answer_of_token]
    before = np.where(first[:, None] > 0, csum[np.maximum(first - 1, 0)], 0.0)
    return ((csum - before) / (a.tokens.pos.to_numpy() + 1)[:, None]).astype(np.float32)


def _prefix_min(values: np.ndarray, a: Answers) -> np.ndarray:
    out = values.copy()
    pos = a.tokens.pos.to_numpy()
    for t in range(1, pos.max() + 1 if len(pos) else 0):  # per position: answers are at most max_new_tokens long
        rows = np.flatnonzero(pos == t)
        out[rows] = np.minimum(out[rows], out[rows - 1])
    return out


def attention_token_matrix(a: Answers) -> np.ndarray:
    """[n_tokens, 6 * L * H]: the normalised attention statistics of each token, feature-major."""
    return np.concatenate([a.attn[k].reshape(len(a.tokens), -1) for k in ATTN_FEATURES], axis=1)


def feature_names(layers: list[int], n_heads: int, level: str = "answer") -> list[str]:
    """Names of `instrument_features(level)`' columns."""
    if level == "token":
        return [f"{k}[L{layer}]" for k in ATTN_FEATURES for layer in layers] + list(TOKEN_LOGIT)
    return ([f"{k}[L{layer}H{h}]" for k in ATTN_FEATURES for layer in layers for h in range(n_heads)]
            + ["logprob_mean", "logprob_min", "logit_entropy_mean", "logit_varentropy_mean"])


def instrument_features(a: Answers, level: str) -> np.ndarray:
    """The instrument's features: attention statistics per layer x head, averaged over the answer (`answer`) or
    over the tokens so far (`prefix`), with the logit statistics (mean log-prob, minimum log-prob, mean entropy,
    mean varentropy); or, for a token's own confidence (`token`), its attention statistics per layer (mean over
    heads) with its logit statistics. Per layer x head does a little better on the type-matched wrong moments of the
    main job's arith run (results after '=': 0.846 against 0.830 out of fold, intervals overlapping) at 4-10x the
    fitting time, and is out of reach on large models (Llama 3.2 90B: 30,720 features per token);
    `bench/instrument.py` compares both."""
    logit = np.column_stack([a.tokens[k].to_numpy(np.float32) for k in TOKEN_LOGIT])
    if level == "token":
        per_layer = [a.attn[k].mean(axis=2) for k in ATTN_FEATURES]  # [n_tokens, L] each
        return np.concatenate([*per_layer, logit], axis=1)
    attn = attention_token_matrix(a)
    if level == "answer":
        starts, counts = a.answers.start.to_numpy(), a.answers.n_tokens.to_numpy()
        means = _segment_means(np.concatenate([attn, logit], axis=1), starts, counts)
        lp_min = np.minimum.reduceat(logit[:, 0], starts) if len(starts) else logit[:0, 0]
    elif level == "prefix":
        means = _prefix_means(np.concatenate([attn, logit], axis=1), a)
        lp_min = _prefix_min(logit[:, 0], a)
    else:
        raise ValueError(f"level must be answer, prefix or token, got {level!r}")
    return np.concatenate([means[:, :-3], means[:, -3:-2], lp_min[:, None], means[:, -2:]], axis=1)


# ---------------------------------------------------------------- probes: logistic regression, calibrated

def _sigmoid(x):
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
        return ((np.asarray(X, np.float64) - self.mean) / self.scale) @ self.coef + self.intercept

    def confidence(self, X: np.ndarray) -> np.ndarray:
        return _sigmoid(self.platt[0] * self.decision(X) + self.platt[1])

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
        return LogisticRegression(l1_ratio=1.0, solver="liblinear", **kwargs)
    return LogisticRegression(warm_start=True, **kwargs)


def _row_space(Z: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """(R, V^T) with Z = R V^T when Z has far fewer rows than columns, else (Z, None). An L2-penalised logistic
    regression's weights lie in the row space of its training rows, so fitting on R (n x n) and mapping the weights
    back with V is exactly the same model, fitted on n columns instead of p (4-5x faster at 400 answers x 1,624
    features). From the eigendecomposition of the Gram matrix Z Z^T = U S^2 U^T: R = U S, V^T = S^-1 U^T Z."""
    if Z.shape[1] < 2 * Z.shape[0]:
        return Z, None
    eigenvalues, u = np.linalg.eigh(Z @ Z.T)
    keep = eigenvalues > eigenvalues.max() * 1e-12
    singular = np.sqrt(eigenvalues[keep])
    u = u[:, keep]
    return u * singular, (u.T @ Z) / singular[:, None]


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


def _platt(decision: np.ndarray, y: np.ndarray) -> tuple[float, float]:
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

    X = np.asarray(X, np.float64)
    mean, scale = X.mean(0), X.std(0)
    scale[scale < 1e-12] = 1.0
    Z = (X - mean) / scale
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
    platt = _platt(oof[best], y)
    probe = LinearProbe(mean, scale, coef, intercept, platt, float(Cs[best]), penalty)
    return probe, _sigmoid(platt[0] * oof[best] + platt[1])


# ---------------------------------------------------------------- the methods compared: instrument, baselines, controls

@dataclass
class Fitted:
    """A method fitted on training rows: calibrated confidence of any rows of its features, and honest confidences of
    its own training rows (inner out of fold for probes)."""

    confidence: object  # callable: feature rows -> [n] calibrated P(correct)
    train_confidence: np.ndarray
    detail: dict = field(default_factory=dict)


def fit_fixed(score: np.ndarray, y: np.ndarray, groups=None, seed: int = 0) -> Fitted:
    """A published score used as it is defined (one column, higher = more confident), calibrated by Platt on the
    training rows (a monotone map: only the scale is learned, or the sign where the training rows reverse it)."""
    a, b = _platt(score[:, 0], y)
    return Fitted(lambda s: _sigmoid(a * s[:, 0] + b), _sigmoid(a * score[:, 0] + b), {"platt": [a, b]})


def fit_best_column(scores: np.ndarray, y: np.ndarray, groups=None, seed: int = 0) -> Fitted:
    """The column (e.g. layer) and sign with the highest training AUROC, then calibrated as `fit_fixed`."""
    from sklearn.metrics import roc_auc_score

    auc = np.array([roc_auc_score(y, c) for c in scores.T])
    best = int(np.argmax(np.abs(auc - 0.5)))
    sign = 1.0 if auc[best] >= 0.5 else -1.0
    inner = fit_fixed(sign * scores[:, [best]], y)
    return Fitted(lambda s: inner.confidence(sign * s[:, [best]]), inner.train_confidence,
                  {"column": best, "sign": sign})


def probe_fitter(penalty: str = "l2", balanced: bool = False, shuffle: bool = False):
    def fit(X: np.ndarray, y: np.ndarray, groups: np.ndarray, seed: int = 0) -> Fitted:
        if shuffle:  # the labels permuted: whatever this scores beyond chance is leakage
            y = np.random.default_rng(seed + 7).permutation(y)
        probe, train_conf = fit_probe(X, y, groups, penalty=penalty, balanced=balanced, seed=seed)
        return Fitted(probe.confidence, train_conf, {"C": probe.C, "probe": probe})
    return fit


def rauq_layers(layers: list[int]) -> list[int]:
    """RAUQ's layers: the middle third of the recorded ones (indices into `layers`)."""
    n = len(layers)
    return list(range(n // 3, max(n // 3 + 1, 2 * n // 3)))


RAUQ_ALPHA = 0.5  # the recurrence's weight of the token's own probability (the RAUQ paper's choice for instruct models)


def rauq_features(a: Answers, alpha: float = RAUQ_ALPHA) -> np.ndarray:
    """[n_answers, 2, L_mid, H]: per answer, layer of the middle third and head, the RAUQ uncertainty
    -mean_i ln c_i with c_1 = p_1, c_i = alpha p_i + (1 - alpha) a_(i,i-1) c_(i-1) (p_i the token's probability,
    a_(i,i-1) that head's attention to the previous token), and (second) the answer's summed attention to the
    previous token, from which the head of each layer is chosen on training answers."""
    mid = rauq_layers(a.layers)
    prev = a.attn["prev_mass"][:, mid].astype(np.float64)  # [n_tokens, L_mid, H]
    p = np.exp(a.tokens.logprob.to_numpy(np.float64))[:, None, None]
    pos = a.tokens.pos.to_numpy()
    log_c = np.zeros_like(prev)
    c = np.zeros_like(prev)
    for t in range(pos.max() + 1 if len(pos) else 0):  # recurrence along positions, all answers at once
        rows = np.flatnonzero(pos == t)
        c[rows] = p[rows] if t == 0 else alpha * p[rows] + (1 - alpha) * prev[rows] * c[rows - 1]
        log_c[rows] = np.log(np.maximum(c[rows], 1e-300))
    starts, counts = a.answers.start.to_numpy(), a.answers.n_tokens.to_numpy()
    n_cells = prev.shape[1] * prev.shape[2]
    uncertainty = -_segment_means(log_c.reshape(len(prev), n_cells), starts, counts)
    prev_sum = np.add.reduceat(prev.reshape(len(prev), n_cells), starts, axis=0) if len(starts) else prev[:0]
    return np.stack([uncertainty, prev_sum], axis=1).reshape(len(starts), 2, *prev.shape[1:])


def fit_rauq(feats: np.ndarray, y: np.ndarray, groups=None, seed: int = 0) -> Fitted:
    """RAUQ: per layer of the middle third the head with the highest mean attention to the previous token on the
    training answers (no labels used); answer uncertainty = max over those layers; confidence = its negative,
    calibrated as `fit_fixed`."""
    heads = feats[:, 1].sum(axis=0).argmax(axis=1)  # [L_mid]

    def score(f):
        return -f[:, 0, np.arange(len(heads)), heads].max(axis=1, keepdims=True)

    inner = fit_fixed(score(feats), y)
    return Fitted(lambda f: inner.confidence(score(f)), inner.train_confidence, {"heads": heads.tolist()})


def lookback_ratios(a: Answers) -> np.ndarray:
    """[n_answers, L * H]: Lookback Lens' ratio per head, averaged over the answer: mean attention per prompt key /
    (that + mean attention per generated key). Completion token t sees K - t prompt keys and t generated ones (its
    first token sees only the prompt: ratio 1)."""
    prompt = a.attn["prompt_mass"].reshape(len(a.tokens), -1).astype(np.float64)
    n_keys, pos = a.tokens.n_keys.to_numpy(np.float64), a.tokens.pos.to_numpy(np.float64)
    per_prompt_key = prompt / (n_keys - pos)[:, None]
    per_generated_key = np.where(pos[:, None] > 0, (1 - prompt) / np.maximum(pos, 1)[:, None], 0.0)
    ratio = per_prompt_key / np.maximum(per_prompt_key + per_generated_key, 1e-12)
    return _segment_means(ratio, a.answers.start.to_numpy(), a.answers.n_tokens.to_numpy())


def llm_check_scores(a: Answers) -> np.ndarray:
    """[n_answers, L]: LLM-Check's attention score per layer, sum over heads of the mean over the answer's tokens of
    ln(attention on the token itself) (log-determinant of the causal attention matrix's answer rows)."""
    log_diag = np.log(np.maximum(a.attn["diag_mass"].astype(np.float64), 1e-30)).sum(axis=2)  # [n_tokens, L]
    return _segment_means(log_diag, a.answers.start.to_numpy(), a.answers.n_tokens.to_numpy())


def answer_feature_sets(a: Answers, kinds: list[str] | None = None) -> dict[str, np.ndarray]:
    """Every method's answer-level features, computed once for all answers (folds index their rows). `kinds`: the
    question kinds that get a one-hot column (default: those of `a`; a kind not among them gets none)."""
    instrument = instrument_features(a, "answer")
    n_attn = len(ATTN_FEATURES) * len(a.layers) * a.n_heads
    logit = instrument[:, n_attn:]  # mean logprob, min logprob, mean logit entropy, mean logit varentropy
    kinds = sorted(a.answers.kind.unique()) if kinds is None else kinds
    kinds = (a.answers.kind.to_numpy()[:, None] == np.array(kinds, dtype=object)[None]).astype(np.float64)
    first = a.answers.start.to_numpy()
    entropy_first = (a.attn["entropy_norm"][first] * np.log(np.maximum(a.tokens.n_keys.to_numpy()[first], 2))[
        :, None, None]).reshape(len(first), -1)
    hidden = {}
    if a.hidden:
        mean, prompt = a.hidden["answer_mean"], a.hidden["last_prompt"]
        hidden = {"hidden_mean": mean, "hidden_prompt": prompt, "attention_hidden": (instrument, mean)}
        if 0 in a.hidden_layers:
            hidden["bag_of_tokens"] = mean[:, a.hidden_layers.index(0)]
    return {**hidden, "instrument": instrument, "attention": instrument[:, :n_attn], "logit": logit,
            "mean_logprob": logit[:, [0]], "min_logprob": logit[:, [1]], "neg_logit_entropy": -logit[:, [2]],
            "neg_logit_varentropy": -logit[:, [3]], "lookback": lookback_ratios(a), "llm_check": llm_check_scores(a),
            "rauq": rauq_features(a), "head_entropy": entropy_first,
            "length": np.log(a.answers.n_tokens.to_numpy(np.float64))[:, None], "kind": kinds,
            "kind_logit": np.concatenate([kinds, logit], axis=1)}


# name -> (features, fitter, role, description). The instrument is the first; roles: baseline (published
# detectors re-expressed on the stored statistics), control (what a result must beat to mean anything).
ANSWER_METHODS = {
    "instrument": ("instrument", probe_fitter(), "instrument",
                   "attention (6 statistics per layer x head) + logit statistics, L2 logistic probe"),
    "attention": ("attention", probe_fitter(), "instrument", "attention statistics alone, L2 logistic probe"),
    "logit_probe": ("logit", probe_fitter(), "baseline", "logit statistics alone (4), L2 logistic probe"),
    "mean_logprob": ("mean_logprob", fit_fixed, "baseline", "MSP: mean token log-probability"),
    "min_logprob": ("min_logprob", fit_fixed, "baseline", "minimum token log-probability"),
    "logit_entropy": ("neg_logit_entropy", fit_fixed, "baseline", "mean next-token entropy (negated)"),
    "logit_varentropy": ("neg_logit_varentropy", fit_fixed, "baseline",
                         "mean next-token varentropy (negated; Entropix's signal)"),
    "lookback_lens": ("lookback", probe_fitter(), "baseline",
                      "Lookback Lens: prompt / generated attention ratio per layer x head, logistic probe"),
    "llm_check": ("llm_check", fit_best_column, "baseline",
                  "LLM-Check attention score (sum over heads of mean log own-token attention), best layer on "
                  "training folds"),
    "rauq": ("rauq", fit_rauq, "baseline", "RAUQ (alpha 0.5, middle third of layers, previous-token heads)"),
    "head_entropy": ("head_entropy", probe_fitter("l1"), "baseline",
                     "Attention Head Entropy: per-head entropy before the answer (Shannon), L1 logistic probe"),
    "length": ("length", probe_fitter(), "control", "answer length alone"),
    "kind": ("kind", probe_fitter(), "control", "question kind alone"),
    "kind_logit": ("kind_logit", probe_fitter(), "control", "question kind + logit statistics"),
    "shuffled": ("instrument", probe_fitter(shuffle=True), "control",
                 "the instrument trained on shuffled labels (must be at chance)"),
}
LOGIT_BASELINES = ("logit_probe", "mean_logprob", "min_logprob", "logit_entropy", "logit_varentropy")
# the instrument itself, its variants (attention alone, with hidden states) and the shuffled-label control: not the
# baselines or controls it is measured against
NOT_COMPETITORS = ("instrument", "attention", "attention_hidden", "shuffled")


def best_layer_fitter(layers: list[int], balanced: bool = False):
    """A probe on hidden states [n, L, d] of the layer whose probe has the highest inner cross-validated AUROC on
    the training rows (one regularisation strength for the choice, the usual grid for the chosen layer; index 0,
    the embeddings, is not a candidate: it is the bag-of-tokens control). X may also be (other features [n, F],
    hidden [n, L, d]): the chosen layer's hidden states are then appended to the other features."""
    candidates = [i for i, layer in enumerate(layers) if layer != 0] or list(range(len(layers)))
    chosen: dict = {}  # the same training rows (e.g. "hidden" and "attention_hidden" in one fold): one choice

    def fit(X, y: np.ndarray, groups: np.ndarray, seed: int = 0) -> Fitted:
        from sklearn.metrics import roc_auc_score

        hidden = X[1] if isinstance(X, tuple) else X
        key = hashlib.sha1(np.ascontiguousarray(hidden).tobytes() + np.asarray(y).tobytes()).hexdigest() + str(seed)
        if key not in chosen:
            scores = [roc_auc_score(y, fit_probe(np.asarray(hidden[:, i], np.float32), y, groups, Cs=(1e-2,),
                                                 balanced=balanced, seed=seed)[1]) for i in candidates]
            chosen[key] = candidates[int(np.argmax(scores))]
        best = chosen[key]

        def features(x):
            h = np.asarray((x[1] if isinstance(x, tuple) else x)[:, best], np.float32)
            return np.concatenate([x[0], h], axis=1) if isinstance(x, tuple) else h

        probe, train_conf = fit_probe(features(X), y, groups, balanced=balanced, seed=seed)
        return Fitted(lambda x: probe.confidence(features(x)), train_conf, {"C": probe.C, "layer": layers[best]})
    return fit


def methods_for(a: Answers) -> dict:
    """The methods compared on these answers: ANSWER_METHODS, and where the runs kept hidden states the
    hidden-state probes (the strongest single-pass detectors in recent work are linear probes on a middle layer's
    residual stream: SAPLMA, "The Geometry of Truth"), the instrument combined with one, and the bag-of-tokens
    control (the mean input embedding of the answer, hidden state 0: what the answer says)."""
    methods = dict(ANSWER_METHODS)
    if a.hidden:
        fitter = best_layer_fitter(a.hidden_layers)
        methods.update({
            "hidden": ("hidden_mean", fitter, "baseline",
                       "hidden-state probe: residual stream averaged over the answer, best layer on training folds"),
            "hidden_prompt": ("hidden_prompt", fitter, "baseline", "hidden-state probe at the last prompt token "
                              "(before the answer), best layer on training folds"),
            "attention_hidden": ("attention_hidden", fitter, "instrument",
                                 "the instrument's features + the hidden-state probe's (its best layer)")})
        if 0 in a.hidden_layers:
            methods["bag_of_tokens"] = ("bag_of_tokens", probe_fitter(), "control",
                                        "mean input embedding of the answer's tokens (what it says), L2 probe")
    return methods


def _take(features, rows):
    """Rows of a feature array, or of each array of a tuple of them."""
    return tuple(f[rows] for f in features) if isinstance(features, tuple) else features[rows]


def token_feature_sets(a: Answers) -> dict[str, np.ndarray]:
    token = instrument_features(a, "token")
    logit = token[:, -3:]
    hidden = {"hidden_tokens": a.hidden_tokens} if a.hidden_tokens is not None else {}
    return {**hidden, "instrument": token, "logit": logit, "logprob": logit[:, [0]],
            "neg_logit_entropy": -logit[:, [1]], "neg_logit_varentropy": -logit[:, [2]],
            "position": np.log1p(a.tokens.pos.to_numpy(np.float64))[:, None]}


TOKEN_METHODS = {
    "instrument": ("instrument", probe_fitter(balanced=True), "instrument",
                   "the token's attention statistics (per layer, mean over heads) + its logit statistics, L2 "
                   "logistic probe"),
    "logit_probe": ("logit", probe_fitter(balanced=True), "baseline", "the token's logit statistics, logistic probe"),
    "logprob": ("logprob", fit_fixed, "baseline", "the token's log-probability"),
    "logit_entropy": ("neg_logit_entropy", fit_fixed, "baseline", "next-token entropy (negated)"),
    "logit_varentropy": ("neg_logit_varentropy", fit_fixed, "baseline", "next-token varentropy (negated)"),
    "position": ("position", probe_fitter(balanced=True), "control", "the token's position alone"),
}


def token_methods_for(a: Answers) -> dict:
    """TOKEN_METHODS, and a probe on the token's own hidden states where the runs kept them."""
    methods = dict(TOKEN_METHODS)
    if a.hidden_tokens is not None:
        methods["hidden"] = ("hidden_tokens", best_layer_fitter(a.hidden_token_layers, balanced=True), "baseline",
                             "hidden-state probe on the token's own row, best layer on training folds")
    return methods


# ---------------------------------------------------------------- cross-validated evaluation

def outer_splits(a: Answers, rows: np.ndarray, n_splits: int = OUTER_FOLDS, seed: int = 0) -> list[np.ndarray]:
    """Fold index (0 .. n_splits-1) of every answer in `rows`, grouped by question (all answers of one question,
    across runs, fall in one fold) and stratified by label."""
    from sklearn.model_selection import StratifiedGroupKFold

    labels = a.answers.label.to_numpy()[rows]
    strata = a.answers.y.to_numpy()[rows]  # correct, incorrect, neither (not attempted, unparsed)
    n = min(n_splits, int(pd.Series(a.answers.y.to_numpy()[rows]).value_counts().get(0, 0)),
            int(pd.Series(a.answers.y.to_numpy()[rows]).value_counts().get(1, 0)))
    if n < 2:
        raise InstrumentError(f"too few correct or incorrect answers to cross-validate (labels: "
                              f"{pd.Series(labels).value_counts().to_dict()})")
    fold = np.empty(len(rows), int)
    splitter = StratifiedGroupKFold(n, shuffle=True, random_state=seed)
    for i, (_, test) in enumerate(splitter.split(rows, strata, a.answers.group.to_numpy()[rows])):
        fold[test] = i
    return fold


def f_score(correct: float, attempted_correct_rate: float) -> float:
    c, cga = correct, attempted_correct_rate
    return 2 * c * cga / (c + cga) if (c + cga) > 0 else 0.0


def selective_outcome(confidence: np.ndarray, labels: np.ndarray, threshold: float) -> dict:
    """SimpleQA's metrics when every answer below `threshold` becomes `not_attempted` (answers already not
    attempted stay so): correct, not attempted, correct given attempted, F-score, coverage (share attempted)."""
    attempted = (confidence >= threshold) & (labels != "not_attempted")
    correct = attempted & (labels == "correct")
    n = len(labels)
    cga = correct.sum() / attempted.sum() if attempted.any() else 0.0
    return {"coverage": attempted.mean() if n else 0.0, "correct": correct.sum() / n if n else 0.0,
            "correct_given_attempted": float(cga), "f_score": f_score(correct.sum() / max(n, 1), cga)}


def choose_threshold(confidence: np.ndarray, labels: np.ndarray) -> float:
    """The abstention threshold with the highest F-score on these (training) answers; 0 keeps every answer."""
    candidates = np.r_[0.0, np.unique(confidence)]
    scores = [selective_outcome(confidence, labels, t)["f_score"] for t in candidates]
    return float(candidates[int(np.argmax(scores))])


def _sample_negatives(y: np.ndarray, ratio: int, seed: int) -> np.ndarray:
    """Rows to train a token model on: every wrong-moment token (y == 0) and at most `ratio` times as many others,
    drawn at random (the class weights are balanced anyway; this bounds the fitting time)."""
    rare, common = np.flatnonzero(y == 0), np.flatnonzero(y == 1)
    keep = min(len(common), max(ratio * len(rare), 1))
    return np.sort(np.r_[rare, np.random.default_rng(seed).choice(common, keep, replace=False)])


NEGATIVES_PER_POSITIVE = 20


@dataclass
class CrossValidation:
    """Out-of-fold confidences of every method for one task's answers (and tokens)."""

    rows: np.ndarray  # answers of the task (rows of Answers.answers)
    fold: np.ndarray  # fold of each of those answers
    answer: pd.DataFrame  # per answer (rows): method -> out-of-fold confidence
    selective: pd.DataFrame  # per answer and method: the threshold chosen on its training folds
    prefix: np.ndarray  # per token of `rows`' answers: the instrument's out-of-fold prefix confidence
    token: pd.DataFrame | None  # per token of `rows`' answers: token method -> out-of-fold confidence (math)
    details: dict


def _token_rows(a: Answers, rows: np.ndarray) -> np.ndarray:
    starts, counts = a.answers.start.to_numpy()[rows], a.answers.n_tokens.to_numpy()[rows]
    return np.concatenate([np.arange(s, s + n) for s, n in zip(starts, counts)]) if len(rows) else np.zeros(0, int)


def cross_validate(a: Answers, rows: np.ndarray, *, methods: dict | None = None, token_methods: dict | None = None,
                   seed: int = 0, progress=None) -> CrossValidation:
    """Every method fitted on the training folds of each outer fold, scored on the held-out fold (answers
    grouped by question: no question is in two folds). Only correct / incorrect answers train; every answer of
    a held-out fold is scored. Thresholds for selective answering come from the training folds' honest
    confidences. Methods: `methods_for(a)`, `token_methods_for(a)` unless given."""
    methods = methods_for(a) if methods is None else methods
    token_methods = token_methods_for(a) if token_methods is None else token_methods
    fold = outer_splits(a, rows, seed=seed)
    feats = answer_feature_sets(a)
    y_all, groups_all, labels_all = a.answers.y.to_numpy(), a.answers.group.to_numpy(), a.answers.label.to_numpy()
    answer = pd.DataFrame(index=rows, columns=list(methods), dtype=float)
    thresholds = pd.DataFrame(index=rows, columns=list(methods), dtype=float)
    tok_rows = _token_rows(a, rows)
    token_fold = np.repeat(fold, a.answers.n_tokens.to_numpy()[rows])
    prefix_feats = instrument_features(a.subset(rows), "prefix")  # tokens of `rows` in order: tok_rows
    prefix = np.full(len(tok_rows), np.nan)
    token = None
    target = a.tokens.target.to_numpy()[tok_rows]
    has_tokens = token_methods and (target == 1).sum() >= 2
    if has_tokens:
        tfeats = {k: v[tok_rows] for k, v in token_feature_sets(a).items()}
        token = pd.DataFrame(index=np.arange(len(tok_rows)), columns=list(token_methods), dtype=float)
        t_groups = groups_all[a.answer_of_token[tok_rows]]
    details: dict = {"folds": int(fold.max() + 1), "C": {}, "threshold": {}}
    for k in range(fold.max() + 1):
        train = rows[(fold != k) & (y_all[rows] >= 0)]
        test = rows[fold == k]
        for name, (feature, fitter, _, _) in methods.items():
            if progress:
                progress(f"fold {k + 1}: {name}")
            fitted = fitter(_take(feats[feature], train), y_all[train], groups_all[train], seed=seed + k)
            answer.loc[test, name] = fitted.confidence(_take(feats[feature], test))
            thresholds.loc[test, name] = choose_threshold(fitted.train_confidence, labels_all[train])
            if "C" in fitted.detail:
                details["C"].setdefault(name, []).append(fitted.detail["C"])
            if name == "instrument":
                prefix[token_fold == k] = fitted.confidence(prefix_feats[token_fold == k])
        if has_tokens:
            usable = np.flatnonzero((token_fold != k) & (target >= 0))
            train_t = usable[_sample_negatives(1 - target[usable], NEGATIVES_PER_POSITIVE, seed + k)]
            test_t = np.flatnonzero(token_fold == k)
            for name, (feature, fitter, _, _) in token_methods.items():
                if progress:
                    progress(f"fold {k + 1}: token {name}")
                fitted = fitter(tfeats[feature][train_t], 1 - target[train_t], t_groups[train_t], seed=seed + k)
                token.loc[test_t, name] = fitted.confidence(tfeats[feature][test_t])
                if "C" in fitted.detail:
                    details["C"].setdefault(f"token:{name}", []).append(fitted.detail["C"])
    return CrossValidation(rows, fold, answer, thresholds, prefix, token, details)


# ---------------------------------------------------------------- metrics with intervals that resample questions

MIN_PER_CLASS = 2  # answers of each class for a metric to be computed at all
MIN_TO_CONCLUDE = 20  # per class, as the within-kind criterion; smaller subsets are flagged


def _row(task, evaluation, subset, method, role, metric, value, lo=np.nan, hi=np.nan, n_pos=0, n_neg=0) -> dict:
    return {"task": task, "evaluation": evaluation, "subset": subset, "method": method, "role": role,
            "metric": metric, "value": float(value), "lo": float(lo), "hi": float(hi), "n_positive": int(n_pos),
            "n_negative": int(n_neg)}


def discrimination_rows(task: str, evaluation: str, subset: str, confidences: pd.DataFrame, y: np.ndarray,
                        groups: np.ndarray, roles: dict, *, n_boot: int, seed: int,
                        metrics=tuple(stats.SCORE_METRICS), positive_name: str = "correct") -> list[dict]:
    """Every method's metrics on the same items and the same bootstrap resamples of their questions, plus the
    paired AUROC difference instrument - method."""
    y = np.asarray(y, float)
    n_pos, n_neg = int((y == 1).sum()), int((y == 0).sum())
    if min(n_pos, n_neg) < MIN_PER_CLASS:
        return []
    weights = stats.group_counts(groups, n_boot, seed)
    rows, boot_auc = [], {}
    for method in confidences:
        conf = confidences[method].to_numpy(float)
        for metric, (value, lo, hi) in stats.score_metrics(conf, y, weights, metrics).items():
            rows.append(_row(task, evaluation, subset, method, roles[method], metric, value, lo, hi, n_pos, n_neg))
        boot_auc[method] = stats.weighted_auroc_rows(conf, y, weights)
    if "instrument" in boot_auc:
        point = {m: r["value"] for r in rows if r["metric"] == "auroc" for m in [r["method"]]}
        for method, boot in boot_auc.items():
            if method == "instrument":
                continue
            lo, hi = np.nanpercentile(boot_auc["instrument"] - boot, [2.5, 97.5])
            rows.append(_row(task, evaluation, subset, method, roles[method], "auroc_gain_of_instrument",
                             point["instrument"] - point[method], lo, hi, n_pos, n_neg))
    return rows


def stratified_rows(task: str, confidences: pd.DataFrame, y: np.ndarray, strata: np.ndarray, groups: np.ndarray,
                    roles: dict, *, n_boot: int, seed: int) -> list[dict]:
    """Stratified AUROC: only pairs (correct, incorrect) of the same stratum (question kind) count, so a method
    cannot score by telling kinds apart. The pooled pair-weighted mean of the per-stratum AUROCs."""
    usable = [s for s in np.unique(strata) if min((y[strata == s] == 1).sum(), (y[strata == s] == 0).sum()) >= 1]
    if not usable:
        return []
    weights = np.r_[np.ones((1, len(y))), stats.group_counts(groups, n_boot, seed)]
    rows = []
    for method in confidences:
        value = stats.stratified_auroc(confidences[method].to_numpy(float)[:, None], y == 1, strata, weights)[:, 0]
        lo, hi = np.nanpercentile(value[1:], [2.5, 97.5])
        rows.append(_row(task, "stratified", "pairs within a kind", method, roles[method], "auroc", value[0], lo, hi,
                         (y == 1).sum(), (y == 0).sum()))
    return rows


def selective_rows(task: str, confidence: pd.DataFrame, thresholds: pd.DataFrame, labels: np.ndarray,
                   groups: np.ndarray, roles: dict, policies: list[str], *, n_boot: int, seed: int) -> list[dict]:
    """Abstention below each answer's fold's training threshold (`thresholds`, per method), pooled over the
    held-out folds: coverage, correct, correct given attempted and F-score (SimpleQA's), next to answering
    everything."""
    weights = np.r_[np.ones((1, len(labels))), stats.group_counts(groups, n_boot, seed)]
    rows = []
    for method in [None, *policies]:
        if method is None:
            attempted = labels != "not_attempted"
        else:
            attempted = (confidence[method].to_numpy(float) >= thresholds[method].to_numpy(float)) & (
                labels != "not_attempted")
        correct = attempted & (labels == "correct")
        n = weights.sum(1)
        values = {"coverage": weights @ attempted / n, "correct": weights @ correct / n}
        with np.errstate(divide="ignore", invalid="ignore"):
            values["correct_given_attempted"] = weights @ correct / (weights @ attempted)
        c, cga = values["correct"], values["correct_given_attempted"]
        with np.errstate(divide="ignore", invalid="ignore"):
            values["f_score"] = np.where(c + cga > 0, 2 * c * cga / (c + cga), 0.0)
        name = method or "answer_everything"
        for metric, v in values.items():
            lo, hi = np.nanpercentile(v[1:], [2.5, 97.5])
            rows.append(_row(task, "selective", "threshold from training folds", name,
                             roles.get(method, "reference"), metric, v[0], lo, hi, (labels == "correct").sum(),
                             (labels == "incorrect").sum()))
    return rows


def coverage_curve(confidence: np.ndarray, labels: np.ndarray, points: int = 41) -> pd.DataFrame:
    """F-score, correct given attempted (= accuracy on the attempted answers) and coverage as the abstention
    threshold sweeps the confidences' quantiles."""
    qs = np.unique(np.quantile(confidence, np.linspace(0, 1, points)))
    return pd.DataFrame([{"threshold": t, **selective_outcome(confidence, labels, t)} for t in np.r_[0.0, qs]])


def token_types(tokens: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """(digits, results): tokens holding a digit; and those of them in a number written right after '=' (the
    result of a step: "3 * 4 = 12" -> the tokens of 12)."""
    text = tokens.astype(str).to_numpy()
    digits = np.array(["".join(ch for ch in t if not ch.isspace()).replace(",", "").replace(".", "").isdigit()
                       and any(ch.isdigit() for ch in t) for t in text])
    results = np.zeros(len(text), bool)
    after_equals = False
    for i, t in enumerate(text):
        stripped = t.strip()
        if digits[i]:
            results[i] = after_equals
        elif stripped.endswith("="):
            after_equals = True
            continue
        elif stripped in ("", "$"):
            continue
        if not digits[i]:
            after_equals = False
    return digits, results


def token_comparisons(a: Answers, tok_rows: np.ndarray, window: int = WINDOW) -> dict[str, tuple[np.ndarray,
                                                                                                  np.ndarray]]:
    """name -> (positive, negative) masks over `tok_rows`: the critic's wrong-moment tokens against
    the other tokens of the same incorrect answers; those within `window` positions of it; and, token type held
    fixed, wrong-moment digit tokens against the digit tokens of *all* answers (correct ones included), and the
    same for results written after '='."""
    tok = a.tokens.iloc[tok_rows]
    target = tok.target.to_numpy()
    answer = tok.answer.to_numpy()
    in_error = target == 1
    known = target >= 0
    error_answers = np.unique(answer[in_error])
    in_wrong = np.isin(answer, error_answers)
    near = stats.position_matched(answer, tok.pos.to_numpy(), in_error, window)
    digits, results = token_types(tok.token)
    return {"same_answers": (in_error, in_wrong & ~in_error),
            "position_matched": (in_error, near),
            "type_matched_digits": (in_error & digits, known & ~in_error & digits),
            "type_matched_results": (in_error & results, known & ~in_error & results)}


TOKEN_COMPARISON_TITLES = {
    "same_answers": "wrong-moment tokens vs the other tokens of the same incorrect answers",
    "position_matched": f"wrong-moment tokens vs tokens within {WINDOW} positions of them",
    "type_matched_digits": "wrong-moment digit tokens vs digit tokens of all answers (correct ones included)",
    "type_matched_results": "wrong-moment results (after '=') vs results of all answers (correct ones included)",
}


def _roles(methods: dict) -> dict:
    return {name: spec[2] for name, spec in methods.items()}


NOT_OUT_OF_KIND = ("kind", "kind_logit", "shuffled")


def leave_one_kind_out(a: Answers, rows: np.ndarray, *, methods: dict | None = None, seed: int = 0,
                       progress=None) -> pd.DataFrame:
    """Out-of-kind confidences: each kind scored by the methods fitted on the other kinds only (the kinds the
    instrument will meet are not the ones it was fitted on). Empty where fewer than two kinds exist. Not for the
    controls that read the kind (a kind left out has no column of its own) or the shuffled labels."""
    methods = methods_for(a) if methods is None else methods
    methods = {m: spec for m, spec in methods.items() if m not in NOT_OUT_OF_KIND}
    kinds = a.answers.kind.to_numpy()[rows]
    y = a.answers.y.to_numpy()
    feats = answer_feature_sets(a)
    out = pd.DataFrame(index=rows, columns=list(methods), dtype=float)
    if len(np.unique(kinds)) < 2:
        return out.iloc[:0]
    for kind in np.unique(kinds):
        train = rows[(kinds != kind) & (y[rows] >= 0)]
        test = rows[kinds == kind]
        if min((y[train] == 1).sum(), (y[train] == 0).sum()) < 2 * INNER_FOLDS:
            continue
        for name, (feature, fitter, _, _) in methods.items():
            if progress:
                progress(f"leave out {kind}: {name}")
            fitted = fitter(_take(feats[feature], train), y[train], a.answers.group.to_numpy()[train], seed=seed)
            out.loc[test, name] = fitted.confidence(_take(feats[feature], test))
    return out


def evaluate(a: Answers, task: str, *, n_boot: int = 1000, seed: int = 0, progress=None
             ) -> tuple[pd.DataFrame, dict]:
    """The whole evaluation of one task's answers: rows of (evaluation, subset, method, metric, value, interval)
    and the out-of-fold predictions behind them (for figures and the token viewer)."""
    rows = np.flatnonzero(a.answers.task.to_numpy() == task)
    cv = cross_validate(a, rows, seed=seed, progress=progress)
    loko = leave_one_kind_out(a, rows, seed=seed, progress=progress)
    roles, token_roles = _roles(methods_for(a)), _roles(token_methods_for(a))
    answers = a.answers.iloc[rows]
    y, groups, kinds = answers.y.to_numpy(), answers.group.to_numpy(), answers.kind.to_numpy()
    lab = y >= 0
    out: list[dict] = []
    out += discrimination_rows(task, "in_distribution", "all", cv.answer[lab], y[lab], groups[lab], roles,
                               n_boot=n_boot, seed=seed)
    for kind in np.unique(kinds):
        m = lab & (kinds == kind)
        out += discrimination_rows(task, "within_kind", kind, cv.answer[m], y[m], groups[m], roles, n_boot=n_boot,
                                   seed=seed, metrics=("auroc",))
        if len(loko) and not loko.loc[rows[m]].isna().all().all():
            out += discrimination_rows(task, "leave_one_kind_out", kind, loko.loc[rows[m]], y[m], groups[m], roles,
                                       n_boot=n_boot, seed=seed, metrics=("auroc",))
    if len(np.unique(kinds)) > 1:
        out += stratified_rows(task, cv.answer[lab], y[lab], kinds[lab], groups[lab], roles, n_boot=n_boot,
                               seed=seed)
    in_dist = pd.DataFrame(out)
    auc = in_dist.query("evaluation == 'in_distribution' and metric == 'auroc'").set_index("method").value
    best_logit = max(LOGIT_BASELINES, key=lambda m: auc.get(m, -1))
    graded = answers.label.to_numpy() != "unparsed"
    out += selective_rows(task, cv.answer[graded], cv.selective[graded], answers.label.to_numpy()[graded],
                          groups[graded], roles, ["instrument", best_logit], n_boot=n_boot, seed=seed)
    # prefix confidence: the answer model on the first k tokens (whole answers when shorter)
    tok_rows = _token_rows(a, rows)
    lengths = answers.n_tokens.to_numpy()
    tok_answer = np.repeat(np.arange(len(rows)), lengths)
    local_start = np.r_[0, np.cumsum(lengths)[:-1]]
    for k in (*PREFIX_LENGTHS, None):
        pick = local_start + (lengths if k is None else np.minimum(lengths, k)) - 1
        conf = pd.DataFrame({"instrument": cv.prefix[pick]})
        out += discrimination_rows(task, "prefix", "whole answer" if k is None else f"first {k} tokens",
                                   conf[lab], y[lab], groups[lab], roles, n_boot=n_boot, seed=seed,
                                   metrics=("auroc",))
    token_table = None
    if cv.token is not None:
        tok_groups = groups[tok_answer]
        for name, (positive, negative) in token_comparisons(a, tok_rows).items():
            use = positive | negative
            if positive.sum() < MIN_PER_CLASS:
                continue
            # positive class here: the wrong moment; a method flags it by low confidence
            flagged = 1 - cv.token[use].astype(float)
            out += discrimination_rows(task, f"token:{name}", TOKEN_COMPARISON_TITLES[name], flagged,
                                       positive[use].astype(float), tok_groups[use], token_roles, n_boot=n_boot,
                                       seed=seed, metrics=("auroc",))
        token_table = cv.token
    evaluation = pd.DataFrame(out)
    identity = answers[["run", "run_fingerprint", "question_id", "kind", "label", "y"]].reset_index(drop=True)
    predictions = identity.assign(
        fold=cv.fold, **{f"confidence:{m}": cv.answer[m].to_numpy(float) for m in cv.answer},
        **{f"threshold:{m}": cv.selective[m].to_numpy(float) for m in cv.selective},
        **({f"loko:{m}": loko[m].reindex(rows).to_numpy(float) for m in loko} if len(loko) else {}))
    tokens = a.tokens.iloc[tok_rows][["pos", "token", "target"]].reset_index(drop=True).assign(
        run=answers.run.to_numpy()[tok_answer], run_fingerprint=answers.run_fingerprint.to_numpy()[tok_answer],
        question_id=answers.question_id.to_numpy()[tok_answer],
        prefix_confidence=cv.prefix)
    if token_table is not None:
        tokens = tokens.assign(**{f"confidence:{m}": token_table[m].to_numpy(float) for m in token_table})
    summary = {"answers": int(len(rows)), "labels": answers.label.value_counts().to_dict(),
               "kinds": answers.kind.value_counts().to_dict(), "folds": cv.details["folds"],
               "chosen_C": cv.details["C"], "best_logit_baseline": best_logit,
               "wrong_moment_tokens": int((a.tokens.target.to_numpy()[tok_rows] == 1).sum())}
    return evaluation, {"answers": predictions, "tokens": tokens, "summary": summary}


# ---------------------------------------------------------------- the fitted instrument: fit, save, load, score

@dataclass
class Instrument:
    """Fitted answer models (one per task) and the token model, for one model's recorded layer x head layout."""

    identity: dict  # model_identity(): the model and layout it belongs to
    answer_models: dict[str, LinearProbe]  # task -> probe on instrument_features(answer)
    token_model: LinearProbe | None  # probe on instrument_features(token): P(not the wrong moment)
    meta: dict = field(default_factory=dict)  # training runs, features, versions, evaluation summary

    def check(self, identity: dict, what: str) -> None:
        """Refuse a run or model other than the one the instrument was fitted on."""
        differences = [f"{k}: instrument {self.identity.get(k)!r}, {what} {identity.get(k)!r}"
                       for k in ("name", "revision", "layers", "n_heads") if self.identity.get(k) != identity.get(k)]
        if differences:
            raise InstrumentError(f"this instrument belongs to another model or layout than {what}: "
                                  + "; ".join(differences))

    def score(self, a: Answers) -> pd.DataFrame:
        """Per token of `a`: `prefix_confidence` (the answer model of the answer's task on the tokens so far; at
        the last token: the answer confidence) and `confidence` (the token model; NaN without one)."""
        out = pd.DataFrame({"question_id": a.answers.question_id.to_numpy()[a.answer_of_token],
                            "pos": a.tokens.pos.to_numpy(), "confidence": np.nan, "prefix_confidence": np.nan})
        if not len(out):
            return out
        tasks = a.answers.task.to_numpy()[a.answer_of_token]
        prefix = instrument_features(a, "prefix")
        for task, model in self.answer_models.items():
            rows = tasks == task
            if rows.any():
                out.loc[rows, "prefix_confidence"] = model.confidence(prefix[rows])
        if self.token_model is not None:
            out["confidence"] = self.token_model.confidence(instrument_features(a, "token"))
        return out

    @property
    def fingerprint(self) -> str:
        return self.meta.get("fingerprint", "")

    def save(self, out: str | Path) -> Path:
        from .store import write_json

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        arrays = {}
        for task, model in self.answer_models.items():
            arrays.update(model.arrays(f"answer.{task}"))
        if self.token_model is not None:
            arrays.update(self.token_model.arrays("token"))
        tmp = out / "arrays.tmp.npz"
        np.savez(tmp, **arrays)
        tmp.replace(out / "arrays.npz")
        digest = hashlib.sha256((out / "arrays.npz").read_bytes()).hexdigest()[:16]
        self.meta["fingerprint"] = digest
        write_json(out / "probe.json", {"format": FORMAT, "model": self.identity,
                                        "answer_models": sorted(self.answer_models),
                                        "token_model": self.token_model is not None, **self.meta})
        return out


def load_instrument(path: str | Path) -> Instrument:
    path = Path(path)
    meta_path = path / "probe.json"
    if not meta_path.exists():
        raise InstrumentError(f"{path} is not an attentropy instrument (no probe.json; make one with `attentropy "
                              "fit`)")
    refit = "refit it with `attentropy fit RUN... --out PROBE --force`"
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InstrumentError(f"{meta_path} is damaged ({e}); {refit}") from None
    if meta.get("format") != FORMAT:
        raise InstrumentError(f"{meta_path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    try:
        with np.load(path / "arrays.npz", allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        answer_models = {task: LinearProbe.from_arrays(arrays, f"answer.{task}") for task in meta["answer_models"]}
        token_model = LinearProbe.from_arrays(arrays, "token") if meta["token_model"] else None
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise InstrumentError(f"{path / 'arrays.npz'} is damaged ({type(e).__name__}: {e}); {refit}") from None
    if hashlib.sha256((path / "arrays.npz").read_bytes()).hexdigest()[:16] != meta.get("fingerprint"):
        raise InstrumentError(f"{path / 'arrays.npz'} is not the file probe.json was written with; {refit}")
    identity = meta.pop("model")
    for key in ("format", "answer_models", "token_model"):
        meta.pop(key)
    return Instrument(identity, answer_models, token_model, meta)


def fit_final(a: Answers, seed: int = 0) -> tuple[dict[str, LinearProbe], LinearProbe | None]:
    """The instrument's models fitted on all labelled answers (and wrong-moment tokens) of `a`."""
    y, groups = a.answers.y.to_numpy(), a.answers.group.to_numpy()
    answer_models = {}
    features = instrument_features(a, "answer")
    for task in sorted(a.answers.task.unique()):
        rows = np.flatnonzero((a.answers.task.to_numpy() == task) & (y >= 0))
        if min((y[rows] == 1).sum(), (y[rows] == 0).sum()) >= 2:
            answer_models[task] = fit_probe(features[rows], y[rows], groups[rows], seed=seed)[0]
    target = a.tokens.target.to_numpy()
    token_model = None
    if (target == 1).sum() >= 2:
        usable = np.flatnonzero(target >= 0)
        rows = usable[_sample_negatives(1 - target[usable], NEGATIVES_PER_POSITIVE, seed)]
        token_model = fit_probe(instrument_features(a, "token")[rows], 1 - target[rows],
                                groups[a.answer_of_token[rows]], balanced=True, seed=seed)[0]
    return answer_models, token_model


def transfer_rows(train: Answers, test: Answers, name: str, *, n_boot: int, seed: int) -> list[dict]:
    """Every answer method fitted on all of `train` (per task) and scored on the answers of another run."""
    rows = []
    methods = methods_for(train)
    if not test.hidden or test.hidden_layers != train.hidden_layers:  # hidden-state methods need the same layers
        methods = {m: spec for m, spec in methods.items() if m in ANSWER_METHODS}
    roles = _roles(methods)
    kinds = sorted(train.answers.kind.unique())
    train_feats, test_feats = answer_feature_sets(train, kinds), answer_feature_sets(test, kinds)
    for task in sorted(set(test.answers.task) & set(train.answers.task)):
        tr = np.flatnonzero((train.answers.task.to_numpy() == task) & (train.answers.y.to_numpy() >= 0))
        te = np.flatnonzero((test.answers.task.to_numpy() == task) & (test.answers.y.to_numpy() >= 0))
        conf = pd.DataFrame(index=te, columns=list(methods), dtype=float)
        for method, (feature, fitter, _, _) in methods.items():
            fitted = fitter(_take(train_feats[feature], tr), train.answers.y.to_numpy()[tr],
                            train.answers.group.to_numpy()[tr], seed=seed)
            conf[method] = fitted.confidence(_take(test_feats[feature], te))
        rows += discrimination_rows(task, "transfer", name, conf, test.answers.y.to_numpy()[te],
                                    test.answers.group.to_numpy()[te], roles, n_boot=n_boot, seed=seed)
    return rows


def up_to_date(out: str | Path, infos: list[dict], n_boot: int, seed: int, transfer) -> bool:
    """Whether `out` holds an instrument fitted by this version on the same runs (fingerprints, labels) with the
    same settings."""
    from . import __version__
    from .provenance import git_commit

    try:
        meta = json.loads((Path(out) / "probe.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    same_runs = [(r["fingerprint"], r["answers"], r["labels"]) for r in meta.get("training_runs", [])] == [
        (r["fingerprint"], r["answers"], r["labels"]) for r in infos]
    settings = meta.get("evaluation", {})
    return (same_runs and settings.get("n_boot") == n_boot and settings.get("seed") == seed
            and settings.get("transfer") == [str(t) for t in transfer] and meta.get("git_commit") == git_commit()
            and meta.get("attentropy_version") == __version__ and (Path(out) / "evaluation.csv").exists())


def fit_instrument(run_dirs: list[str | Path], out: str | Path, *, transfer: list[str | Path] = (),
                   n_boot: int = 1000, seed: int = 0, force: bool = False, skip_damaged: bool = False,
                   progress: bool = True) -> Path:
    """`attentropy fit`: evaluate every method by question-grouped cross-validation on the graded runs, fit the
    instrument on all of them and write the instrument directory `out`."""
    from . import __version__
    from .provenance import git_commit, package_versions
    from .store import _write_parquet, write_json

    def say(msg):
        if progress:
            print(f"[fit] {msg}", flush=True)

    from .store import load_run

    runs = [load_run(d, skip_damaged=skip_damaged) for d in run_dirs]  # each run's task and fingerprint
    infos = [run_info(run) for run in runs]
    if not force and up_to_date(out, infos, n_boot, seed, transfer):
        say(f"{out} is up to date (same runs, labels and settings; --force refits)")
        return Path(out)
    by_task: dict[str, list] = {}
    for run_dir, run in zip(run_dirs, runs):
        by_task.setdefault(protocol_kind(run.config["benchmark"]), []).append(run_dir)
    del runs
    transfer_answers = [load_answers([path], skip_damaged=skip_damaged) for path in transfer]
    evaluations, answer_predictions, token_predictions, summaries = [], [], [], {}
    answer_models, token_model, identity, methods, token_methods_ = {}, None, None, {}, {}
    seconds = {"evaluation": 0.0, "fit": 0.0}
    for task, dirs in sorted(by_task.items()):
        # each task's runs on their own: hidden states count where that task's runs kept them
        a, _, task_identity = load_answers(dirs, skip_damaged=skip_damaged)
        if identity is None:
            identity = task_identity
        Instrument(identity, {}, None).check(task_identity, f"the {task} runs")
        say(f"{task}: {len(a.answers)} answers, {len(a.tokens)} tokens from {len(dirs)} run(s); 5-fold "
            "cross-validation by question, every method")
        tick = time.perf_counter()
        rows, preds = evaluate(a, task, n_boot=n_boot, seed=seed)
        evaluations.append(rows)
        answer_predictions.append(preds["answers"].assign(task=task))
        token_predictions.append(preds["tokens"].assign(task=task))
        summaries[task] = preds["summary"]
        methods.update(methods_for(a))
        token_methods_.update(token_methods_for(a) if (a.tokens.target == 1).any() else {})
        seconds["evaluation"] += time.perf_counter() - tick
        tick = time.perf_counter()
        task_models, task_token_model = fit_final(a, seed)
        answer_models.update(task_models)
        token_model = task_token_model or token_model
        seconds["fit"] += time.perf_counter() - tick
        for path, (test, _, test_identity) in zip(transfer, transfer_answers):
            if task in set(test.answers.task):
                say(f"transfer to {path}")
                Instrument(identity, {}, None).check(test_identity, f"the run {path}")
                evaluations.append(pd.DataFrame(transfer_rows(a, test, str(path), n_boot=n_boot, seed=seed)))
    if not answer_models:
        raise InstrumentError("no task has at least 2 correct and 2 incorrect answers: nothing to fit")
    evaluation = pd.concat(evaluations, ignore_index=True)
    packages = package_versions(("numpy", "scikit-learn", "pandas", "pyarrow"))
    layers, n_heads = identity["layers"], identity["n_heads"]
    meta = {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "attentropy_version": __version__,
            "git_commit": git_commit(), "packages": packages, "training_runs": infos,
            "features": {"answer": feature_names(layers, n_heads), "token": feature_names(layers, n_heads, "token"),
                         "attention": list(ATTN_FEATURES), "normalisation": "entropy / ln K, varentropy / (ln K)^2",
                         "aggregation": "answer: mean over its tokens (log-prob also its minimum); prefix: the same "
                                        "over the tokens so far; token: the token's own row"},
            "targets": {"answer": "P(correct); trained on correct vs incorrect answers",
                        "token": "P(not the critic's wrong moment); trained on tokens of correct answers and of "
                                 "incorrect answers with a located wrong moment"},
            "evaluation": {"folds": OUTER_FOLDS, "inner_folds": INNER_FOLDS, "Cs": list(CS), "n_boot": n_boot,
                           "seed": seed, "transfer": [str(t) for t in transfer], "summary": summaries},
            "seconds": {k: round(v, 1) for k, v in seconds.items()},
            "methods": {name: {"role": spec[2], "description": spec[3]} for name, spec in methods.items()},
            "token_methods": {name: {"role": spec[2], "description": spec[3]}
                              for name, spec in token_methods_.items()}}
    instrument = Instrument(identity, answer_models, token_model, meta)
    out = instrument.save(out)
    evaluation.to_csv(out / "evaluation.csv", index=False)
    write_json(out / "evaluation.json", {"summary": summaries, "rows": evaluation.to_dict(orient="records")})
    import pyarrow as pa

    _write_parquet(pa.Table.from_pandas(pd.concat(answer_predictions, ignore_index=True), preserve_index=False),
                   out / "predictions.parquet")
    _write_parquet(pa.Table.from_pandas(pd.concat(token_predictions, ignore_index=True), preserve_index=False),
                   out / "token_predictions.parquet")
    say(f"evaluation {meta['seconds']['evaluation']} s, fit {meta['seconds']['fit']} s -> {out}")
    return out


def score_run(instrument: Instrument, run_dir: str | Path, skip_damaged: bool = False) -> pd.DataFrame:
    """`attentropy score --probe PROBE RUN`: score every answer of a run with the instrument and store the token
    confidences beside its parts (`load_run` then has tokens.confidence, tokens.prefix_confidence and
    samples.answer_confidence). Returns the scores."""
    import pyarrow.parquet as pq

    from .schema import ATTN_STATS
    from .store import load_run, write_confidence, write_json

    run = load_run(run_dir, skip_damaged=skip_damaged)
    instrument.check(model_identity(run.config, run.layers, run.n_heads), f"the run {run_dir}")
    trained_on = {r["fingerprint"] for r in instrument.meta.get("training_runs", [])}
    if run_info(run)["fingerprint"] in trained_on:
        warnings.warn(f"{run_dir} is one of the instrument's training runs: its scores are in-sample (the "
                      "instrument's own out-of-fold confidences are in its predictions files)", stacklevel=2)
    if not len(run.tokens):
        return pd.DataFrame(columns=["question_id", "pos", "confidence", "prefix_confidence"])
    tokens = run.tokens.drop(columns=[c for c in ("confidence", "prefix_confidence") if c in run.tokens])
    a = _answers_of(run.samples, tokens, {s: run.attn(s) for s in ATTN_STATS}, run.layers, run.n_heads,
                    str(run.path))
    scores = instrument.score(a)
    (Path(run_dir) / "confidence").mkdir(exist_ok=True)
    start = 0
    for part in run.parts:  # the scores of each part's tokens (those of duplicate answers left out)
        n = (int(run.kept_rows[part][1].sum()) if part in run.kept_rows
             else pq.ParquetFile(Path(run_dir) / "tokens" / f"{part}.parquet").metadata.num_rows)
        write_confidence(run_dir, part, scores.iloc[start:start + n])
        start += n
    write_json(Path(run_dir) / "confidence" / "probe.json", probe_stamp(instrument))
    return scores


def probe_stamp(instrument: Instrument) -> dict:
    """What a run's confidence/probe.json says of the instrument that scored it."""
    return {"fingerprint": instrument.fingerprint, "model": instrument.identity["name"],
            "created": instrument.meta.get("created"), "answer_models": sorted(instrument.answer_models),
            "token_model": instrument.token_model is not None}


def score_answer(instrument: Instrument, model, tokenizer, info, question, *, answer: str | None = None,
                 max_new_tokens: int | None = None) -> tuple[pd.DataFrame, list[str], str]:
    """Scores of one question's answer: generated and recorded, or, given as text, tokenized once and read
    through the teacher-forced capture. Returns (scores per token, the tokens' text, the answer)."""
    from .attention import recorded_layers
    from .capture import capture
    from .generate import Generation, generate
    from .prompts import MAX_NEW_TOKENS, prompt_ids, stop_token_ids

    layers = recorded_layers(model)
    n_heads = model.config.get_text_config().num_attention_heads
    instrument.check({"name": info.name, "revision": info.revision, "layers": layers, "n_heads": n_heads},
                     f"the model {info.name!r}")
    if answer is None:
        limit = max_new_tokens or MAX_NEW_TOKENS[protocol_kind(question.benchmark)]
        gen = generate(model, tokenizer, [question], max_new_tokens=limit, record=True)[0][0]
    else:
        prompt = prompt_ids(tokenizer, question)
        completion = tokenizer.encode(answer, add_special_tokens=False) + stop_token_ids(model, tokenizer)[:1]
        gen = Generation(question, prompt, completion, answer, "given",
                         capture(model, [prompt], [completion])[0])
    a = answers_from_generations([gen], layers, n_heads)
    return instrument.score(a), [tokenizer.decode([t]) for t in gen.completion_ids], gen.completion


def _ansi(text: str, confidence: float) -> str:
    """Text on a background from red (confidence 0) through yellow to green (1), in 24-bit ANSI colour."""
    c = 0.5 if np.isnan(confidence) else float(confidence)
    r, g = (255, int(510 * c)) if c < 0.5 else (int(510 * (1 - c)), 255)
    return f"\x1b[48;2;{r};{g};60m\x1b[38;2;0;0;0m{text}\x1b[0m"


def score_text(instrument: Instrument, model_name: str, question_text: str, *, answer: str | None = None,
               benchmark: str | None = None, as_json: bool = False, max_new_tokens: int | None = None) -> str:
    """`attentropy score --probe P --model M "question"`: the answer's tokens coloured by confidence (the token
    model where the instrument has one, else the prefix confidence), or JSON."""
    from .data import Question
    from .model import load_model

    if benchmark is None:
        benchmark = "facts" if "factual" in instrument.answer_models else "arith"
    model, tokenizer, info = load_model(model_name)
    question = Question("question-00000", benchmark, question_text, target="",
                        metadata={"steps": 1} if benchmark == "arith" else {})
    scores, texts, completion = score_answer(instrument, model, tokenizer, info, question, answer=answer,
                                             max_new_tokens=max_new_tokens)
    answer_confidence = float(scores.prefix_confidence.iloc[-1])
    if as_json:
        return json.dumps({"question": question_text, "answer": completion, "benchmark": benchmark,
                           "answer_confidence": answer_confidence, "probe": instrument.fingerprint,
                           "tokens": [{"token": t, "confidence": None if np.isnan(c) else float(c),
                                       "prefix_confidence": float(p)}
                                      for t, c, p in zip(texts, scores.confidence, scores.prefix_confidence)]},
                          ensure_ascii=False, indent=1)
    shown = "confidence" if instrument.token_model is not None and benchmark in MATH else "prefix_confidence"
    body = "".join(_ansi(t, c) for t, c in zip(texts, scores[shown]))
    legend = " ".join(_ansi(f" {v:.1f} ", v) for v in (0.0, 0.25, 0.5, 0.75, 1.0))
    what = ("token confidence: P(not where the answer goes wrong)" if shown == "confidence"
            else "prefix confidence: P(correct) from the tokens so far")
    return (f"{question_text}\n{body}\n\nanswer confidence (P correct): {answer_confidence:.3f}\ncolours: {what}  "
            f"{legend}")


def format_evaluation(probe_dir: str | Path) -> str:
    """The headline of an instrument's evaluation: in-distribution AUROC of the instrument and the strongest
    baseline and control, leave-one-kind-out means, selective answering."""
    probe_dir = Path(probe_dir)
    ev = pd.read_csv(probe_dir / "evaluation.csv")
    lines = [f"instrument: {probe_dir}"]
    for task, rows in ev.groupby("task", sort=False):
        auc = rows.query("evaluation == 'in_distribution' and metric == 'auroc'").set_index("method")
        gain = rows.query("evaluation == 'in_distribution' and metric == 'auroc_gain_of_instrument'").set_index(
            "method")
        lines.append(f"  {task}: AUROC instrument {_ci(auc.loc['instrument'])}, shuffled labels "
                     f"{_ci(auc.loc['shuffled'])}  (n = {int(auc.n_positive.iloc[0])} correct, "
                     f"{int(auc.n_negative.iloc[0])} incorrect, out of fold)")
        for label, pool in (("logit/kind/length", [*LOGIT_BASELINES, "length", "kind", "kind_logit"]),
                            ("any baseline", [m for m in auc.index if m not in NOT_COMPETITORS])):
            best = auc.loc[[m for m in pool if m in auc.index]].value.idxmax()
            lines.append(f"    best {label}: {best} {_ci(auc.loc[best])}; instrument - it: {_ci(gain.loc[best])}")
        loko = rows.query("evaluation == 'leave_one_kind_out' and metric == 'auroc'")
        if len(loko):
            means = loko.groupby("method").value.mean()
            lines.append(f"    leave one kind out (mean over {loko.subset.nunique()} kinds): instrument "
                         f"{means['instrument']:.3f}, best logit baseline {means[list(LOGIT_BASELINES)].max():.3f}")
        sel = rows.query("evaluation == 'selective' and metric == 'f_score'").set_index("method")
        if len(sel):
            lines.append("    selective answering F-score: " + ", ".join(f"{m} {_ci(r)}" for m, r in sel.iterrows()))
        tok = rows.query("evaluation.str.startswith('token:') and metric == 'auroc' and method == 'instrument'",
                         engine="python")
        for _, r in tok.iterrows():
            lines.append(f"    token {r.evaluation[6:]}: AUROC {_ci(r)} ({int(r.n_positive)} vs {int(r.n_negative)})")
    return "\n".join(lines)


def _ci(row) -> str:
    return f"{row['value']:.3f} [{row['lo']:.3f}, {row['hi']:.3f}]"
