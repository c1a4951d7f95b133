"""The report's figures, one function per figure. Each writes `<stem>.png` and the numbers drawn as `<stem>.csv`
into a folder and returns the PNG's path. All take an `Analysis` (attentropy.contrasts.analyze_run)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no screen
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from .contrasts import PROFILE_STATS, Analysis  # noqa: E402

LABEL_COLORS = {"correct": "#1b9e77", "incorrect": "#d95f02", "not_attempted": "#7570b3", "ungraded": "#4c72b0"}
STAT_NAMES = {"entropy": "attention entropy (nats)", "varentropy": "attention varentropy (nats²)",
              "entropy_norm": "attention entropy / ln K", "sink_mass": "mass on the first token",
              "prompt_mass": "mass on the prompt", "diag_mass": "mass on the own token",
              "prev_mass": "mass on the previous token", "logit_entropy": "logit entropy (nats)",
              "logit_varentropy": "logit varentropy (nats²)", "logprob": "log-prob of the token (nats)",
              "answer_length": "answer length (tokens)",
              "confidence": "token confidence (instrument: P not the wrong moment)",
              "prefix_confidence": "prefix confidence (instrument: P correct, tokens so far)"}
HEATMAP_STATS = ("entropy", "varentropy", "entropy_norm", "sink_mass", "prompt_mass", "diag_mass", "prev_mass")


def _save(fig, table: pd.DataFrame, out: Path, stem: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{stem}.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    table.to_csv(out / f"{stem}.csv", index=False)
    return path


def _every(n: int, most: int = 32) -> np.ndarray:
    """Tick positions 0..n-1, every one up to `most`, else evenly thinned (a 90B run has 80 layers x 64 heads, and
    laying out thousands of tick labels was most of the time its report spent drawing)."""
    return np.arange(0, n, -(-n // most))


def _contrast(a: Analysis, key: str):
    return next(c for c in a.contrasts if c.key == key)


def effect_heatmaps(a: Analysis, contrast: str, aggregation: str, out: Path, stem: str) -> Path:
    """AUROC per layer x head for every attention statistic; cells not significant after Benjamini-Hochberg
    (q >= 0.05 over the layer x head cells of that panel) are drawn faded and without their colour."""
    c = _contrast(a, contrast)
    rows = a.comparisons.query("contrast == @contrast and aggregation == @aggregation and level == 'head' "
                               "and control == 'none'")
    stats = [s for s in HEATMAP_STATS if s in set(rows.stat)]
    fig, axes = plt.subplots(1, len(stats), figsize=(2.1 * len(stats) + 1.5, 0.16 * len(a.layers) + 2.2),
                             sharey=True, squeeze=False, layout="constrained")
    norm = matplotlib.colors.Normalize(0.0, 1.0)
    cmap = matplotlib.colormaps["RdBu_r"]
    for ax, stat in zip(axes[0], stats):
        cells = rows[rows.stat == stat]
        auc = cells.pivot(index="layer", columns="head", values="auroc").reindex(a.layers)
        sig = cells.pivot(index="layer", columns="head", values="significant").reindex(a.layers).astype(bool)
        rgba = cmap(norm(auc.to_numpy()))
        rgba[~sig.to_numpy()] = 0.22 * rgba[~sig.to_numpy()] + 0.78 * np.array([0.93, 0.93, 0.93, 1.0])
        ax.imshow(rgba, aspect="auto", interpolation="nearest")
        ax.set_title(f"{STAT_NAMES[stat]}\n{int(sig.to_numpy().sum())}/{sig.size} significant", fontsize=8)
        ax.set_xlabel("head")
        ax.set_xticks(_every(a.n_heads))
        ax.tick_params(labelsize=6)
    axes[0][0].set_ylabel("layer")
    axes[0][0].set_yticks(_every(len(a.layers)), np.asarray(a.layers)[_every(len(a.layers))])
    fig.colorbar(matplotlib.cm.ScalarMappable(norm, cmap), ax=axes[0].tolist(), shrink=0.8,
                 label=f"AUROC ({c.positive} higher → 1)")
    fig.suptitle(f"{a.name}: {c.title} — AUROC per layer × head, {aggregation} over answer tokens\n"
                 f"n = {c.n_positive} {c.positive} vs {c.n_negative} {c.negative} questions; faded: q ≥ 0.05 (BH)",
                 fontsize=9)
    return _save(fig, rows, out, stem)


def layer_effects(a: Analysis, contrast: str, out: Path, stem: str) -> Path:
    """AUROC per layer (mean over heads) with 95 % intervals (questions the unit), one line per aggregation."""
    c = _contrast(a, contrast)
    rows = a.comparisons.query("contrast == @contrast and level == 'layer' and stat in @PROFILE_STATS "
                               "and control == 'none'")
    fig, axes = plt.subplots(1, len(PROFILE_STATS), figsize=(4.2 * len(PROFILE_STATS), 3.6), squeeze=False,
                             layout="constrained")
    for ax, stat in zip(axes[0], PROFILE_STATS):
        for how, cells in rows[rows.stat == stat].groupby("aggregation", sort=False):
            line, = ax.plot(cells.layer, cells.auroc, marker=".", label=how)
            ax.fill_between(cells.layer, cells.auroc_lo, cells.auroc_hi, alpha=0.2, color=line.get_color())
            ax.scatter(cells.layer[cells.significant], cells.auroc[cells.significant], s=30, facecolors="none",
                       edgecolors=line.get_color())
        ax.axhline(0.5, color="gray", lw=0.8)
        ax.set_title(STAT_NAMES[stat], fontsize=9)
        ax.set_xlabel("layer")
        ax.set_ylim(0, 1)
    axes[0][0].set_ylabel(f"AUROC ({c.positive} higher → 1)")
    axes[0][0].legend(fontsize=7, title="aggregation (circle: q < 0.05)", title_fontsize=7)
    fig.suptitle(f"{a.name}: {c.title} — per layer (mean over heads), 95 % CI ({a.intervals.method}, "
                 "questions as the unit)\n"
                 f"n = {c.n_positive} {c.positive} vs {c.n_negative} {c.negative} questions", fontsize=9)
    return _save(fig, rows, out, stem)


def layer_profiles(a: Analysis, out: Path, stem: str) -> Path:
    """Per-layer mean (over answers, of each answer's mean over its tokens and the heads) per label group, with
    95 % intervals over answers."""
    fig, axes = plt.subplots(1, len(PROFILE_STATS), figsize=(4.2 * len(PROFILE_STATS), 3.6), squeeze=False,
                             layout="constrained")
    for ax, stat in zip(axes[0], PROFILE_STATS):
        for group, rows in a.profiles[a.profiles.stat == stat].groupby("group"):
            color = LABEL_COLORS.get(group)
            ax.plot(rows.layer, rows["mean"], color=color, label=f"{group} (n={rows.n.iloc[0]})")
            ax.fill_between(rows.layer, rows.lo, rows.hi, color=color, alpha=0.25)
        ax.set_title(STAT_NAMES[stat], fontsize=9)
        ax.set_xlabel("layer")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{a.name}: per-layer profile by label (answer means, mean over heads; 95 % CI over answers)",
                 fontsize=9)
    return _save(fig, a.profiles, out, stem)


def quadrant(a: Analysis, out: Path, stem: str, max_points: int = 6000, seed: int = 0) -> Path:
    """Entropix-style entropy-varentropy plane per token, of the next-token distribution and of attention (mean
    over layers and heads), coloured by the answer's label; dashed lines at the medians split the quadrants."""
    tok = a.tokens
    table = pd.DataFrame({"question_id": tok.question_id, "pos": tok.pos, "label": tok.label,
                          "logit_entropy": tok.logit_entropy, "logit_varentropy": tok.logit_varentropy,
                          "attn_entropy": a.layer_means["entropy"].mean(axis=1),
                          "attn_varentropy": a.layer_means["varentropy"].mean(axis=1)})
    shown = table.sample(min(max_points, len(table)), random_state=seed)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.4), layout="constrained")
    for ax, kind in zip(axes, ("logit", "attn")):
        x, y = f"{kind}_entropy", f"{kind}_varentropy"
        for label, rows in shown.groupby("label"):
            n_answers = table.question_id[table.label == label].nunique()
            ax.scatter(rows[x], rows[y], s=4, alpha=0.35, color=LABEL_COLORS.get(label),
                       label=f"{label} ({n_answers} answers, {int((table.label == label).sum())} tokens)")
        ax.axvline(table[x].median(), color="gray", ls="--", lw=0.8)
        ax.axhline(table[y].median(), color="gray", ls="--", lw=0.8)
        ax.set_xlabel("entropy (nats)")
        ax.set_ylabel("varentropy (nats²)")
        ax.set_title("next-token distribution" if kind == "logit" else "attention, mean over layers and heads",
                     fontsize=9)
    axes[0].legend(fontsize=7, markerscale=3)
    fig.suptitle(f"{a.name}: entropy vs varentropy per token ({len(shown)} of {len(table)} tokens drawn)",
                 fontsize=9)
    return _save(fig, table, out, stem)


def token_traces(a: Analysis, question_ids: list[str], out: Path, stem: str) -> Path:
    """Per-layer attention entropy (mean over heads) over the tokens of chosen answers; the critic's wrong
    moment is shaded; the line below is the logit entropy."""
    fig, axes = plt.subplots(2 * len(question_ids), 1, figsize=(11, 3.3 * len(question_ids)), squeeze=False,
                             gridspec_kw={"height_ratios": [3, 1.2] * len(question_ids)}, layout="constrained")
    tables = []
    for i, qid in enumerate(question_ids):
        rows = np.flatnonzero(a.tokens.question_id.to_numpy() == qid)
        tok = a.tokens.iloc[rows]
        values = a.layer_means["entropy"][rows]  # [n_tokens, L]
        ax, ax_logit = axes[2 * i][0], axes[2 * i + 1][0]
        image = ax.imshow(values.T, aspect="auto", origin="lower", cmap="viridis", interpolation="nearest")
        fig.colorbar(image, ax=[ax, ax_logit], label="nats", pad=0.01)  # both axes keep the same width
        ax.set_ylabel("layer")
        ax.set_yticks(range(0, len(a.layers), max(1, len(a.layers) // 6)),
                      a.layers[::max(1, len(a.layers) // 6)])
        ax_logit.plot(np.arange(len(tok)), tok.logit_entropy, color="black", lw=1)
        ax_logit.set_ylabel("logit H", fontsize=8)
        ax_logit.set_xlim(-0.5, len(tok) - 0.5)
        if "in_error" in tok and tok.in_error.any():
            span = np.flatnonzero(tok.in_error.to_numpy())
            for axis in (ax, ax_logit):
                axis.axvspan(span[0] - 0.5, span[-1] + 0.5, fc=(1, 0, 0, 0.12), ec="red", lw=2)
        step = max(1, len(tok) // 60)
        ax_logit.set_xticks(range(0, len(tok), step), [t.replace("\n", "⏎") for t in tok.token.iloc[::step]],
                            rotation=90, fontsize=6)
        ax.set_xticks([])
        ax.set_title(f"{qid} — {tok.label.iloc[0]}, {len(tok)} tokens" +
                     (" (red: the critic's wrong moment)" if "in_error" in tok and tok.in_error.any() else ""),
                     fontsize=9)
        tables.append(pd.DataFrame(values, columns=[f"layer_{layer}" for layer in a.layers]).assign(
            question_id=qid, pos=tok.pos.to_numpy(), token=tok.token.to_numpy(),
            logit_entropy=tok.logit_entropy.to_numpy(),
            in_error=tok.in_error.to_numpy() if "in_error" in tok else False))
    fig.suptitle(f"{a.name}: attention entropy per layer (mean over heads) along chosen answers", fontsize=9)
    return _save(fig, pd.concat(tables, ignore_index=True), out, stem)


def trace_heatmaps(a: Analysis, qid: str, out: Path, stem: str) -> Path:
    """One answer: attention entropy and varentropy per layer (mean over heads) x token, and the next-token
    entropy and varentropy along the same tokens (`attentropy trace`)."""
    rows = np.flatnonzero(a.tokens.question_id.to_numpy() == qid)
    tok = a.tokens.iloc[rows]
    n = len(tok)
    fig, axes = plt.subplots(3, 1, figsize=(min(24, 4 + 0.16 * n), 8.5), sharex=True,
                             gridspec_kw={"height_ratios": [3, 3, 1.6]}, layout="constrained")
    table = pd.DataFrame({"pos": tok.pos.to_numpy(), "token": tok.token.to_numpy(),
                          "logit_entropy": tok.logit_entropy.to_numpy(),
                          "logit_varentropy": tok.logit_varentropy.to_numpy()})
    for ax, stat, unit in ((axes[0], "entropy", "nats"), (axes[1], "varentropy", "nats²")):
        values = a.layer_means[stat][rows]  # [n_tokens, L]
        image = ax.imshow(values.T, aspect="auto", origin="lower", cmap="viridis", interpolation="nearest")
        fig.colorbar(image, ax=ax, label=unit, pad=0.01)
        ax.set_ylabel("layer")
        ax.set_yticks(range(0, len(a.layers), max(1, len(a.layers) // 6)), a.layers[::max(1, len(a.layers) // 6)])
        ax.set_title(f"attention {stat} per layer (mean over heads)", fontsize=9)
        table = table.join(pd.DataFrame(values, columns=[f"{stat}_layer_{layer}" for layer in a.layers]))
    ax = axes[2]
    ax.plot(np.arange(n), tok.logit_entropy, color="black", lw=1.2, label="entropy (nats)")
    ax.plot(np.arange(n), tok.logit_varentropy, color="#d95f02", lw=1.2, label="varentropy (nats²)")
    ax.set_title("next-token distribution", fontsize=9)
    ax.legend(fontsize=7, loc="upper right")
    fig.colorbar(image, ax=ax, pad=0.01).remove()  # keeps the x axis aligned with the heatmaps above
    step = max(1, n // 120)
    ax.set_xticks(range(0, n, step), [t.replace("\n", "⏎") for t in tok.token.iloc[::step].astype(str)],
                  rotation=90, fontsize=6)
    ax.set_xlim(-0.5, n - 0.5)
    return _save(fig, table, out, stem)


def distributions(a: Analysis, out: Path, stem: str) -> Path:
    """Distribution of answer-level means per label group (violins; n per group in the tick labels)."""
    columns = [c for c in ("attn_entropy", "attn_entropy_norm", "attn_varentropy", "logit_entropy", "logprob",
                           "n_tokens") if c in a.answers]
    groups = sorted(a.answers.label.unique())
    counts = a.answers.label.value_counts()
    fig, axes = plt.subplots(1, len(columns), figsize=(2.9 * len(columns), 3.6), squeeze=False,
                             layout="constrained")
    for ax, column in zip(axes[0], columns):
        data = [a.answers.loc[a.answers.label == g, column].to_numpy() for g in groups]
        parts = ax.violinplot([d if len(d) > 1 else np.repeat(d, 2) for d in data], showmedians=True)
        for body, g in zip(parts["bodies"], groups):
            body.set_facecolor(LABEL_COLORS.get(g, "gray"))
        ax.set_xticks(range(1, len(groups) + 1), [f"{g}\nn={counts[g]}" for g in groups], fontsize=7)
        name = column.removeprefix("attn_")
        ax.set_title(STAT_NAMES.get(name, column) if column != "n_tokens" else STAT_NAMES["answer_length"],
                     fontsize=8)
    fig.suptitle(f"{a.name}: answer-level means by label (attention: mean over tokens, layers and heads)",
                 fontsize=9)
    return _save(fig, a.answers, out, stem)


# ---------------------------------------------------------------- the instrument (attentropy fit)

METHOD_COLORS = {"instrument": "#d62728", "attention": "#ff9896", "lookback_lens": "#9467bd",
                 "kind_logit": "#8c564b", "length": "#7f7f7f", "shuffled": "#c7c7c7"}


def _method_color(method: str, i: int) -> str:
    return METHOD_COLORS.get(method, plt.get_cmap("tab10")(i % 10))


def roc_curves(predictions: pd.DataFrame, methods: list[str], out: Path, stem: str, title: str) -> Path:
    """Out-of-fold ROC curves of the instrument and chosen baselines on the same answers (positive: correct)."""
    from sklearn.metrics import roc_curve

    lab = predictions[predictions.y >= 0]
    fig, ax = plt.subplots(figsize=(5, 4.6), layout="constrained")
    rows = []
    for i, m in enumerate(methods):
        fpr, tpr, thr = roc_curve(lab.y, lab[f"confidence:{m}"])
        ax.plot(fpr, tpr, color=_method_color(m, i), lw=2.2 if m == "instrument" else 1.2, label=m)
        rows.append(pd.DataFrame({"method": m, "fpr": fpr, "tpr": tpr, "threshold": thr}))
    ax.plot([0, 1], [0, 1], color="gray", lw=0.8, ls="--")
    ax.set_xlabel("false positive rate (incorrect answers called correct)")
    ax.set_ylabel("true positive rate")
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title(title, fontsize=9)
    return _save(fig, pd.concat(rows, ignore_index=True), out, stem)


def reliability(predictions: pd.DataFrame, methods: list[str], out: Path, stem: str, title: str) -> Path:
    """Reliability diagram: fraction correct against mean confidence per bin of out-of-fold confidence; the
    marker's area is the bin's number of answers."""
    from .confidence_metrics import reliability_table

    lab = predictions[predictions.y >= 0]
    fig, ax = plt.subplots(figsize=(5, 4.6), layout="constrained")
    ax.plot([0, 1], [0, 1], color="gray", lw=0.8, ls="--", label="perfect calibration")
    tables = []
    for i, m in enumerate(methods):
        t = reliability_table(lab[f"confidence:{m}"].to_numpy(), lab.y.to_numpy())
        ax.plot(t.mean_confidence, t.fraction_correct, color=_method_color(m, i), marker=".", label=m)
        ax.scatter(t.mean_confidence, t.fraction_correct, s=4 * t.n, color=_method_color(m, i), alpha=0.3)
        tables.append(t.assign(method=m))
    ax.set_xlabel("mean confidence in the bin")
    ax.set_ylabel("fraction correct")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=9)
    return _save(fig, pd.concat(tables, ignore_index=True), out, stem)


def coverage_curves(predictions: pd.DataFrame, methods: list[str], out: Path, stem: str, title: str,
                    operating: pd.DataFrame | None = None) -> Path:
    """Selective answering: SimpleQA's F-score and correct given attempted against coverage (the share of answers
    given) as the abstention threshold sweeps the out-of-fold confidences; crosses: the thresholds chosen on
    training folds, applied to held-out folds."""
    from .selective import coverage_curve

    graded = predictions[predictions.label != "unparsed"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), layout="constrained")
    tables = []
    for i, m in enumerate(methods):
        curve = coverage_curve(graded[f"confidence:{m}"].to_numpy(), graded.label.to_numpy())
        for ax, metric in zip(axes, ("f_score", "correct_given_attempted")):
            ax.plot(curve.coverage, curve[metric], color=_method_color(m, i), label=m)
            if operating is not None and m in set(operating.method):
                point = operating[(operating.method == m)].set_index("metric").value
                ax.plot(point["coverage"], point[metric], marker="x", ms=9, mew=2, color=_method_color(m, i))
        tables.append(curve.assign(method=m))
    for ax, name in zip(axes, ("F-score (SimpleQA's)", "correct given attempted (accuracy of the answers given)")):
        ax.set_xlabel("coverage (share of answers given)")
        ax.set_title(name, fontsize=9)
        ax.set_xlim(0, 1.02)
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    return _save(fig, pd.concat(tables, ignore_index=True), out, stem)


def auroc_bars(rows: pd.DataFrame, methods: list[str], out: Path, stem: str, title: str, group: str = "subset"
               ) -> Path:
    """AUROC with its 95 % interval (questions resampled) per subset (e.g. question kind) and method."""
    subsets = list(dict.fromkeys(rows[group]))
    fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * len(subsets) * max(1, len(methods)) / 2.5), 4.2),
                           layout="constrained")
    width = 0.8 / max(1, len(methods))
    for i, m in enumerate(methods):
        r = rows[rows.method == m].set_index(group).reindex(subsets)
        x = np.arange(len(subsets)) + (i - (len(methods) - 1) / 2) * width
        ax.bar(x, r.value - 0.5, bottom=0.5, width=width, color=_method_color(m, i), label=m)
        ax.errorbar(x, r.value, yerr=[r.value - r.lo, r.hi - r.value], fmt="none", ecolor="black", lw=0.8,
                    capsize=2)
    ax.axhline(0.5, color="gray", lw=0.8)
    labels = [s if group != "subset" or "n_positive" not in rows else s for s in subsets]
    ax.set_xticks(np.arange(len(subsets)), [str(s)[:28] for s in labels], rotation=20, ha="right", fontsize=7)
    ax.set_ylabel("AUROC (95 % CI)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title(title, fontsize=9)
    return _save(fig, rows[rows.method.isin(methods)], out, stem)
