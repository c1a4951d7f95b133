"""The report's Instrument section: what was fitted, plain findings, every detector's out-of-fold metrics, the
figures, and the out-of-fold confidences shown in the token viewer."""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np

from . import plots
from .contrasts import Analysis
from .evaluation import interval_text as cell
from .html_blocks import figure, html_table, side_by_side


def attach_out_of_fold_confidence(a: Analysis, probe: str | Path, run) -> None:
    """The viewer's confidences for a run the instrument was fitted on: its out-of-fold ones (a score by the
    instrument itself would be in-sample); other runs keep what `attentropy score` stored, if anything."""
    import pandas as pd

    from .answers import run_info

    fingerprint = run_info(run)["fingerprint"]
    oof = pd.read_parquet(Path(probe) / "token_predictions.parquet")
    oof = oof[oof.run_fingerprint == fingerprint]
    if not len(oof):
        return
    key = pd.MultiIndex.from_frame(a.tokens[["question_id", "pos"]])
    oof = oof.set_index(["question_id", "pos"])
    a.tokens["prefix_confidence"] = oof.prefix_confidence.reindex(key).to_numpy()
    a.tokens["confidence"] = (oof["confidence:instrument"].reindex(key).to_numpy()
                              if "confidence:instrument" in oof else np.nan)



def instrument_section(probe: Path, fig_dir: Path) -> tuple[str, list[tuple[str, str, list[str]]]]:
    """The Instrument section: what was fitted, the metrics of every method on the same out-of-fold answers,
    in and out of distribution, selective answering, prefix and token confidence, with figures. Also, per task,
    (model, task, verdict lines) for `instrument_verdict`: against the strongest baseline, then out of kind and
    source."""
    import pandas as pd

    from .instrument import load_instrument
    from .token_comparisons import TOKEN_COMPARISON_TITLES

    esc = html.escape
    inst = load_instrument(probe)
    ev = pd.read_csv(probe / "evaluation.csv")
    preds = pd.read_parquet(probe / "predictions.parquet")
    meta = inst.meta
    runs = ", ".join(f"{Path(r['path']).name} ({r['benchmark']}, {r['answers']} answers)"
                     for r in meta["training_runs"])
    parts = [f"<h2 id=instrument>Instrument</h2><p class=meta><code>{esc(str(probe))}</code> · fitted on "
             f"{esc(runs)} · model {esc(str(inst.identity['name']))} · {len(inst.identity['layers'])} layers × "
             f"{inst.identity['n_heads']} heads · answer models: {', '.join(sorted(inst.answer_models))}; token model: "
             f"{'yes' if inst.token_model is not None else 'no (no wrong moments to learn from)'}</p>",
             "<ul><li>Answer confidence: P(correct) from the answer's mean attention statistics per layer × head "
             "(entropy / ln K, varentropy / (ln K)², masses on the first token, the prompt, the own and the previous "
             "token) and its logit statistics; an L2 logistic probe, its strength chosen inside the training folds, "
             "calibrated (Platt) on inner out-of-fold scores. Prefix confidence: the same on the tokens so far. "
             "Token confidence: P(not the critic's wrong moment) from the token's own statistics per layer.</li>"
             f"<li>Every number below is out of fold ({meta['evaluation']['folds']}-fold cross-validation grouped by "
             "content: no question, and no near-duplicate of it, is in two folds), every method on the same answers "
             "and folds; 95 % intervals resample those groups; Δ AUROC = instrument − method on the same resamples. "
             "Each baseline's direction and scale are calibrated on the training folds, which can only help it."
             "</li></ul>"]
    roles = {m: d["role"] for m, d in meta["methods"].items()}
    descriptions = {m: d["description"] for m, d in meta["methods"].items()}
    descriptions.update({f"token:{m}": d["description"] for m, d in meta["token_methods"].items()})
    verdicts = []
    for task, rows in ev.groupby("task", sort=False):
        summary = meta["evaluation"]["summary"][task]
        best_logit = summary["best_logit_baseline"]
        task_preds = preds[preds.task == task]
        parts.append(f"<h3>{esc(task)} answers: {summary['answers']} ("
                     + ", ".join(f"{k} {v}" for k, v in summary["labels"].items()) + ")</h3>")
        parts.append("<p class=meta>Question kinds: " + ", ".join(f"{esc(k)} {v}" for k, v in summary["kinds"].items())
                     + f"; folds and intervals grouped by content: {summary.get('groups', '?')} groups, "
                     f"{summary.get('near_duplicates', '?')} answers share theirs with another question (the same "
                     "computation under other names, or the same gold answer of a kind).</p>")
        findings = instrument_findings(rows, summary)
        verdicts.append((str(inst.identity["name"]), task, [findings[0], *held_out_findings(rows)]))
        parts.append("<ul>" + "".join(f"<li>{line}</li>" for line in findings) + "</ul>")
        ind = rows[rows.evaluation == "in_distribution"]
        held = {by: rows[(rows.evaluation == f"leave_one_{by}_out_mean") & (rows.metric == "auroc")]
                .set_index("method") for by in ("kind", "source")}
        table = []
        order = [m for m in roles if m in set(ind.method)]
        for m in order:
            r = ind[ind.method == m].set_index("metric")
            gain = r.loc["auroc_gain_of_instrument"] if "auroc_gain_of_instrument" in r.index else None
            table.append([f"<b title='{esc(descriptions[m])}'>{esc(m)}</b>", esc(roles[m]), cell(r.loc["auroc"]),
                          "—" if gain is None else cell(gain),
                          *[cell(h.loc[m]) if m in h.index else "—" for h in held.values()],
                          f"{r.loc['auprc', 'value']:.3f}", f"{r.loc['prr', 'value']:.3f}",
                          f"{r.loc['brier', 'value']:.3f}", f"{r.loc['ece', 'value']:.3f}"])
        held_titles = [f"leave one {by} out ({h.subset.iloc[0]})" if len(h) else f"leave one {by} out"
                       for by, h in held.items()]
        parts.append("<p>Every method in distribution (out of fold) and on question kinds, or every kind of a data "
                     "source, left out of fitting (AUROC, mean over the held-out ones; interval resampling them and "
                     "their questions; AUPRC: finding the incorrect answers; PRR: prediction-rejection ratio as "
                     "lm-polygraph defines it; both in distribution):</p>" + html_table(
                         ["method", "role", "AUROC [95 % CI]", "Δ AUROC of the instrument", *held_titles, "AUPRC",
                          "PRR", "Brier", "ECE"], table, highlight=0))
        kinds = rows[rows.evaluation.isin(["within_kind", "leave_one_kind_out"]) & (rows.metric == "auroc")]
        if kinds.subset.nunique() > 1:
            ktable = []
            for kind, kr in kinds.groupby("subset", sort=False):
                def get(evaluation, method):
                    r = kr[(kr.evaluation == evaluation) & (kr.method == method)]
                    return cell(r.iloc[0]) if len(r) else "—"
                first = kr.iloc[0]
                ktable.append([esc(kind), f"{int(first.n_positive)} / {int(first.n_negative)}",
                               get("within_kind", "instrument"), get("within_kind", best_logit),
                               get("within_kind", "kind_logit"), get("leave_one_kind_out", "instrument"),
                               get("leave_one_kind_out", best_logit)])
            parts.append("<p>By question kind: within the kind (out of fold, same models as above) and leave one "
                         "kind out (fitted on the other kinds only):</p>" + html_table(
                             ["kind", "correct / incorrect", "instrument (within)", f"{best_logit} (within)",
                              "kind + logit (within)", "instrument (kind left out)", f"{best_logit} (kind left out)"],
                             ktable))
        shown = [m for m in ("instrument", "attention", best_logit, "kind_logit", "lookback_lens")
                 if f"confidence:{m}" in task_preds]
        out = fig_dir / task
        figs = [("ROC curves, out of fold", plots.roc_curves(task_preds, shown, out, "roc",
                                                             f"{task}: ROC, out of fold")),
                ("reliability of the calibrated confidence", plots.reliability(
                    task_preds, ["instrument", best_logit], out, "reliability", f"{task}: reliability, out of fold"))]
        sel = rows[rows.evaluation == "selective"]
        figs.append(("selective answering: F-score and accuracy of the answers given against coverage",
                     plots.coverage_curves(task_preds, ["instrument", best_logit], out, "coverage",
                                           f"{task}: abstain below a confidence threshold (curves: every threshold; "
                                           "x: threshold chosen on training folds)", sel)))
        if kinds.subset.nunique() > 1:
            for evaluation, caption in (("within_kind", "AUROC within each question kind"),
                                        ("leave_one_kind_out", "AUROC on a kind left out of fitting")):
                kr = kinds[kinds.evaluation == evaluation]
                if len(kr):
                    shown_k = [m for m in ("instrument", "instrument_dense", best_logit, "kind_logit")
                               if m in set(kr.method)]
                    figs.append((caption, plots.auroc_bars(kr, shown_k, out, evaluation, f"{task}: {caption}")))
        prefix = rows[rows.evaluation == "prefix"]
        if len(prefix):
            figs.append(("prefix confidence: AUROC of the answer's correctness from its first k tokens",
                         plots.auroc_bars(prefix, ["instrument"], out, "prefix",
                                          f"{task}: prefix confidence after k tokens")))
        parts.append(side_by_side([figure(p, cap) for cap, p in figs[:2]]))
        parts.append(side_by_side([figure(p, cap) for cap, p in figs[2:3]]))
        if figs[3:]:
            parts.append(side_by_side([figure(p, cap) for cap, p in figs[3:]]))
        if len(sel):
            stable = []
            for m, r in sel.groupby("method", sort=False):
                r = r.set_index("metric")
                stable.append([esc(m)] + [cell(r.loc[k]) if k in r.index else "—" for k in (
                    "coverage", "correct", "correct_given_attempted", "f_score",
                    "f_score_gain_over_answering_everything", "f_score_gain_of_instrument")])
            parts.append("<p>Selective answering: an answer whose confidence is below the threshold chosen on "
                         "its training folds (highest F-score there, not-attempted answers included) becomes "
                         "<i>not attempted</i>; held-out folds pooled; gains paired on the same resamples:</p>"
                         + html_table(["policy", "coverage", "correct", "correct given attempted", "F-score",
                                       "F-score gain over answering everything", "instrument − it (F-score)"],
                                      stable))
        tokens = rows[rows.evaluation.str.startswith("token:") & (rows.metric == "auroc")]
        token_gains = rows[rows.evaluation.str.startswith("token:") & (rows.metric == "auroc_gain_of_instrument")]
        if len(tokens):
            ttable = []
            shown_methods = ("instrument", "logit_probe", "logit_entropy", "hidden", "token_type", "answer_confidence",
                             "prefix_confidence", "position")
            for evaluation, tr in tokens.groupby("evaluation", sort=False):
                tr = tr.set_index("method")
                gains = token_gains[token_gains.evaluation == evaluation].set_index("method")
                rival = tr.drop(index="instrument").value.idxmax()
                first = tr.iloc[0]
                ttable.append([esc(TOKEN_COMPARISON_TITLES[evaluation[6:]]),
                               f"{int(first.n_positive)} / {int(first.n_negative)}"]
                              + [cell(tr.loc[m]) if m in tr.index else "—" for m in shown_methods]
                              + [f"{esc(rival)}: {cell(gains.loc[rival])}" if rival in gains.index else "—"])
            parts.append("<p>Token confidence: AUROC of finding the critic's wrong-moment tokens by low confidence "
                         "(intervals resample questions). The first row, type-matched, is the headline: token type "
                         "held fixed, it says whether a score sees an error rather than a kind of token; the other "
                         "rows mostly measure token type (see the token-type control). Controls: the token's type "
                         "alone, the answer's confidence given to each of its tokens, the prefix confidence.</p>"
                         + html_table(
                             ["comparison", "wrong-moment / other tokens", "instrument", "logit probe",
                              "logit entropy", "hidden-state probe", "token type (control)",
                              "answer confidence (control)", "prefix confidence (control)", "position (control)",
                              "instrument − the best other"], ttable, highlight=0))
            tbars = tokens.assign(subset=tokens.evaluation.str[6:])
            parts.append(side_by_side([figure(plots.auroc_bars(
                tbars, ["instrument", "logit_probe", "logprob", "position"], out, "tokens",
                f"{task}: token confidence, wrong moment vs other tokens"), "token confidence by comparison")]))
        parts.append("<p class=meta>Methods: " + "; ".join(
            f"<b>{esc(m)}</b> ({esc(roles[m])}): {esc(descriptions[m])}" for m in roles) + ".</p>")
    return "".join(parts), verdicts



def instrument_verdict(verdicts: list[tuple[str, str, list[str]]], name_models: bool = False) -> str:
    """The report's opening lines where instruments are given: per instrument (one per model) and task, its
    verdict against the strongest baseline in distribution, then on a kind and a source of question left out of
    fitting (`instrument_section`'s verdicts), so that a reader learns first whether attention adds anything over
    the strongest baseline. `name_models`: each line names its model (one instrument per model)."""
    items = [f"<li><b>{html.escape(f'{model}, {task}' if name_models else task)}</b>: " + " ".join(lines) + "</li>"
             for model, task, lines in verdicts]
    return ("<h2 id=verdict>The instrument in short</h2><p class=meta>From the Instrument section below: every "
            "figure out of fold, Δ paired.</p><ul>" + "".join(items) + "</ul>") if items else ""


def instrument_findings(rows, summary: dict) -> list[str]:
    """Plain sentences on one task's evaluation: in distribution against the strongest baseline and control,
    within and across question kinds, the shuffled-label control, selective answering."""
    from .detectors import PRIMARY, cheap, is_competitor, of_family
    from .evaluation import MIN_PER_CLASS_TO_CONCLUDE as MIN_PER_CLASS
    from .evaluation import headlines

    auc = rows.query("evaluation == 'in_distribution' and metric == 'auroc'").set_index("method")
    gain = rows.query("evaluation == 'in_distribution' and metric == 'auroc_gain_of_instrument'").set_index("method")
    heads = headlines(rows)
    strongest = heads[0]
    adds = strongest["gain"]["lo"] > 0
    lines = [("<b>Attention adds nothing measurable over the strongest baseline here</b>: "
              if not adds else "<b>The instrument is above the strongest baseline</b>: ")
             + f"the instrument's AUROC is {cell(auc.loc[PRIMARY])}, the best of every baseline and control "
             f"({strongest['best']}) {cell(strongest['auroc'])}, Δ AUROC {cell(strongest['gain'])}, "
             f"{strongest['verdict']}."
             + (f" Attention alone: {cell(auc.loc['attention'])}." if "attention" in auc.index else "")]
    for h in heads[1:]:
        lines.append(f"Against the best of {h['pool']}, {h['best']} {cell(h['auroc'])}: Δ AUROC {cell(h['gain'])}, "
                     f"{h['verdict']}.")
    if "hidden" in auc.index:
        lines.append(f"Against the residual stream: the hidden-state probe {cell(auc.loc['hidden'])} (instrument − "
                     f"it: {cell(gain.loc['hidden'])}); instrument + hidden states "
                     f"{cell(auc.loc['attention_hidden'])}; the bag of tokens (what the answer says) "
                     f"{cell(auc.loc['bag_of_tokens'])}." if "bag_of_tokens" in auc.index else
                     f"Against the residual stream: the hidden-state probe {cell(auc.loc['hidden'])}.")
    strat = rows.query("evaluation == 'stratified' and metric == 'auroc'").set_index("method")
    if len(strat):
        sbest = strat.loc[[m for m in strat.index if is_competitor(m)]].value.idxmax()
        lines.append(f"Pairs within a question kind only (the kind cannot help): instrument "
                     f"{cell(strat.loc[PRIMARY])}, best other {sbest} {cell(strat.loc[sbest])}.")
    within = rows.query("evaluation == 'within_kind' and metric == 'auroc'")
    big = within[(within.n_positive >= MIN_PER_CLASS) & (within.n_negative >= MIN_PER_CLASS)]
    if big.subset.nunique():
        wins = []
        for kind, kr in big.groupby("subset"):
            kr = kr.set_index("method")
            rival = kr.loc[cheap(kr.index)]
            wins.append(kr.loc[PRIMARY, "value"] > rival.value.max())
        lines.append(f"Within the kinds with at least {MIN_PER_CLASS} correct and {MIN_PER_CLASS} incorrect "
                     f"answers the instrument is above every logit, kind and length baseline in {sum(wins)} of "
                     f"{len(wins)}.")
    lines += held_out_findings(rows)
    lines += [f"Shuffled-label control (must be at chance): {cell(auc.loc[m])}."
              for m in of_family("sanity", auc.index)]
    sel = rows[rows.evaluation == "selective"]
    f = sel[sel.metric == "f_score"].set_index("method")
    if PRIMARY in f.index:
        gain = sel[sel.metric == "f_score_gain_of_instrument"].set_index("method")
        rival = f.drop(index=["answer_everything", PRIMARY]).value.idxmax()
        lines.append(f"Selective answering, F-score: answering everything {cell(f.loc['answer_everything'])}, "
                     f"abstaining by the instrument {cell(f.loc[PRIMARY])} (gain {cell(gain.loc['answer_everything'])})"
                     f", by the best other method, {rival}, {cell(f.loc[rival])} (instrument − it: "
                     f"{cell(gain.loc[rival])}).")
    return lines


def held_out_findings(rows) -> list[str]:
    """One task's sentences on a question kind and a question source left out of fitting: the instrument's mean
    AUROC against the training-free score chosen on the training folds (`anchor_chosen`) and against the one that
    did best on the held-out answers (chosen after the fact), with their paired differences."""
    from .detectors import PRIMARY, instrument_variants
    from .evaluation import held_out_comparators

    esc = html.escape
    lines = []
    for by in ("kind", "source"):
        held = rows[rows.evaluation == f"leave_one_{by}_out_mean"].set_index(["metric", "method"])
        if not len(held):
            continue
        means = held.loc["auroc"]
        comparators = held_out_comparators(means)
        texts = [f"{cell(means.loc[name])} for the training-free score {how}, {esc(name)} (instrument − it "
                 f"{cell(held.loc[('auroc_gain_of_instrument', name)])})" for name, how in comparators]
        verdict = ""
        if comparators:  # against the first: the one a user without the held-out labels would choose
            name, how = comparators[0]
            gain = held.loc[("auroc_gain_of_instrument", name)]
            verdict = (f": on a new {by} of question the instrument is above it" if gain.lo > 0 else
                       f": <b>on a new {by} of question the training-free score {how} is the better one</b>"
                       if gain.hi < 0 else
                       f": <b>on a new {by} of question the instrument is no better than the training-free score "
                       f"{how}</b>, which costs nothing")
        lines.append(f"On a question {by} left out of fitting ({means.subset.iloc[0]}) the instrument's mean AUROC "
                     f"is {cell(means.loc[PRIMARY])}" + (" against " + " and ".join(texts) if texts else "")
                     + f"{verdict}.")
        variants = instrument_variants(means.index)
        if variants:
            lines.append(f"Each design of the instrument on a {by} left out: " + ", ".join(
                f"{esc(m)} {cell(means.loc[m])}" for m in variants) + ".")
        if ("auroc_gain_of_instrument", "instrument_dense") in held.index:
            lines.append(f"What the applicability check buys there (answers of an unseen kind go to the anchored "
                         f"model, not the dense probe): instrument − instrument_dense "
                         f"{cell(held.loc[('auroc_gain_of_instrument', 'instrument_dense')])}.")
    return lines
