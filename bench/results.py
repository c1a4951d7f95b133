"""The main job's instrument figures as an entry of bench/RESULTS.md, generated from the instrument's evaluation
(PROBE/evaluation.csv and evaluation.json), never typed: every detector's out-of-fold AUROC with the instrument's
paired difference, the headlines against the best of every baseline and of the training-free ones, leave one kind
out, selective answering, the token-level headline with its controls; and, from the report's comparisons.csv, the
study's contrasts raw and under their controls.

    .venv/bin/python bench/results.py [--runs runs/smollm2-135m] [--write]

Prints the entry; --write also puts it at the top of bench/RESULTS.md's log (newest first).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pandas as pd

from attentropy.detectors import PRIMARY
from attentropy.evaluation import headlines, held_out_comparators, interval_text
from attentropy.token_comparisons import TOKEN_COMPARISON_TITLES

RESULTS = Path(__file__).with_name("RESULTS.md")


def _gain(rows: pd.DataFrame, method: str, metric: str = "auroc_gain_of_instrument") -> str:
    r = rows[(rows.method == method) & (rows.metric == metric)]
    return interval_text(r.iloc[0]) if len(r) else ""


def task_section(task: str, rows: pd.DataFrame, summary: dict) -> list[str]:
    labels = ", ".join(f"{k} {v}" for k, v in summary["labels"].items())
    kinds = ", ".join(f"{k} {v}" for k, v in summary["kinds"].items())
    out = [f"### {task}: {summary['answers']} answers ({labels}); kinds: {kinds}; "
           f"{summary.get('groups', '?')} content groups, {summary.get('near_duplicates', '?')} near-duplicate answers",
           ""]
    ind = rows[rows.evaluation == "in_distribution"]
    instrument = interval_text(ind[(ind.metric == "auroc") & (ind.method == PRIMARY)].iloc[0])
    for h in headlines(rows):
        out.append(f"- Against the best of {h['pool']}, {h['best']} {interval_text(h['auroc'])}: instrument "
                   f"{instrument}, Δ {interval_text(h['gain'])}, {h['verdict']}.")
    out_of = {by: rows[(rows.evaluation == f"leave_one_{by}_out_mean") & (rows.metric == "auroc")].set_index("method")
              for by in ("kind", "source")}
    counts = {by: m.subset.iloc[0] if len(m) else "none" for by, m in out_of.items()}
    out += ["", f"| method | role | AUROC (in distribution) | Δ instrument − method | leave one kind out "
                f"({counts['kind']}) | leave one source out ({counts['source']}) |", "|---|---|---|---|---|---|"]
    for method, r in ind[ind.metric == "auroc"].set_index("method").iterrows():
        held_out = " | ".join(interval_text(m.loc[method]) if method in m.index else "" for m in out_of.values())
        out.append(f"| {method} | {r.role} | {interval_text(r)} | {_gain(ind, method)} | {held_out} |")
    for by, means in out_of.items():
        gains = rows[(rows.evaluation == f"leave_one_{by}_out_mean") & (rows.metric == "auroc_gain_of_instrument")]
        for free, how in held_out_comparators(means):
            out += ["", f"Leave one {by} out: instrument {interval_text(means.loc[PRIMARY])} against the training-free "
                        f"score {how}, {free} {interval_text(means.loc[free])}: Δ {_gain(gains, free)}."]
    small = rows[rows.evaluation.str.endswith("_too_small")]
    if len(small):
        out += ["", "Held out but too small to enter the means (fewer than 10 answers of a class): " + ", ".join(
            f"{r.subset} ({r.n_positive} / {r.n_negative})" for r in small.itertuples()) + "."]
    selective = rows[rows.evaluation == "selective"]
    f = selective[selective.metric == "f_score"].set_index("method")
    if len(f):
        rival = f.drop(index=["answer_everything", PRIMARY], errors="ignore").value.idxmax()
        out += ["", f"Selective answering, F-score: answering everything {interval_text(f.loc['answer_everything'])}; "
                    f"instrument {interval_text(f.loc[PRIMARY])} (gain "
                    f"{_gain(selective, 'answer_everything', 'f_score_gain_of_instrument')}); best other policy "
                    f"{rival} {interval_text(f.loc[rival])} (instrument − it "
                    f"{_gain(selective, rival, 'f_score_gain_of_instrument')})."]
    tokens = rows[rows.evaluation.str.startswith("token:")]
    if len(tokens):
        methods = tokens[tokens.metric == "auroc"].method.unique()
        out += ["", "| token comparison | wrong-moment / other | " + " | ".join(methods) + " |",
                "|---|---|" + "---|" * len(methods)]
        for evaluation, tr in tokens.groupby("evaluation", sort=False):
            auc = tr[tr.metric == "auroc"].set_index("method")
            out.append(f"| {TOKEN_COMPARISON_TITLES[evaluation[6:]]} | {int(auc.n_positive.iloc[0])} / "
                       f"{int(auc.n_negative.iloc[0])} | "
                       + " | ".join(interval_text(auc.loc[m]) if m in auc.index else "" for m in methods) + " |")
    return out + [""]


def contrasts_section(runs: Path) -> list[str]:
    """Per run: for attention entropy per layer x head, the cells significant at FDR 5 % raw, under each control and
    under every control, from the report's figures/<run>/comparisons.csv (`attentropy report`)."""
    out = []
    for path in sorted(runs.glob("figures/*/comparisons.csv")):
        c = pd.read_csv(path)
        c = c[(c.stat == "entropy") & (c.level == "head") & c.aggregation.isin(["mean", "tokens"])]
        if not len(c):
            continue
        out += [f"#### Contrasts of {path.parent.name} (attention entropy, layer x head cells significant at FDR 5 %)",
                "", "| contrast | raw | under each control | under every control |",
                "|---|---|---|---|"]
        for contrast, rows in c.groupby("contrast", sort=False):
            raw = rows[rows.control == "none"]
            controls = [k for k in rows.control.unique() if k != "none"]
            survive = raw[raw.significant].set_index(["layer", "head"]).index
            for k in controls:
                survive = survive.intersection(rows[(rows.control == k) & rows.significant].set_index(
                    ["layer", "head"]).index)
            each = ", ".join(f"{k} {int(rows[rows.control == k].significant.sum())}" for k in controls) or "—"
            out.append(f"| {contrast} | {int(raw.significant.sum())} of {len(raw)} | {each} | "
                       f"{len(survive) if controls else '—'} |")
        out.append("")
    return out


def entry(runs: Path) -> str:
    probe = runs / "instrument"
    ev = pd.read_csv(probe / "evaluation.csv")
    summary = json.loads((probe / "evaluation.json").read_text())["summary"]
    fitted_at = json.loads((probe / "probe.json").read_text()).get("git_commit")  # the code that made the figures
    lines = [f"## {time.strftime('%Y-%m-%d')} — the main job's instrument (commit {str(fitted_at)[:10]})", "",
             f"`./run.sh {runs}` then `.venv/bin/python bench/results.py --runs {runs} --write`; every figure out of "
             "fold, 95 % intervals resampling content groups of questions, Δ paired on the same resamples.", ""]
    for task, rows in ev.groupby("task", sort=False):
        lines += task_section(task, rows, summary[task])
    return "\n".join(lines + contrasts_section(runs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="runs/smollm2-135m", help="the main job's output (instrument/ inside)")
    parser.add_argument("--write", action="store_true", help="put the entry at the top of bench/RESULTS.md's log")
    args = parser.parse_args()
    text = entry(Path(args.runs))
    print(text)
    if args.write:
        log = RESULTS.read_text()
        first = log.index("\n## ")
        RESULTS.write_text(log[:first + 1] + text + "\n\n" + log[first + 1:])


if __name__ == "__main__":
    main()
