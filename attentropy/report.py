"""`write_report`: graded run directories -> one self-contained report.html (figures embedded, a token viewer)
plus figures/ with every figure as PNG and the numbers behind it as CSV, and the full comparison table."""

from __future__ import annotations

import html
import json
import os
import time
from pathlib import Path

import numpy as np

from . import __version__, plots
from .contrasts import AGGREGATIONS, FIRST_K, MIN_QUESTIONS_TO_CONCLUDE, Analysis, analyze_run
from .contrast_controls import CONTROLS
from .data import FACTUAL, FREE
from .grade import GSM8K_LABELS, SIMPLEQA_LABELS
from .statistic_values import LOGIT_STATS
from .stats import WINDOW, Intervals
from .html_blocks import figure, html_table, side_by_side
from .instrument_report import attach_out_of_fold_confidence, instrument_section, instrument_verdict
from .replication import replication_section
from .store import load_run

MAX_VIEWER_ANSWERS = 300  # per run; the viewer embeds per-token, per-layer values
PRIMARY = ("entropy", "mean")  # the pre-declared headline test; every other statistic/aggregation is exploratory
VIEWER_STATS = ("entropy", "varentropy", "entropy_norm", *LOGIT_STATS, "confidence", "prefix_confidence")


def write_report(run_dirs: list[str | Path], out: str | Path | None = None, *, interval: str = "clustered",
                 n_boot: int = 1000, seed: int = 0, workers: int | None = None, ray: str | None = None,
                 probe: str | Path | list | None = None, skip_damaged: bool = False, progress: bool = True) -> Path:
    """Analyse each graded run and write `out`/report.html and `out`/figures/. `out` defaults to the run
    directory itself for one run, and to the runs' common parent directory for several. `probe`: an instrument
    directory (`attentropy fit`), or one per model, whose evaluation becomes the report's Instrument section; the
    token viewer then colours tokens by its confidences (out of fold for the runs it was fitted on). Runs of
    several models add the Replication section (`replication.replication_section`). `interval`: the contrasts'
    interval method (`stats.INTERVAL_METHODS`; `n_boot`, `seed`: the bootstrap's); `workers`: groups of layers
    analysed at once (default: one per core), or `ray` (an address; "": a local cluster) to spread them over a Ray
    cluster."""
    probes = [] if probe is None else [Path(probe)] if isinstance(probe, (str, Path)) else [Path(p) for p in probe]
    run_dirs = [Path(d) for d in run_dirs]
    parent = Path(os.path.commonpath([d.resolve() for d in run_dirs]))
    # a run's name: its directory's name, or with several runs its path below their common parent
    names = [run_dirs[0].name] if len(run_dirs) == 1 else [str(d.resolve().relative_to(parent)) for d in run_dirs]
    out = Path(out) if out is not None else run_dirs[0] if len(run_dirs) == 1 else parent
    analyses, figures = [], []
    for run_dir, name in zip(run_dirs, names):
        if progress:
            print(f"[report] analysing {run_dir}")
        run = load_run(run_dir, skip_damaged=skip_damaged)
        a = analyze_run(run, interval=interval, n_boot=n_boot, seed=seed, workers=workers, ray=ray)
        a.name = name
        for p in probes:  # (only the instrument fitted on this run has its out-of-fold confidences)
            attach_out_of_fold_confidence(a, p, run)
        fig_dir = out / "figures" / (name if len(run_dirs) > 1 else "")
        fig_dir.mkdir(parents=True, exist_ok=True)
        a.comparisons.to_parquet(fig_dir / "comparisons.parquet", index=False)
        a.comparisons.to_csv(fig_dir / "comparisons.csv", index=False)
        analyses.append(a)
        figures.append(_draw(a, fig_dir))
    out.mkdir(parents=True, exist_ok=True)
    instrument, verdicts = "", []
    for i, p in enumerate(probes):
        if progress:
            print(f"[report] the instrument {p}")
        section, verdict = instrument_section(p, out / "figures" / ("instrument" if len(probes) == 1
                                                                    else f"instrument{i}"))
        instrument, verdicts = instrument + section, verdicts + verdict
    replication = replication_section(analyses, probes, out / "figures" / "replication", n_boot=n_boot, seed=seed)
    path = out / "report.html"
    tmp = path.with_name("report.html.tmp")
    tmp.write_text(_html(analyses, figures, replication + instrument, instrument_verdict(verdicts, len(probes) > 1)), encoding="utf-8")
    os.replace(tmp, path)
    return path


def chosen_answers(a: Analysis, n: int = 3) -> list[str]:
    """Answers for the token traces: the shortest incorrect answers with a located wrong moment (math) or the
    shortest incorrect ones (factual), and the shortest correct one, for contrast; of an ungraded run, answers of
    spread lengths."""
    answers = a.answers.sort_values(["n_tokens", "question_id"])
    if not a.graded:  # answers of spread lengths: the shortest, the longest and between
        picks = np.unique(np.linspace(0, len(answers) - 1, min(n + 1, len(answers))).round().astype(int))
        return list(answers.question_id.iloc[picks])
    wrong = answers[answers.label == "incorrect"]
    if "in_error" in a.tokens:
        located = set(a.tokens.question_id[a.tokens.in_error])
        wrong = wrong[wrong.question_id.isin(located)]
    correct = answers[answers.label == "correct"]
    return list(wrong.question_id[:n]) + list(correct.question_id[:1])


def _draw(a: Analysis, fig_dir: Path) -> dict:
    """Figures of one run, as (caption, png path): "contrasts" maps a contrast to its figures shown at once
    ("main": the primary aggregation and the per-layer effects) and folded ("more": the other aggregations)."""
    figs: dict = {"contrasts": {}, "profiles": [], "traces": []}
    for c in a.contrasts:
        if c.status == "not_computed":
            continue
        aggregations = ["tokens"] if c.level == "token" else list(AGGREGATIONS)
        heatmaps = [(f"{c.title}: AUROC per layer × head ({how})",
                     plots.effect_heatmaps(a, c.key, how, fig_dir, f"heatmap_{c.key}_{how}")) for how in aggregations]
        layers = (f"{c.title}: AUROC per layer", plots.layer_effects(a, c.key, fig_dir, f"layers_{c.key}"))
        figs["contrasts"][c.key] = {"main": [heatmaps[0], layers], "more": heatmaps[1:]}
    figs["profiles"].append(("per-layer profiles by label", plots.layer_profiles(a, fig_dir, "profiles")))
    figs["profiles"].append(("entropy-varentropy quadrants", plots.quadrant(a, fig_dir, "quadrant")))
    figs["profiles"].append(("distributions by label", plots.distributions(a, fig_dir, "distributions")))
    chosen = chosen_answers(a)
    if chosen:
        figs["traces"].append(("token traces", plots.token_traces(a, chosen, fig_dir, "traces")))
    return figs


# ---------------------------------------------------------------- text

def interval_sentence(intervals: Intervals) -> str:
    """How the report's intervals were computed, with the reference a reader can check."""
    if intervals.method == "bootstrap":
        return (f"95 % percentile bootstrap, {intervals.n_boot} resamples of the <b>questions</b> (a question brings "
                "all its tokens; within each group for answer contrasts); profiles likewise.")
    return ("95 %, with <b>questions</b> as independent clusters and no resampling: the AUROC's from the "
            "nonparametric variance for clustered data (Obuchowski NA, <i>Nonparametric analysis of clustered ROC "
            "curve data</i>, Biometrics 53:567–578, 1997; DeLong et al., Biometrics 44:837–845, 1988, where each "
            "question is one unit), a Wald interval on the logit scale; Cohen's d's from the cluster-robust "
            "delta-method variance; profiles: mean ± 1.96 standard errors over answers. <code>attentropy report "
            "--interval bootstrap</code> gives the percentile bootstrap of resampled questions instead.")


def _fmt_cell(row) -> str:
    layer, head = int(row["layer"]), int(row["head"])
    where = "" if layer < 0 else f"layer {layer}" + ("" if head < 0 else f" head {head}") + ": "
    return (f"{where}AUROC {row['auroc']:.2f} [{row['auroc_lo']:.2f}, {row['auroc_hi']:.2f}], "
            f"d {row['cohens_d']:+.2f} [{row['d_lo']:+.2f}, {row['d_hi']:+.2f}], q {row['q']:.2g}")


def findings(a: Analysis, contrast) -> list[str]:
    """Plain sentences on one contrast, with n everywhere; no conclusion from groups that are too small."""
    c = contrast
    if c.status == "not_computed":
        return [c.note]
    all_rows = a.comparisons[a.comparisons.contrast == c.key]
    rows = all_rows[all_rows.control == "none"]
    agg = "tokens" if c.level == "token" else PRIMARY[1]
    unit = "questions with tokens of both kinds" if c.level == "token" else "questions"
    lines = [f"n = {c.n_positive} {c.positive} vs {c.n_negative} {c.negative} {unit}."]
    if c.key == "hallucinated" and not (a.answers.label == "not_attempted").any():
        lines.append("No answer was graded not attempted: this contrast equals incorrect vs correct.")
    if c.status == "too_small":
        lines.append(f"<b>Too small to conclude</b>: {c.note}. The numbers below are descriptive only.")
    for stat in (PRIMARY[0], "entropy_norm", "varentropy"):
        head = rows.query("stat == @stat and aggregation == @agg and level == 'head'")
        layer = rows.query("stat == @stat and aggregation == @agg and level == 'layer'")
        if head.empty:
            continue
        best = head.loc[(head.auroc - 0.5).abs().idxmax()]
        label = plots.STAT_NAMES[stat] + (" — the primary test" if stat == PRIMARY[0] else "")
        if c.status == "ok" and head.significant.any():
            verdict = (f"{int(head.significant.sum())} of {len(head)} layer × head cells differ at FDR 5 % "
                       f"(Benjamini-Hochberg over the cells), {int(layer.significant.sum())} of {len(layer)} layers")
        elif c.status == "ok":
            verdict = (f"no layer × head cell differs at FDR 5 % ({len(head)} cells); at this n that is not "
                       "evidence of no difference")
        else:
            verdict = f"{len(head)} cells computed"
        lines.append(f"{label} ({agg}): {verdict}; strongest cell {_fmt_cell(best)}.")
        for control, crows in all_rows.query("stat == @stat and aggregation == @agg and level == 'head' and "
                                             "control != 'none'").groupby("control", sort=False):
            cbest = crows.loc[(crows.auroc - 0.5).abs().idxmax()]
            lines.append(f"&nbsp;&nbsp;controlled ({CONTROL_NAMES[control]}): {int(crows.significant.sum())} of "
                         f"{len(crows)} cells at FDR 5 %; strongest {_fmt_cell(cbest)}, n = "
                         f"{int(cbest.n_positive)} vs {int(cbest.n_negative)}.")
    for stat in LOGIT_STATS:
        row = rows.query("stat == @stat and aggregation == @agg and level == 'token'")
        if len(row):
            lines.append(f"{plots.STAT_NAMES[stat]} ({agg}): {_fmt_cell(row.iloc[0])}.")
    length = rows[rows.stat == "answer_length"]
    if len(length):
        lines.append(f"Answer length: {_fmt_cell(length.iloc[0])}. Mean attention entropy rises with position "
                     "(its maximum is ln K), so a length difference alone moves answer means; entropy / ln K "
                     "removes most of that.")
    if c.key == "wrong_moment":
        lines.append("Caveat: the wrong-moment span is usually a number or an equation, its neighbours are often "
                     "words; a difference here can be one of token type as much as of being wrong (see the "
                     "digits-only contrast, and the position-adjusted row, which holds type and position).")
    if c.key == "wrong_moment_numbers":
        lines.append("Token type held fixed (tokens containing a digit on both sides), position not in the raw "
                     "row: the other numbers of an answer lie anywhere in it; the position-adjusted row holds both.")
    return lines


CONTROL_NAMES = {"stratified": "pairs inside a question kind", "length_matched": "pairs inside an answer-length bin",
                 "correct_baseline": "against pseudo-moments in correct answers, difference in differences",
                 "position_adjusted": "each token less what its position and type predict"}
CONTROL_COLUMNS = {"stratified": "inside kinds", "length_matched": "length-matched",
                   "correct_baseline": "vs correct answers", "position_adjusted": "position-adjusted"}
FINDING_STATS = ("entropy", "entropy_norm", "varentropy")


def controlled_findings(a: Analysis) -> tuple[list[list[str]], list[list[str]]]:
    """(survive, vanished) table rows: per contrast and attention statistic (primary aggregation, layer x head
    cells), the cells significant at FDR 5 % raw that stay significant under every control that applies, with the
    strongest of them raw and controlled; and per control the raw-significant cells it removed. A contrast equal
    to an earlier one (incorrect vs correct when no answer was not attempted) is left out."""
    survive, vanished = [], []
    keys = {c.key: c for c in a.contrasts}
    for c in a.contrasts:
        if c.status != "ok":
            continue
        hallucinated = keys.get("hallucinated")
        if c.key == "incorrect_vs_correct" and hallucinated and hallucinated.n_negative == c.n_negative:
            continue
        agg = "tokens" if c.level == "token" else PRIMARY[1]
        rows = a.comparisons[(a.comparisons.contrast == c.key) & (a.comparisons.aggregation == agg)
                             & (a.comparisons.level == "head")]
        for stat in FINDING_STATS:
            by = {k: g.set_index(["layer", "head"]) for k, g in rows[rows.stat == stat].groupby("control")}
            if "none" not in by or not by["none"].significant.any():
                continue
            raw = by["none"]
            hits = set(raw.index[raw.significant])
            controls = [k for k in CONTROL_COLUMNS if k in by]
            kept = set(hits)
            for k in controls:
                kept &= set(by[k].index[by[k].significant])
            where = [html.escape(a.name), html.escape(c.title), plots.STAT_NAMES[stat]]
            if kept or not controls:
                best = _strongest(raw, kept or hits)
                survive.append(where + [
                    f"{len(kept)} of {len(hits)}" if controls else f"{len(hits)} (no control applies)",
                    f"{best[0]} / {best[1]}", _fmt_auc(raw.loc[best]),
                    *[_fmt_auc(by[k].loc[best], raw.loc[best]) if k in by else "—" for k in CONTROL_COLUMNS],
                    f"{int(raw.loc[best].n_positive)} vs {int(raw.loc[best].n_negative)}"])
            gone = {k: hits - set(by[k].index[by[k].significant]) for k in controls}
            if any(gone.values()):
                vanished.append(where + [str(len(hits))] + [
                    (f"{len(gone[k])}" + (f" (e.g. {_cell_name(cell)}: {raw.loc[cell, 'auroc']:.2f} → "
                                          f"{by[k].loc[cell, 'auroc']:.2f})" if (cell := _strongest(raw, gone[k]))
                                          else "")) if k in by else "—" for k in CONTROL_COLUMNS])
    return survive, vanished


def _strongest(raw, cells: set):
    """The cell of `cells` whose raw AUROC lies farthest from 0.5 (the first such in the set's order; None for no
    cells), looked up at once: one `.loc` per cell took seconds on a run of 5,120 cells per statistic."""
    if not cells:
        return None
    cells = list(cells)
    return cells[int(np.argmax(np.abs(raw.auroc.loc[cells].to_numpy() - 0.5)))]


def _cell_name(cell) -> str:
    return f"{cell[0]} / {cell[1]}"


def _fmt_auc(row, raw=None) -> str:
    """AUROC [interval]; with `raw`, the group sizes too where the control changed them (answers left alone in
    their stratum, correct answers as baselines)."""
    n = (f" <span class=meta>n {int(row['n_positive'])} vs {int(row['n_negative'])}</span>" if raw is not None and
         (row["n_positive"], row["n_negative"]) != (raw["n_positive"], raw["n_negative"]) else "")
    return f"{row['auroc']:.2f} [{row['auroc_lo']:.2f}, {row['auroc_hi']:.2f}]{n}"


def findings_section(analyses: list[Analysis]) -> str:
    """The report's opening section: effects that survive FDR and their controls, then those a control removed."""
    survive, vanished = [], []
    for a in analyses:
        kept, gone = controlled_findings(a)
        survive += kept
        vanished += gone
    controls = list(CONTROL_COLUMNS)
    return (
        "<h2 id=findings>Findings</h2><p>Effects significant at FDR 5 % (Benjamini-Hochberg over the layer × head "
        "cells) that stay significant under every control that applies: "
        + "; ".join(f"<b>{CONTROL_COLUMNS[k]}</b>: {CONTROLS[k]}" for k in controls)
        + ". AUROCs with 95 % intervals, questions the independent unit (how: <i>How to read this</i>); the cell "
          "shown is the strongest surviving one "
          "(layer / head); n: questions per group.</p>"
        + ("<div class=findings>" + html_table(["run", "contrast", "statistic", "cells surviving", "layer / head",
                                              "raw AUROC", *[CONTROL_COLUMNS[k] for k in controls], "n"], survive)
           + "</div>" if survive else "<p>None.</p>")
        + "<p>Significant cells that a control removed (what a reviewer would have caught), per control: how many, "
          "and the strongest of them, raw AUROC → controlled:</p>"
        + ("<div class=findings>" + html_table(["run", "contrast", "statistic", "significant raw",
                                              *[CONTROL_COLUMNS[k] for k in controls]], vanished)
           + "</div>" if vanished else "<p>None.</p>"))


def _config_rows(a: Analysis) -> list[tuple[str, str]]:
    cfg = a.config
    model = cfg.get("model", {})
    protocol = cfg.get("protocol", {})
    counts = a.answers.label.value_counts()
    labels = {k: int(counts.get(k, 0)) for k in (SIMPLEQA_LABELS if a.benchmark in FACTUAL else GSM8K_LABELS)
              if k != "unparsed"}
    grader = critic = "—"
    if "grader" in a.samples:
        grader = ", ".join(sorted(set(a.samples.grader.dropna())))
    if {"offline_label", "judge_label"} <= set(a.samples):  # an LLM judge graded: does the offline grader agree?
        both = a.samples.dropna(subset=["offline_label", "judge_label"])
        if len(both):
            agree = int((both.offline_label == both.judge_label).sum())
            grader += f"; the offline grader agrees with the judge on {agree} of {len(both)} ({agree / len(both):.0%})"
    if "critic" in a.samples:
        critic = ", ".join(sorted(set(a.samples.critic.dropna()) - {""})) or "—"
    sampling = protocol.get("sampling", {})
    return [
        ("model", f"{model.get('name')} ({model.get('architecture')}, {model.get('dtype')}; revision "
                  f"{str(model.get('revision'))[:12]})"),
        ("benchmark", f"{a.benchmark}, {len(a.samples)} questions"),
        ("protocol", f"{protocol.get('kind')}, " + (f"{protocol.get('shots')}-shot, " if "shots" in protocol else "")
         + f"max {protocol.get('max_new_tokens')} new tokens, "
         + ("sampled" if sampling.get("do_sample") else "greedy")),
        ("grader", grader), ("critic (wrong moment)", critic),
        ("labels (analysed)", ", ".join(f"{k} {v}" for k, v in labels.items())),
        ("excluded", ", ".join(f"{k} {v}" for k, v in a.excluded.items())),
        ("recorded layers × heads", f"{len(a.layers)} × {a.n_heads}"),
        ("intervals", a.intervals.method + (f", {a.intervals.n_boot} resamples, seed {a.intervals.seed}"
                                            if a.intervals.method == "bootstrap" else "")),
        ("attentropy", f"{cfg.get('attentropy_version')} (commit {str(cfg.get('git_commit'))[:10]})"),
    ]


# ---------------------------------------------------------------- the token viewer's data

def viewer_data(a: Analysis, max_answers: int = MAX_VIEWER_ANSWERS) -> dict:
    """Per answer: tokens, label, wrong-moment flags and, per statistic, values per token (attention: per layer,
    mean over heads). Rounded to 4 decimals to keep the page small."""
    tok = a.tokens
    shown = [s for s in VIEWER_STATS if s in a.layer_means or (s in tok and tok[s].notna().any())]
    answers = []
    groups = tok.groupby("question_id", sort=False).indices
    samples = a.samples.set_index("question_id")
    for qid in a.answers.question_id[:max_answers]:
        rows = groups[qid]
        entry = {"id": qid, "label": tok.label.iloc[rows[0]],
                 "question": samples.question[qid][:400], "target": str(samples.target[qid]),
                 "tokens": tok.token.iloc[rows].tolist(),
                 "err": np.flatnonzero(tok.in_error.to_numpy()[rows]).tolist() if "in_error" in tok else [],
                 "values": {}}
        for stat in shown:
            v = a.layer_means[stat][rows] if stat in a.layer_means else tok[stat].to_numpy()[rows]
            v = np.round(v.astype(float), 4)
            entry["values"][stat] = np.where(np.isnan(v), None, v).tolist()  # JSON has no NaN
        answers.append(entry)
    return {"name": a.name, "layers": a.layers, "answers": answers, "n_answers": len(a.answers),
            "labels": sorted(a.answers.label.unique()),
            "attention_stats": [s for s in shown if s in a.layer_means],
            "stat_names": {s: plots.STAT_NAMES[s] for s in shown}}


# ---------------------------------------------------------------- html


def _html(analyses: list[Analysis], figures: list[dict], instrument: str = "", verdict: str = "") -> str:
    esc = html.escape
    parts = [f"<h1>attentropy report</h1><p class=meta>{esc(', '.join(a.name for a in analyses))} · generated "
             f"{time.strftime('%Y-%m-%d %H:%M')} by attentropy {__version__}. Every figure's numbers are in "
             "<code>figures/</code> beside this file (PNG + CSV; all tests in "
             f"<code>comparisons.csv</code>/<code>.parquet</code>).</p>"]
    parts.append(verdict)  # where instruments are given, whether attention adds anything comes first
    parts.append(findings_section(analyses))
    parts.append("<h2>Runs</h2>" + side_by_side([
        f"<h3>{esc(a.name)}</h3><table>" + "".join(f"<tr><th>{esc(k)}</th><td>{esc(str(v))}</td></tr>"
                                                   for k, v in _config_rows(a)) + "</table>" for a in analyses]))
    parts.append(
        "<h2>How to read this</h2><ul>"
        "<li>Entropy H = −Σ p ln p in nats, varentropy V = Σ p (ln p + H)² in nats², of each attention row (per layer "
        "and query head) and of the next-token distribution. K = the keys the layer attends to (the visible keys, "
        "at most its sliding window); H ≤ ln K.</li>"
        "<li>AUROC: probability that a random member of the first group has the higher value (0.5: no difference). "
        f"Cohen's d: difference of means over the pooled SD. Intervals: {interval_sentence(analyses[0].intervals)} "
        "p: Mann-Whitney U on one aggregate per answer (answer contrasts; van Elteren's stratified test under the "
        "stratified and length-matched controls) or Wilcoxon signed-rank on per-question differences (token "
        "contrasts), whatever the interval method; q: Benjamini-Hochberg over all layer × head cells of one "
        "statistic and aggregation.</li>"
        f"<li>Answer aggregation: mean over the answer's tokens, max, or mean of the first {FIRST_K}. The "
        "pre-declared primary test is attention entropy, mean aggregation; the other statistics and aggregations "
        "are exploratory and not corrected across each other.</li>"
        f"<li>Wrong moment (math): tokens of the critic's span vs tokens within {WINDOW} positions of it in the same "
        f"answer, and the {WINDOW} tokens after the span vs the {WINDOW} before it — position-matched, and also as "
        "entropy / ln K; and the span's tokens containing a digit vs the answer's other such tokens (token type "
        "held fixed, position not).</li>"
        f"<li>Groups with fewer than {MIN_QUESTIONS_TO_CONCLUDE} questions are reported as too small to conclude; "
        "<code>unparsed</code> answers are excluded from every contrast and counted above.</li></ul>")
    keys = []
    for a in analyses:
        keys += [c.key for c in a.contrasts if c.key not in keys]
    parts.append("<h2>Contrasts</h2>")
    for a in analyses:
        if not a.graded:
            why = ("free prompts have no gold answer, so there are no groups to compare"
                   if a.benchmark == FREE else f"it is not graded yet (<code>attentropy grade {esc(a.path)}</code>)")
            parts.append(f"<p class=meta>{esc(a.name)}: no contrasts — {why}. The profiles, quadrants, "
                         f"distributions, token traces and the token viewer below need no labels: its answers form "
                         f"one group, <i>ungraded</i>.</p>")
    for key in keys:
        cells = []
        for a, figs in zip(analyses, figures):
            c = next((c for c in a.contrasts if c.key == key), None)
            if c is None:  # e.g. a math contrast beside a factual run: the applicable runs take the width
                continue
            text = "".join(f"<li>{line}</li>" for line in findings(a, c))
            shown = figs["contrasts"].get(key, {"main": [], "more": []})
            imgs = "".join(figure(p, cap) for cap, p in shown["main"])
            more = "".join(figure(p, cap) for cap, p in shown["more"])
            extra = f"<details><summary>max and first-{FIRST_K} aggregations</summary>{more}</details>" if more else ""
            cells.append(f"<h3>{esc(a.name)}: {esc(c.title)}</h3><ul>{text}</ul>{imgs}{extra}")
        parts.append(side_by_side(cells))
    parts.append(instrument)
    parts.append("<h2>Profiles, quadrants and distributions</h2>")
    for same_kind in zip(*(f["profiles"] for f in figures)):  # profiles, quadrants, distributions
        parts.append(side_by_side([figure(p, cap) for cap, p in same_kind]))
    parts.append("<h2>Token traces</h2>" + side_by_side([
        "".join(figure(p, cap) for cap, p in f["traces"]) or "<p>no answers to trace</p>" for f in figures]))
    data = [viewer_data(a) for a in analyses]
    caps = "".join(f"<p class=meta>{esc(d['name'])}: showing {len(d['answers'])} of {d['n_answers']} answers</p>"
                   for d in data)
    parts.append(f"<h2>Token viewer</h2>{caps}" + VIEWER_HTML)
    payload = json.dumps(data, ensure_ascii=False).replace("</", "<\\/")
    return (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>attentropy report</title>"
            f"<style>{CSS}</style></head><body>{''.join(parts)}"
            f"<script id=viewer-data type=application/json>{payload}</script><script>{VIEWER_JS}</script>"
            "</body></html>")


CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 1.5em auto; max-width: 1500px; padding: 0 1em; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; margin-top: 1.6em; }
.meta { color: #666; font-size: 12px; } code { font-size: 12px; }
.runs { display: grid; gap: 1.2em; align-items: start; }
table { border-collapse: collapse; font-size: 13px; } th, td { text-align: left; padding: 2px 8px; }
th { color: #555; font-weight: 600; } tr:nth-child(odd) { background: #f5f5f5; }
table.metrics td { white-space: nowrap; } table.metrics tr.hl { background: #fde7e7; }
.findings td:nth-child(2) { white-space: normal; min-width: 14em; } .findings td:nth-child(3) { white-space: normal; }
.findings td .meta { display: block; }  /* a control's group sizes under its AUROC: the table fits the page */
figure { margin: 0.6em 0; } figure img { max-width: 100%; } figcaption { font-size: 12px; color: #555; }
#controls { position: sticky; top: 0; background: #fff; padding: 6px 0; border-bottom: 1px solid #ddd; z-index: 1; }
#controls label { margin-right: 1em; } #hover { font-family: monospace; font-size: 12px; min-height: 1.4em; }
.answer { margin: 6px 0; padding: 6px; border: 1px solid #e3e3e3; border-radius: 4px; }
.answer .head { font-size: 12px; color: #555; margin-bottom: 3px; }
.badge { display: inline-block; padding: 0 6px; border-radius: 3px; color: #fff; font-size: 11px; }
.badge.correct { background: #1b9e77; } .badge.incorrect { background: #d95f02; }
.badge.not_attempted { background: #7570b3; } .badge.ungraded { background: #4c72b0; }
.tok { white-space: pre-wrap; font-family: monospace; font-size: 12.5px; border-radius: 2px; }
.tok.err { outline: 2px solid #e00000; outline-offset: -1px; }
#legend { display: inline-block; width: 160px; height: 10px; vertical-align: middle;
  background: linear-gradient(to right, #440154, #3b528b, #21918c, #5ec962, #fde725); }
"""

VIEWER_HTML = """
<div id=controls>
  <label>run <select id=run></select></label>
  <label>statistic <select id=stat></select></label>
  <label>layer <select id=layer></select></label>
  <span id=filters></span>
  <span class=meta><span id=lo></span> <span id=legend></span> <span id=hi></span> · red outline: the critic's wrong moment</span>
  <div id=hover>hover a token for its value</div>
</div>
<div id=answers></div>
"""

VIEWER_JS = r"""
(function () {
  const data = JSON.parse(document.getElementById('viewer-data').textContent);
  const runSel = document.getElementById('run'), statSel = document.getElementById('stat'),
        layerSel = document.getElementById('layer'), filters = document.getElementById('filters'),
        box = document.getElementById('answers'), hover = document.getElementById('hover');
  const stops = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];  // viridis
  function colour(t) {
    t = Math.min(1, Math.max(0, t)) * (stops.length - 1);
    const i = Math.min(stops.length - 2, Math.floor(t)), f = t - i;
    const c = stops[i].map((v, k) => Math.round(v + f * (stops[i + 1][k] - v)));
    return [`rgb(${c[0]},${c[1]},${c[2]})`, (0.3 * c[0] + 0.59 * c[1] + 0.11 * c[2]) > 140 ? '#000' : '#fff'];
  }
  data.forEach((run, i) => runSel.add(new Option(run.name, i)));
  function value(run, answer, t) {
    const stat = statSel.value, v = answer.values[stat][t];
    if (!Array.isArray(v)) return v;
    if (layerSel.value === 'mean') return v.reduce((s, x) => s + x, 0) / v.length;
    return v[Number(layerSel.value)];
  }
  function build() {
    const run = data[runSel.value];
    statSel.innerHTML = '';
    Object.entries(run.stat_names).forEach(([k, name]) => statSel.add(new Option(name, k)));
    filters.innerHTML = '';
    run.labels.forEach(label => {
      const l = document.createElement('label');
      l.innerHTML = `<input type=checkbox checked data-filter="${label}"> ${label}`;
      filters.appendChild(l);
    });
    filters.querySelectorAll('input').forEach(el => el.addEventListener('change', filter));
    box.innerHTML = '';
    run.answers.forEach((answer, a) => {
      const div = document.createElement('div');
      div.className = 'answer'; div.dataset.label = answer.label;
      const head = document.createElement('div'); head.className = 'head';
      head.innerHTML = `<span class="badge ${answer.label}">${answer.label}</span> `;
      head.appendChild(document.createTextNode(`${answer.id} · ${answer.question}` + (answer.target ? ` · target: ${answer.target}` : '')));
      div.appendChild(head);
      const err = new Set(answer.err);
      answer.tokens.forEach((text, t) => {
        const span = document.createElement('span');
        span.className = 'tok' + (err.has(t) ? ' err' : '');
        span.textContent = text; span.dataset.a = a; span.dataset.t = t;
        div.appendChild(span);
      });
      box.appendChild(div);
    });
    layers(); paint(); filter();
  }
  function layers() {
    const run = data[runSel.value], attention = run.attention_stats.includes(statSel.value);
    const keep = layerSel.value;
    layerSel.innerHTML = '';
    layerSel.add(new Option(attention ? 'mean over layers and heads' : '(per token)', 'mean'));
    if (attention) run.layers.forEach((layer, i) => layerSel.add(new Option(`layer ${layer} (mean over heads)`, i)));
    layerSel.disabled = !attention;
    if ([...layerSel.options].some(o => o.value === keep)) layerSel.value = keep;
  }
  function paint() {
    const run = data[runSel.value], all = [];
    run.answers.forEach(answer => answer.tokens.forEach((_, t) => all.push(value(run, answer, t))));
    const sorted = all.filter(Number.isFinite).sort((x, y) => x - y);
    const lo = sorted[Math.floor(0.02 * (sorted.length - 1))], hi = sorted[Math.ceil(0.98 * (sorted.length - 1))];
    document.getElementById('lo').textContent = lo === undefined ? '' : lo.toFixed(3);
    document.getElementById('hi').textContent = hi === undefined ? '' : hi.toFixed(3);
    box.querySelectorAll('.tok').forEach(span => {
      const answer = run.answers[span.dataset.a], v = value(run, answer, Number(span.dataset.t));
      const what = `${statSel.options[statSel.selectedIndex].text}, ${layerSel.options[layerSel.selectedIndex].text}`;
      if (!Number.isFinite(v)) {  // e.g. no confidence for this answer
        span.style.backgroundColor = ''; span.style.color = ''; span.title = `${what}: no value`; return;
      }
      const [bg, fg] = colour(hi > lo ? (v - lo) / (hi - lo) : 0.5);
      span.style.backgroundColor = bg; span.style.color = fg;
      span.title = `${what}: ${v.toFixed(4)}`;
    });
  }
  function filter() {
    const shown = new Set([...filters.querySelectorAll('input:checked')].map(el => el.dataset.filter));
    box.querySelectorAll('.answer').forEach(div => { div.style.display = shown.has(div.dataset.label) ? '' : 'none'; });
  }
  box.addEventListener('mouseover', e => {
    if (!e.target.classList.contains('tok')) return;
    hover.textContent = `${JSON.stringify(e.target.textContent)} · ${e.target.title}`;
  });
  runSel.addEventListener('change', build);
  statSel.addEventListener('change', () => { layers(); paint(); });
  layerSel.addEventListener('change', paint);
  build();
})();
"""
