"""The fitted instrument: answer models (one per task) and a token model for one model's recorded layout, fitted
and evaluated by `fit_instrument`, stored as a directory (`Instrument.save`, `load_instrument`).

What it scores (all calibrated probabilities in [0, 1]):
  answer confidence  P(the answer is correct), from the answer's mean attention statistics per layer x head and its
                     logit statistics (one model per protocol kind: factual, math);
  prefix confidence  the same model on the tokens so far (means over the prefix): what a live system reads to stop
                     or abstain early; at the last token it equals the answer confidence;
  token confidence   P(this token is not where the answer goes wrong), trained on the critic's wrong-moment spans of
                     math runs, from the token's own attention statistics and logit statistics.
Features come from the stored statistics only (no second forward): `features.py`.

The instrument directory: probe.json (the model it belongs to, features, training runs and labels, versions),
arrays.npz (standardisation, coefficients, calibration; no pickle), evaluation.json and evaluation.csv (the
cross-validated evaluation, `evaluation.py`), predictions.parquet and token_predictions.parquet (out-of-fold
confidences of every detector; the report's figures are drawn from them).
"""

from __future__ import annotations

import hashlib
import json
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .answers import ATTN_FEATURES, Answers, InstrumentError, load_answers, run_info
from .data import protocol_kind
from .detectors import PRIMARY, of_family
from .evaluation import (NEGATIVES_PER_POSITIVE, OUTER_FOLDS, answer_detectors, evaluate, headlines,
                         held_out_comparators, interval_text as cell, sample_negatives, token_detectors, transfer_rows)
from .detectors.anchored import ANCHORS as ANCHOR_NAMES, anchored_prefix_inputs
from .detectors.fitting import take
from .detectors.instrument import INSTRUMENT, RoutedModel
from .features import at_once, feature_names, token_features
from .probe import CS, INNER_FOLDS, LinearProbe, fit_probe
from .scoring import score_answer, score_run  # noqa: F401  (the README's Python API: attentropy.instrument)

FORMAT = "attentropy-instrument/2"  # /2: answer models routed by kind (dense probe, anchored model)


@dataclass
class Instrument:
    """Fitted answer models (one per task) and the token model, for one model's recorded layer x head layout."""

    identity: dict  # model_identity(): the model and layout it belongs to
    answer_models: dict[str, RoutedModel]  # task -> the dense probe for kinds seen in fitting, else the anchored
    token_model: LinearProbe | None  # probe on features.token_features: P(not the wrong moment)
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
        the last token: the answer confidence), `in_kind` (whether the answer's question kind is one the instrument
        was fitted on: scored by the dense probe; else by the anchored model, built to transfer) and `confidence`
        (the token model; NaN without one)."""
        out = pd.DataFrame({"question_id": a.answers.question_id.to_numpy()[a.answer_of_token],
                            "pos": a.tokens.pos.to_numpy(), "confidence": np.nan, "prefix_confidence": np.nan,
                            "in_kind": False})
        if not len(out):
            return out
        tasks = a.answers.task.to_numpy()[a.answer_of_token]
        prefix = anchored_prefix_inputs(a)

        def prefix_confidences():  # every task's read at once (`features.at_once`)
            for task, model in self.answer_models.items():
                rows = tasks == task
                if rows.any():
                    out.loc[rows, "prefix_confidence"] = model.confidence(take(prefix, rows))
                    out.loc[rows, "in_kind"] = model.in_kind(prefix[2][rows])
        at_once(a, prefix_confidences)
        if self.token_model is not None:
            out["confidence"] = self.token_model.confidence(token_features(a))
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
        answer_models = {task: RoutedModel.from_arrays(arrays, f"answer.{task}") for task in meta["answer_models"]}
        token_model = LinearProbe.from_arrays(arrays, "token") if meta["token_model"] else None
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise InstrumentError(f"{path / 'arrays.npz'} is damaged ({type(e).__name__}: {e}); {refit}") from None
    if hashlib.sha256((path / "arrays.npz").read_bytes()).hexdigest()[:16] != meta.get("fingerprint"):
        raise InstrumentError(f"{path / 'arrays.npz'} is not the file probe.json was written with; {refit}")
    identity = meta.pop("model")
    for key in ("format", "answer_models", "token_model"):
        meta.pop(key)
    return Instrument(identity, answer_models, token_model, meta)


def fit_final(a: Answers, seed: int = 0) -> tuple[dict[str, RoutedModel], LinearProbe | None]:
    """The instrument's models fitted on all labelled answers (and wrong-moment tokens) of `a`."""
    y, groups = a.answers.y.to_numpy(), a.answers.group.to_numpy()
    answer_models = {}
    features = INSTRUMENT.inputs(a, [])
    for task in sorted(a.answers.task.unique()):
        rows = np.flatnonzero((a.answers.task.to_numpy() == task) & (y >= 0))
        if min((y[rows] == 1).sum(), (y[rows] == 0).sum()) >= 2:
            answer_models[task] = INSTRUMENT.fit(take(features, rows), y[rows], groups[rows], seed=seed).detail["model"]
    target = a.tokens.target.to_numpy()
    token_model = None
    if (target == 1).sum() >= 2:
        usable = np.flatnonzero(target >= 0)
        rows = usable[sample_negatives(1 - target[usable], NEGATIVES_PER_POSITIVE, seed)]
        token_model = fit_probe(token_features(a)[rows], 1 - target[rows],
                                groups[a.answer_of_token[rows]], balanced=True, seed=seed)[0]
    return answer_models, token_model


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
                   progress: bool = True, jobs: int = 1) -> Path:
    """`attentropy fit`: evaluate every method by content-grouped cross-validation on the graded runs, fit the
    instrument on all of them and write the instrument directory `out`. `jobs`: processes that fit the held-out
    kinds (and sources) at once (the same instrument and evaluation, up to the rounding of each process's BLAS
    threads)."""
    from . import __version__
    from .provenance import git_commit, package_versions
    from .store import _write_parquet, load_run, write_json

    def say(msg):
        if progress:
            print(f"[fit] {msg}", flush=True)

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
            "cross-validation grouped by content, every method")
        tick = time.perf_counter()
        rows, preds = evaluate(a, task, n_boot=n_boot, seed=seed, jobs=jobs)
        say(f"{task}: folds and intervals grouped by content: {preds['summary']['groups']} groups; "
            f"{preds['summary']['near_duplicates']} answers share theirs with another question (same computation "
            "or same gold answer)")
        evaluations.append(rows)
        answer_predictions.append(preds["answers"].assign(task=task))
        token_predictions.append(preds["tokens"].assign(task=task))
        summaries[task] = preds["summary"]
        methods.update(answer_detectors(a))
        token_methods_.update(token_detectors(a) if (a.tokens.target == 1).any() else {})
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
            "answer_model_details": {task: {"kinds": m.kinds, "anchored": {
                "anchor": ANCHOR_NAMES[m.anchored.anchor], "correction": [feature_names(layers, n_heads)[c]
                                                                          for c in m.anchored.columns]}}
                for task, m in answer_models.items()},
            "targets": {"answer": "P(correct); trained on correct vs incorrect answers",
                        "token": "P(not the critic's wrong moment); trained on tokens of correct answers and of "
                                 "incorrect answers with a located wrong moment"},
            "evaluation": {"folds": OUTER_FOLDS, "inner_folds": INNER_FOLDS, "Cs": list(CS), "n_boot": n_boot,
                           "seed": seed, "transfer": [str(t) for t in transfer], "summary": summaries},
            "seconds": {k: round(v, 1) for k, v in seconds.items()},
            "methods": {name: {"role": d.role, "description": d.description} for name, d in methods.items()},
            "token_methods": {name: {"role": d.role, "description": d.description}
                              for name, d in token_methods_.items()}}
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


def format_evaluation(probe_dir: str | Path) -> str:
    """The headline of an instrument's evaluation: in-distribution AUROC of the instrument against the best of every
    baseline and control, of the training-free scores and of the logit / kind / length ones, leave-one-kind-out
    means, selective answering, the token-level comparisons."""
    probe_dir = Path(probe_dir)
    ev = pd.read_csv(probe_dir / "evaluation.csv")
    lines = [f"instrument: {probe_dir}"]
    for task, rows in ev.groupby("task", sort=False):
        auc = rows.query("evaluation == 'in_distribution' and metric == 'auroc'").set_index("method")
        sanity = "".join(f", {m} {cell(auc.loc[m])}" for m in of_family("sanity", auc.index))
        lines.append(f"  {task}: AUROC {PRIMARY} {cell(auc.loc[PRIMARY])}{sanity}  (n = "
                     f"{int(auc.n_positive.iloc[0])} correct, {int(auc.n_negative.iloc[0])} incorrect, out of fold)")
        for h in headlines(rows):
            lines.append(f"    against the best of {h['pool']}: {h['best']} {cell(h['auroc'])}; instrument - it: "
                         f"{cell(h['gain'])}, {h['verdict'].split(' (')[0]}")
        for held_out in ("kind", "source"):
            out_of = rows[(rows.evaluation == f"leave_one_{held_out}_out_mean")].set_index(["metric", "method"])
            if len(out_of):
                means = out_of.loc["auroc"]
                lines.append("; ".join([f"    leave one {held_out} out ({means.subset.iloc[0]}): instrument "
                                        f"{cell(means.loc[PRIMARY])}"] + [
                    f"training-free {how}: {free} {cell(means.loc[free])}, instrument - it "
                    f"{cell(out_of.loc[('auroc_gain_of_instrument', free)])}"
                    for free, how in held_out_comparators(means)]))
        sel = rows.query("evaluation == 'selective' and metric == 'f_score'").set_index("method")
        if len(sel):
            others = sel.drop(index=["answer_everything", PRIMARY], errors="ignore")
            shown = ["answer_everything", PRIMARY] + ([others.value.idxmax()] if len(others) else [])
            lines.append("    selective answering F-score: "
                         + ", ".join(f"{m} {cell(sel.loc[m])}" for m in shown if m in sel.index))
        tokens = rows[rows.evaluation.str.startswith("token:")]
        for evaluation, tr in tokens.groupby("evaluation", sort=False):
            tauc = tr[tr.metric == "auroc"].set_index("method")
            tgain = tr[tr.metric == "auroc_gain_of_instrument"].set_index("method")
            rival = tauc.drop(index=PRIMARY).value.idxmax()
            controls = ", ".join(f"{m} {tauc.loc[m, 'value']:.3f}" for m in ("token_type", "answer_confidence",
                                                                             "prefix_confidence") if m in tauc.index)
            headline = " (headline)" if evaluation == "token:type_matched_results" else ""
            lines.append(f"    token {evaluation[6:]}{headline}: AUROC {cell(tauc.loc[PRIMARY])} "
                         f"({int(tauc.n_positive.iloc[0])} vs {int(tauc.n_negative.iloc[0])}); best other {rival} "
                         f"{cell(tauc.loc[rival])}, instrument - it {cell(tgain.loc[rival])}; controls: {controls}")
    return "\n".join(lines)
