"""How the verifier report is shown: its Markdown page and its two plots (matplotlib, Agg: no display
needed), best-of-N accuracy against N and the reliability diagram of each probability-valued scorer."""

from __future__ import annotations

import math
import os
from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    """Written to a temporary file and renamed into place: a reader never sees half a PNG."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    os.replace(tmp, path)
    return path


def plot_best_of_n(report: dict, path: Path) -> Path:
    """Best-of-k accuracy for each scorer against k, with random (flat), maj@k and pass@k for scale."""
    plt = _pyplot()
    curves = report["curves"]
    ks = curves["k"]
    fig, ax = plt.subplots(figsize=(7, 4.5), layout="constrained")
    ax.plot(ks, curves["pass"], "k--", marker="^", label="pass@k")
    ax.plot(ks, curves["majority"], "k:", marker="s", label="majority vote")
    ax.plot(ks, curves["random"], color="grey", linestyle="-.", label="random sample")
    for s in report["scorers"]:
        ax.plot(ks, s["best_of_k"], marker="o", label=s["name"])
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("N (samples per prompt)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(
        f"best-of-N by each verifier ({report['n_prompts']} prompts; task {report['task']})", fontsize=9
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)


def plot_reliability(report: dict, path: Path) -> Path | None:
    """One reliability diagram per probability-valued scorer (accuracy against mean P per bin, the
    diagonal being perfect calibration, bar widths the bins); None, and no file, when there is none."""
    probs = [s for s in report["scorers"] if s["reliability"] is not None]
    if not probs:
        path.unlink(missing_ok=True)  # a diagram from an earlier report would describe other scorers
        return None
    plt = _pyplot()
    cols = min(len(probs), 3)
    rows = -(-len(probs) // cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(3.6 * cols, 3.6 * rows), squeeze=False, layout="constrained"
    )
    for ax in axes.flat[len(probs) :]:
        ax.set_visible(False)
    for ax, s in zip(axes.flat, probs):
        bins = [b for b in s["reliability"] if b["count"]]
        ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1)
        ax.bar(
            [(b["lo"] + b["hi"]) / 2 for b in bins],
            [b["accuracy"] for b in bins],
            width=[b["hi"] - b["lo"] for b in bins],
            alpha=0.35,
            edgecolor="C0",
        )
        ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], "o-", color="C0")
        for b in bins:
            ax.annotate(
                str(b["count"]),
                ((b["lo"] + b["hi"]) / 2, b["accuracy"]),
                fontsize=6,
                ha="center",
                va="bottom",
            )
        ece = "–" if s["ece"] is None else f"{s['ece']:.3f}"
        ax.set_title(f"{s['name']} (ECE {ece})", fontsize=9)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.05)
        ax.set_xlabel("P (mean in bin)")
        ax.set_ylabel("fraction correct")
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)


def _fmt(value: float | None, spec: str = ".3f") -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def markdown(report: dict) -> str:
    """The report as a page: what produced it, the reference numbers, one row per scorer, the plots."""
    ref, n = report["reference"], report["n"]
    lines = [
        "# Verifier report",
        "",
        f"    {report['command']}",
        "",
        f"- model: {report['model']}; weights: "
        + (
            f"{report['run_dir']}'s newest checkpoint ({report['weights']})"
            if report["run_dir"]
            else "the model's own (no run)"
        ),
        f"- task: {report['task']}, split {report['split']}: {report['n_prompts']} prompts × {n} samples "
        f"= {report['n_samples']} samples",
        f"- the same for every scorer: random sample (mean sample accuracy) {_fmt(ref['random'])}, "
        f"majority vote (maj@{n}) {_fmt(ref['majority'])}, pass@{n} {_fmt(ref['pass_at_n'])}; sampling "
        f"{_fmt(ref['sampling_s_per_1000'], '.3g')} s per 1000 samples",
        f"- prompts with both correct and wrong samples (the only ones within-prompt AUROC and best-of-N can "
        f"tell apart): {ref['prompts_with_both']} of {report['n_prompts']}",
    ]
    if report["skipped"]:
        lines.append("- not run: " + "; ".join(f"{k} ({v})" for k, v in report["skipped"].items()))
    lines += [
        "",
        f"| scorer | AUROC pooled | AUROC within | BoN acc (N={n}) | ECE | s/1000 |",
        "|---|---:|---:|---:|---:|---:|",
        f"| *random sample* | | | {_fmt(ref['random'])} | | |",
        f"| *majority vote* | | | {_fmt(ref['majority'])} | | |",
        f"| *pass@{n}* | | | {_fmt(ref['pass_at_n'])} | | |",
        f"| *sampling* | | | | | {_fmt(ref['sampling_s_per_1000'], '.3g')} |",
    ]
    for s in report["scorers"]:
        label = s["name"] + (" (uses labels)" if s["uses_labels"] else "")
        lines.append(
            f"| {label} | {_fmt(s['auroc_pooled'])} | {_fmt(s['auroc_within'])} | {_fmt(s['best_of_n'])} "
            f"| {_fmt(s['ece'])} | {_fmt(s['s_per_1000'], '.3g')} |"
        )
    notes = [f"- {s['name']}: {s['note']}" for s in report["scorers"] if s["note"]]
    lines += ["", *notes, *([""] if notes else []), "![best-of-N against N](best_of_n.png)", ""]
    if report["files"].get("reliability"):
        lines += ["![reliability of P(True)](reliability.png)", ""]
    else:
        why = (
            "no probability-valued scorer gave scores in [0, 1]"
            if any(s["probability"] for s in report["scorers"])
            else "no probability-valued scorer was run (P(True): `ptrue*`, or one with `probability = True`)"
        )
        lines += [f"No reliability diagram and no ECE: {why}.", ""]
    bins, draws = report["ece_bins"], report["curves"]["majority_draws"]
    lines += [
        "AUROC pooled: P(a correct sample scores above a wrong one) over all samples; AUROC within: the same "
        "over pairs of one prompt's samples only (Mann-Whitney U summed over prompts / Σ n_correct·n_wrong,"
        " ties ½; – when no prompt has both). BoN acc: per prompt the top-scored sample (ties to the lowest"
        f" sample_idx). ECE: |accuracy − mean P| over {bins} equal bins, weighted by count. s/1000: seconds "
        "per 1000 samples, each scorer timed on its own after sampling. Curves: best-of-k is the exact "
        "expectation over random k-subsets of the N samples, pass@k the unbiased estimate, maj@k the mean "
        f"over all k-subsets, or over {draws} seeded random ones when there are more.",
        "",
    ]
    return "\n".join(lines)
