"""The evaluation report: one Markdown file with a metrics table and PNG plots embedded as data URIs.

The same single file renders in the Kubeflow UI (Markdown artifact) and as an MLflow artifact. The KFP UI's
Markdown viewer (markdown-to-jsx) allows `data:image` URLs and shows the first 400,000 characters; the plots
are small fixed-size PNGs (the scatter samples at most 5,000 points), so a report stays far below that
(about 60 kB) whatever the eval set's size.

`metric_table` is the one base | tuned | delta table: evaluate's report, the registered version's description
and the demo's printout all use it.
"""

from __future__ import annotations

import base64
import io

import numpy as np

from embedtune.data import is_number


def metric_table(metrics: dict, base: dict | None = None, primary: str = "", style: str = "markdown") -> str:
    """Rows of `metric | base | tuned | delta` (`base` omitted when None); `primary` is marked.

    `style="markdown"`: a GitHub table (the report, the MLflow version description); `"text"`: aligned plain
    columns for a terminal. A metric missing from `base` leaves its base and delta cells empty.
    """
    has_base = bool(base)
    rows = []
    for name, value in metrics.items():
        b = (base or {}).get(name)
        cells = [
            f"{b:.4f}" if b is not None else "",
            f"{value:.4f}",
            f"{value - b:+.4f}" if b is not None else "",
        ]
        rows.append((name, cells if has_base else cells[1:2]))
    heads = ["base", "tuned", "delta"] if has_base else ["tuned"]
    if style == "text":
        lines = [f"{'metric':<24}" + "".join(f"{h:>10}" for h in heads)]
        lines += [
            f"{n + (' *' if n == primary else ''):<24}" + "".join(f"{c:>10}" for c in cells)
            for n, cells in rows
        ]
        return "\n".join(lines)
    lines = ["| metric | " + " | ".join(heads) + " |", "|---|" + "---:|" * len(heads)]
    lines += [f"| {f'**{n}**' if n == primary else n} | " + " | ".join(cells) + " |" for n, cells in rows]
    return "\n".join(lines)


def scalars(result: dict, prefix: str = "") -> dict[str, float]:
    """The top-level numbers of a step's result (bools excluded): what the components log as KFP metrics."""
    return {f"{prefix}{k}": float(v) for k, v in result.items() if is_number(v)}


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _score_figure(plots: list[tuple[str, dict]]):
    """One panel per model: positives vs negatives histogram (ranking) or predicted vs gold scatter (sts)."""
    from matplotlib.figure import Figure  # object API + Agg canvas: no global pyplot state, no display

    fig = Figure(figsize=(5 * len(plots), 3.6))
    bins = np.histogram_bin_edges(np.concatenate([p["scores"] for _, p in plots]), bins=40)  # shared x axis
    for k, (title, p) in enumerate(plots, 1):
        ax = fig.add_subplot(1, len(plots), k)
        if "relevant" in p:
            neg = "negatives" + (f" ({p['negatives']})" if p.get("negatives") else "")
            ax.hist(p["scores"][~p["relevant"]], bins=bins, alpha=0.6, density=True, label=neg)
            ax.hist(p["scores"][p["relevant"]], bins=bins, alpha=0.6, density=True, label="positives")
            ax.set_xlabel(p["label"])
            ax.set_ylabel("density")
            ax.legend()
        else:
            keep = np.random.default_rng(0).permutation(len(p["scores"]))[:5000]  # a readable, small PNG
            ax.scatter(p["labels"][keep], p["scores"][keep], s=6, alpha=0.4)
            ax.set_xlabel("gold label")
            ax.set_ylabel(f"predicted {p['label']}")
        ax.set_title(title)
    return fig


def _bar_figure(metrics: dict, base: dict | None):
    from matplotlib.figure import Figure

    names = list(metrics)
    x = np.arange(len(names))
    fig = Figure(figsize=(max(6, 0.9 * len(names)), 3.6))
    ax = fig.add_subplot(1, 1, 1)
    width = 0.4 if base else 0.6
    if base:
        ax.bar(x - width / 2, [base[n] for n in names], width, label="base")
    ax.bar(x + (width / 2 if base else 0), [metrics[n] for n in names], width, label="tuned")
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=30, ha="right")
    ax.axhline(0, color="black", linewidth=0.5)
    ax.legend()
    ax.set_title("base vs tuned" if base else "tuned")
    return fig


def full_width(metrics: dict) -> dict:
    """The metrics without the Matryoshka `<name>_dim<d>` copies (the bar chart shows the full width)."""
    return {k: v for k, v in metrics.items() if "_dim" not in k}


def overlap_text(overlap: dict) -> str:
    """One sentence on eval texts found in the model's training data (`overlap.fingerprint_overlap`)."""
    how = "" if overlap["exact"] else f" (estimated from {overlap['compared']} comparable texts)"
    return (
        f"{overlap['found']} of {overlap['compared']} eval queries/positives checked were training texts of this "
        f"model ({overlap['fraction']:.1%}){how}: metrics on them measure memory, not generalization"
    )


def guard_table(guards: dict, failed: list, max_drop: float) -> str:
    """Markdown: one row per guard set (base | tuned | delta of its primary metric, and whether it held)."""
    rows = [
        "## guard sets",
        "",
        "| set | data | metric | base | tuned | delta | |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, g in guards.items():
        base = f"{g['baseline_value']:.4f}" if "baseline_value" in g else ""
        delta = f"{g['delta']:+.4f}" if "delta" in g else ""
        status = "**dropped**" if name in failed else ("held" if max_drop >= 0 else "")
        rows.append(
            f"| {name} | {g['data_shape']} | {g['primary_metric']} | {base} | {g['value']:.4f} | {delta} | {status} |"
        )
    return "\n".join(rows)


def render_report(result: dict, plot: dict, base_plot: dict | None) -> str:
    """Markdown: headline, metrics table (base | tuned | delta), plots as embedded PNGs."""
    metrics, base = result["metrics"], result.get("baseline_metrics")
    primary = result["primary_metric"]
    lines = [
        f"# Evaluation of `{result['model']}`",
        "",
        f"- eval data: `{result['eval_data']}` ({result['data_shape']}): {result['n_rows']} rows, "
        f"{result['n_queries']} queries"
        + (f" x a corpus of {result['n_docs']} documents" if result["data_shape"] == "retrieval" else "")
        + f", {result['n_pairs']} scored pairs"
        + (
            f", {result['n_queries_skipped']} queries without negatives skipped"
            if result["n_queries_skipped"]
            else ""
        ),
        f"- primary metric: **{primary} = {metrics[primary]:.4f}**"
        + (f" (base {base[primary]:.4f}, delta {metrics[primary] - base[primary]:+.4f})" if base else ""),
    ]
    if base:
        lines.append(f"- baseline: `{result['baseline_model']}`")
    overlap = result.get("train_overlap")
    if overlap and overlap["found"]:
        lines.append(f"- **warning: {overlap_text(overlap)}**")
    lines += ["", metric_table(metrics, base, primary)]
    if result.get("guards"):
        lines += [
            "",
            guard_table(result["guards"], result.get("guard_failures") or [], result["max_guard_drop"]),
        ]
    panels = ([("base", base_plot)] if base_plot else []) + [("tuned", plot)]
    kind = "score distribution, positives vs negatives" if "relevant" in plot else "predicted vs gold"
    lines += ["", f"## {kind}", "", f"![{kind}](data:image/png;base64,{_png(_score_figure(panels))})"]
    lines += [
        "",
        "## metrics",
        "",
        f"![metrics](data:image/png;base64,{_png(_bar_figure(full_width(metrics), base))})",
        "",
    ]
    return "\n".join(lines)
