"""Replication across models: when a report's runs come from several models, each benchmark's answer-level
contrasts on every model side by side (`replication_rows`: the effect with its interval per model, and whether
direction and significance agree), the layer profiles on relative depth so that models of different depth line up
(`relative_depth_profiles`), and the instruments' methods per model with whether their ranking holds
(`instrument_rows`); `replication_section` is the report's Replication section."""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np
import pandas as pd

from .contrasts import Analysis, contrasts_of
from .html_blocks import figure, html_table
from .data import question_kind
from .stats import benjamini_hochberg, compare_answers, compare_answers_stratified

# the answer-level statistics compared across models: answer means (attention: over every layer and head, a
# quantity every model has) and their names
HEADLINE = (("attn_entropy", "attention entropy"), ("attn_entropy_norm", "attention entropy / ln K"),
            ("attn_varentropy", "attention varentropy"), ("logit_entropy", "next-token entropy"),
            ("logprob", "log-probability of the token"))
MIN_ANSWERS = 3  # per group and model, else the contrast is not compared on that model
ALPHA = 0.05


def model_of(a: Analysis) -> str:
    return str(a.config.get("model", {}).get("name"))


def by_benchmark(analyses: list[Analysis]) -> dict[str, dict[str, Analysis]]:
    """benchmark -> model -> its (first) run, for benchmarks run on at least two models."""
    out: dict[str, dict[str, Analysis]] = {}
    for a in analyses:
        if a.graded:
            out.setdefault(a.benchmark, {}).setdefault(model_of(a), a)
    return {b: runs for b, runs in out.items() if len(runs) > 1}


def answer_kinds(a: Analysis) -> np.ndarray:
    """The question kind of each analysed answer (facts' kind, arith's steps)."""
    kinds = {q: question_kind(b, m) for q, b, m in zip(a.samples.question_id, a.samples.benchmark, a.samples.metadata)}
    return a.answers.question_id.map(kinds).to_numpy()


def replication_rows(analyses: list[Analysis], n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """One row per (benchmark, contrast, statistic, control, model): AUROC of the answer means (> 0.5: the positive
    group, e.g. incorrect, higher) with a 95 % interval from resampled questions, Cohen's d, p, and q
    (Benjamini-Hochberg over the rows of that model). Control `none`: all pairs of answers; `within kind`: pairs
    of one question kind only (`compare_answers_stratified`; the models' mixes of kinds among correct and incorrect
    answers differ). Then per (benchmark, contrast, statistic, control): `direction` (the models' AUROCs on the
    same side of 0.5), `significance` (q < ALPHA on every model, on some, on none) and `replicates` (the same
    direction and significant on every model)."""
    rows = []
    for benchmark, runs in by_benchmark(analyses).items():
        for key, title, pos_labels, neg_labels in contrasts_of(benchmark):
            for stat, stat_name in HEADLINE:
                for control in ("none", "within kind"):
                    for model, a in runs.items():
                        if stat not in a.answers:
                            continue
                        label = a.answers.label.to_numpy()
                        positive, negative = np.isin(label, pos_labels), np.isin(label, neg_labels)
                        row = dict(benchmark=benchmark, contrast=key, title=title, stat=stat, stat_name=stat_name,
                                   control=control, model=model, n_positive=int(positive.sum()),
                                   n_negative=int(negative.sum()))
                        sel = positive | negative
                        if min(positive.sum(), negative.sum()) >= MIN_ANSWERS:
                            values = a.answers[stat].to_numpy(float)[sel]
                            try:
                                c = (compare_answers(values, positive[sel], n_boot=n_boot, seed=seed)
                                     if control == "none" else compare_answers_stratified(
                                         values, positive[sel], answer_kinds(a)[sel], n_boot=n_boot, seed=seed))
                                row.update(auroc=float(c.auroc), auroc_lo=float(c.auroc_ci[0]),
                                           auroc_hi=float(c.auroc_ci[1]), cohens_d=float(c.cohens_d), p=float(c.p))
                            except ValueError:  # no kind holds both groups
                                pass
                        rows.append(row)
    table = pd.DataFrame(rows)
    if not len(table) or "p" not in table:
        return table
    table["q"] = np.nan
    for model, idx in table[table.p.notna()].groupby("model").groups.items():
        table.loc[idx, "q"] = benjamini_hochberg(table.loc[idx, "p"].to_numpy())
    table["significant"] = table.q < ALPHA
    keys = ["benchmark", "contrast", "stat", "control"]
    verdicts = table.groupby(keys, sort=False).apply(_verdict, include_groups=False)
    return table.join(verdicts, on=keys)


def _verdict(group: pd.DataFrame) -> pd.Series:
    """Whether one contrast and statistic replicates across the models of `group` (one row per model)."""
    compared = group[group.auroc.notna()]
    if len(compared) < len(group) or len(group) < 2:
        return pd.Series({"direction": "—", "significance": "—", "replicates": "not comparable (too few answers)"})
    sides = set(np.sign(compared.auroc - 0.5))
    direction = "same" if len(sides) == 1 and 0 not in sides else "opposite"
    n_sig = int(compared.significant.sum())
    significance = "all" if n_sig == len(compared) else "none" if n_sig == 0 else "some"
    if direction == "same" and significance == "all":
        verdict = "yes"
    elif direction == "same" and significance == "some":
        verdict = "direction only (significant on " + ", ".join(compared[compared.significant].model) + ")"
    elif significance == "none":
        verdict = "nothing to replicate (significant on no model)"
    else:
        verdict = "no"
    return pd.Series({"direction": direction, "significance": significance, "replicates": verdict})


def relative_depth_profiles(analyses: list[Analysis], out: Path, stat: str = "entropy_norm") -> list[Path]:
    """Per benchmark run on several models: the mean of the answers' per-layer means of `stat` for correct and
    incorrect answers, with 95 % intervals, against relative depth layer / (layers - 1), one colour per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for benchmark, runs in by_benchmark(analyses).items():
        fig, ax = plt.subplots(figsize=(7, 3.6))
        tables = []
        for (model, a), colour in zip(runs.items(), plt.rcParams["axes.prop_cycle"].by_key()["color"]):
            p = a.profiles[(a.profiles.stat == stat) & a.profiles.group.isin(["correct", "incorrect"])].copy()
            p["depth"] = p.layer.map({layer: i / max(1, len(a.layers) - 1) for i, layer in enumerate(a.layers)})
            p["model"] = model
            tables.append(p)
            for group, style in (("incorrect", "-"), ("correct", "--")):
                g = p[p.group == group].sort_values("depth")
                if len(g):
                    ax.plot(g.depth, g["mean"], style, color=colour, label=f"{model}: {group} (n={g.n.iloc[0]})")
                    ax.fill_between(g.depth, g.lo, g.hi, color=colour, alpha=0.12)
        ax.set_xlabel("relative depth: layer / (layers - 1)")
        ax.set_ylabel(stat.replace("_norm", " / ln K"))
        ax.set_title(f"{benchmark}: layer profile by model")
        ax.legend(fontsize=7)
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"relative_depth_{benchmark}.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        pd.concat(tables).to_csv(out / f"relative_depth_{benchmark}.csv", index=False)
        paths.append(path)
    return paths


def instrument_rows(probes: list[Path]) -> pd.DataFrame:
    """Per instrument (one per model), task and method: the in-distribution out-of-fold AUROC with its interval
    and the method's rank within that model and task (1: the highest AUROC)."""
    from .instrument import load_instrument

    parts = []
    for probe in probes:
        ev = pd.read_csv(Path(probe) / "evaluation.csv")
        ev = ev[(ev.evaluation == "in_distribution") & (ev.metric == "auroc")].copy()
        ev["model"] = str(load_instrument(probe).identity["name"])
        ev["rank"] = ev.groupby("task").value.rank(ascending=False, method="min")
        parts.append(ev[["model", "task", "method", "value", "lo", "hi", "rank"]])
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def ranking_holds(table: pd.DataFrame) -> pd.DataFrame:
    """Per task: Spearman's correlation of the methods' AUROCs between the models (over the methods every model
    has), whether the same method ranks first, and the instrument's rank on each model."""
    from scipy.stats import spearmanr

    rows = []
    for task, t in table.groupby("task", sort=False):
        wide = t.pivot_table(index="method", columns="model", values="value").dropna()
        models = list(wide.columns)
        if len(models) < 2 or len(wide) < 3:
            continue
        rho = spearmanr(wide[models[0]], wide[models[1]]).statistic
        firsts = {m: wide[m].idxmax() for m in models}
        ranks = {m: int(wide[m].rank(ascending=False, method="min").get("instrument", 0)) for m in models}
        rows.append({"task": task, "methods": len(wide), "spearman": float(rho),
                     "best": "; ".join(f"{m}: {b}" for m, b in firsts.items()),
                     "same best": len(set(firsts.values())) == 1,
                     "instrument rank": "; ".join(f"{m}: {r} of {len(wide)}" for m, r in ranks.items())})
    return pd.DataFrame(rows)


def replication_section(analyses: list[Analysis], probes: list[Path], out: Path, n_boot: int = 1000,
                        seed: int = 0) -> str:
    """The report's Replication section ('' unless some benchmark was run on several models); its tables are
    also written to `out` as CSV."""
    esc = html.escape
    if not by_benchmark(analyses):
        return ""
    table = replication_rows(analyses, n_boot, seed)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "replication.csv", index=False)
    models = list(dict.fromkeys(table.model)) if len(table) else []
    rows = []
    for (benchmark, key, stat, control), g in table.groupby(["benchmark", "contrast", "stat", "control"],
                                                          sort=False):
        cells = []
        for model in models:
            r = g[g.model == model]
            if not len(r) or pd.isna(r.auroc.iloc[0]):
                cells.append(f"— ({int(r.n_positive.iloc[0]) if len(r) else 0} / "
                             f"{int(r.n_negative.iloc[0]) if len(r) else 0})")
                continue
            r = r.iloc[0]
            mark = "<b>" if r.significant else ""
            cells.append(f"{mark}{r.auroc:.3f}{'</b>' if mark else ''} [{r.auroc_lo:.3f}, {r.auroc_hi:.3f}] "
                         f"q={r.q:.2g} ({r.n_positive} / {r.n_negative})")
        first = g.iloc[0]
        rows.append([esc(benchmark), esc(first.title), esc(first.stat_name), esc(control), *cells,
                     esc(first.direction),
                     esc(first.significance), esc(first.replicates)])
    parts = ["<h2 id=replication>Replication across models</h2>",
             "<p>Each contrast of the study on every model, on the answer means of a statistic (attention: mean over "
             "all layers and heads, so models of any depth compare), on all pairs of answers and within question "
             "kinds (pairs of one kind only: the models' mixes of kinds differ). AUROC &gt; 0.5: the first group "
             "(e.g. incorrect) higher; 95 % intervals resample questions; q: Benjamini-Hochberg over this table's "
             "rows of the model; "
             f"bold: q &lt; {ALPHA}; (n positive / n negative). A finding replicates when its direction is the same "
             "and it is significant on every model.</p>",
             html_table(["benchmark", "contrast", "statistic", "pairs", *[esc(m) for m in models], "direction",
                         "significant on", "replicates"], rows)]
    for path in relative_depth_profiles(analyses, out):
        parts.append(figure(path, "attention entropy / ln K per layer, correct (dashed) and incorrect (solid) "
                                  "answers, on relative depth"))
    if len(probes) > 1:
        methods = instrument_rows(probes)
        methods.to_csv(out / "instrument_replication.csv", index=False)
        ranking = ranking_holds(methods)
        ranking.to_csv(out / "instrument_ranking.csv", index=False)
        wide = []
        for (task, method), g in methods.groupby(["task", "method"], sort=False):
            cells = []
            for model in dict.fromkeys(methods.model):
                r = g[g.model == model]
                cells.append("—" if not len(r) else f"{r.value.iloc[0]:.3f} [{r.lo.iloc[0]:.3f}, "
                             f"{r.hi.iloc[0]:.3f}] #{int(r['rank'].iloc[0])}")
            wide.append([esc(task), esc(method), *cells])
        parts.append("<h3>The instrument and the baselines per model</h3><p>In-distribution out-of-fold AUROC "
                     "[95 % CI] #rank within the model and task.</p>"
                     + html_table(["task", "method", *[esc(m) for m in dict.fromkeys(methods.model)]], wide))
        parts.append("<p>Does the ranking hold? Spearman's correlation of the methods' AUROCs between the models, "
                     "the best method of each, the instrument's rank:</p>" + html_table(
                         ["task", "methods", "Spearman", "best method", "same best", "instrument rank"],
                         [[esc(r.task), str(r.methods), f"{r.spearman:.2f}", esc(r.best),
                           "yes" if r["same best"] else "no", esc(r["instrument rank"])]
                          for _, r in ranking.iterrows()]))
    return "".join(parts)
