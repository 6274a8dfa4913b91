"""The report's page: its plots (matplotlib, Agg; PNGs embedded as base64) and its HTML, static, no
script but one line that counts the plots the browser decoded (what the browser test reads)."""

from __future__ import annotations

import base64
import html
import io

from selfimprove.report import ACCURACY, BANDED, Run

# (title, [(metric, label)]) per plot; a plot shows what the runs recorded and is left out otherwise
PANELS = [
    (
        "held-out accuracy",
        [
            (ACCURACY, "greedy"),
            ("eval/maj_at_k", "maj@k"),
            ("eval/pass_at_k", "pass@k"),
            ("eval_ema/accuracy", "EMA greedy"),
            ("eval_ema/maj_at_k", "EMA maj@k"),
        ],
    ),
    ("training samples", [("sample/accuracy", "sampled, correct"), ("select/accuracy", "selected, correct")]),
    (
        "self-reward",
        [
            ("select/reward_mean", "reward mean"),
            ("select/agreement", "agreement"),
            ("score/majority", "majority share"),
        ],
    ),
    (
        "label-free model selection (on training prompts, not held out)",
        [("unlabelled/information", "I(prompt; answer), nats"), ("unlabelled/agreement", "agreement")],
    ),
    (
        "diversity",
        [("sample/distinct_answers", "distinct answers per prompt"), ("sample/entropy", "token entropy")],
    ),
    ("KL", [("sample/kl_to_base", "to the base, per sample"), ("pg/kl", "policy gradient's KL")]),
    (
        "seconds per round",
        [
            ("phase_seconds/sample", "sample"),
            ("phase_seconds/verify", "verify"),
            ("phase_seconds/update", "update"),
            ("phase_seconds/evaluate", "evaluate"),
        ],
    ),
    ("memory", [("max_rss_gb", "peak RSS, GB")]),
]


def _png(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode()


def plots(runs: list[Run], summary: dict) -> list[tuple[str, str]]:
    """(title, base64 PNG) per panel with data: one run's metrics as lines; several runs' banded
    metrics as each run's thin line, the mean, and the min-max band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = []
    if len(runs) > 1:
        for metric in BANDED:
            band = summary["per_round"][metric]
            if not band:
                continue
            fig, ax = plt.subplots(figsize=(7, 3.8), layout="constrained")
            for run in runs:
                ax.plot(*run.series(metric), color="grey", alpha=0.35, linewidth=0.8)
            rounds = list(band)
            ax.fill_between(
                rounds,
                [band[r]["min"] for r in rounds],
                [band[r]["max"] for r in rounds],
                alpha=0.25,
                label="min-max across runs",
            )
            ax.plot(rounds, [band[r]["mean"] for r in rounds], marker="o", linewidth=2, label="mean")
            ax.set(xlabel="round", title=f"{metric} ({len(runs)} runs)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
            out.append((metric, _png(fig)))
        return out
    run = runs[0]
    for title, metrics in PANELS:
        lines = [(label, run.series(m)) for m, label in metrics]
        lines = [(label, s) for label, s in lines if s[0]]
        if not lines:
            continue
        fig, ax = plt.subplots(figsize=(7, 3.8), layout="constrained")
        for label, (rounds, values) in lines:
            ax.plot(rounds, values, marker="o", markersize=3, label=label)
        ax.set(xlabel="round", title=title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        out.append((title, _png(fig)))
    return out


def _pct(value) -> str:
    return "—" if value is None else f"{100 * value:.1f}%"


def _points(value) -> str:
    return "—" if value is None else f"{100 * value:+.1f}"


def render(runs: list[Run], summary: dict, found: list[str], samples: list[dict]) -> str:
    esc = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>selfimprove report</title><style>"
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;"
        "font-size:13px;text-align:right}th{background:#f3f3f3}td.l{text-align:left}"
        ".warn{background:#fff4d6;padding:6px 10px;border-left:4px solid #e0a800}.ok{color:#176b2c}"
        ".bad{color:#a11}img{max-width:100%}</style></head><body>",
        f"<h1>selfimprove report: {len(runs)} run{'s' * (len(runs) > 1)}</h1>",
        f"<p>recipes: {esc(', '.join(sorted({r.recipe for r in runs})))}</p>",
    ]
    parts += [f"<p class='warn'>{esc(w)}</p>" for w in found]
    gains = [(key, summary[key]) for key in ("gain", "final_gain", "reported_minus_peak") if key in summary]
    if gains:
        names = {
            "gain": "reported − start",
            "final_gain": "final − start",
            "reported_minus_peak": "reported − peak",
        }
        parts.append(
            "<h2>Over runs (points of held-out greedy accuracy)</h2><table id='aggregate'>"
            "<tr><th>measure</th><th>median</th><th>worst</th><th>best</th><th>runs</th></tr>"
        )
        for key, g in gains:
            parts.append(
                f"<tr><td class='l'>{names[key]}</td><td>{_points(g['median'])}</td>"
                f"<td>{_points(g['worst'])}</td><td>{_points(g['best'])}</td><td>{g['runs']}</td></tr>"
            )
        parts.append("</table>")
    parts.append(
        "<h2>Runs</h2><table id='runs'><tr><th>run</th><th>recipe</th><th>seed</th><th>rounds</th>"
        "<th>start</th><th>peak (round)</th><th>final (round)</th><th>final − peak</th>"
        "<th>reported (round, by)</th><th>gain</th></tr>"
    )
    for run in runs:
        s = run.summary()
        cls = "" if s.get("gain") is None else ("ok" if s["gain"] > 0 else "bad")
        parts.append(
            f"<tr><td class='l'>{esc(run.name)}</td><td class='l'>{esc(run.recipe)}</td><td>{run.seed}</td>"
            f"<td>{max(run.rounds, default=0)}/{run.planned_rounds}</td><td>{_pct(s.get('start'))}</td>"
            f"<td>{_pct(s.get('peak'))} ({s.get('peak_round', '—')})</td>"
            f"<td>{_pct(s.get('final'))} ({s.get('final_round', '—')})</td><td>{_points(s.get('final_minus_peak'))}</td>"
            f"<td>{_pct(s.get('reported'))} ({s.get('reported_round', '—')}, {esc(str(s.get('reported_by', '—')))})</td>"
            f"<td class='{cls}'>{_points(s.get('gain'))}</td></tr>"
        )
    parts.append("</table><h2>Curves</h2>")
    for title, png in plots(runs, summary):
        parts.append(f"<figure><img alt='{esc(title)}' src='data:image/png;base64,{png}'></figure>")
    if samples:
        parts.append(
            "<h2>Samples (first prompts of each round; ✓ correct)</h2><table id='samples'>"
            "<tr><th>round</th><th>prompt</th><th>reference</th><th>completions</th></tr>"
        )
        for row in samples:
            shown = " | ".join(esc(c.strip()[:30]) + (" ✓" if ok else "") for c, ok in row["completions"])
            parts.append(
                f"<tr><td>{row['round']}</td><td class='l'>{esc(row['prompt'])}</td>"
                f"<td>{esc(str(row['target']))}</td><td class='l'>{shown}</td></tr>"
            )
        parts.append("</table>")
    # how many plots the browser decoded, on the page itself (what the test's headless browser reads)
    parts.append(
        "<script>addEventListener('load', () => { document.body.dataset.plotsRendered = "
        "[...document.images].filter(i => i.naturalWidth > 0).length; });</script></body></html>"
    )
    return "\n".join(parts)
