"""OUT/report.md for `personaplex eval fdb`: the figures beside the released model card's, with plots.

Rebuilt from OUT/results.json after every task, so one OUT folder collects all four tasks. Plots (PNG, beside
the report) need matplotlib (the `eval` extra); without it the report has the tables only and says so.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger("personaplex.eval.report")

# PersonaPlex-7B-v1 model card (released weights); pause handling has a synthetic and a Candor set.
CARD = {
    "pause_handling": {"TOR": 0.358, "TOR (Candor)": 0.431},
    "backchannel": {"TOR": 0.273, "freq": 0.042, "JSD": 0.662},
    "smooth_turn_taking": {"TOR": 0.908, "latency": 0.170},
    "user_interruption": {"TOR": 0.950, "rating": 4.290, "latency": 0.240},
}
BETTER = {"pause_handling": {"TOR": "lower"}, "backchannel": {"TOR": "lower", "freq": "higher", "JSD": "lower"},
          "smooth_turn_taking": {"TOR": "higher", "latency": "lower"},
          "user_interruption": {"TOR": "higher", "rating": "higher", "latency": "lower"}}
ORDER = ("pause_handling", "backchannel", "smooth_turn_taking", "user_interruption")


def _fmt(value) -> str:
    if value is None:
        return "null"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _plots(out: Path, results: dict) -> list[str]:
    """Write the PNGs; returns the markdown lines that show them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = []
    tasks = [t for t in ORDER if t in results]
    keys = [(t, k) for t in tasks for k in CARD[t] if not k.endswith("(Candor)")]
    if keys:
        fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(keys)), 3.5))
        xs = range(len(keys))
        ours = [results[t].get(k) or 0.0 for t, k in keys]
        card = [CARD[t][k] for t, k in keys]
        ax.bar([x - 0.2 for x in xs], ours, width=0.4, label="this run")
        ax.bar([x + 0.2 for x in xs], card, width=0.4, label="model card")
        ax.set_xticks(list(xs), [f"{t.split('_')[0]}\n{k}" for t, k in keys], fontsize=8)
        ax.set_yscale("symlog", linthresh=0.1)
        ax.legend()
        ax.set_title("Full-Duplex-Bench v1.0: this run vs PersonaPlex-7B-v1 card")
        fig.tight_layout()
        fig.savefig(out / "figures.png", dpi=100)
        plt.close(fig)
        lines.append("![figures](figures.png)")
    latencies = {t: [s["latency"] for s in results[t]["samples"].values() if s.get("latency") is not None]
                 for t in ("smooth_turn_taking", "user_interruption") if t in results}
    latencies = {t: v for t, v in latencies.items() if v}
    if latencies:
        fig, axes = plt.subplots(1, len(latencies), figsize=(5 * len(latencies), 3.2), squeeze=False)
        for ax, (task, values) in zip(axes[0], latencies.items()):
            ax.hist(values, bins=min(30, max(5, len(values))), color="tab:blue")
            ax.axvline(CARD[task]["latency"], color="tab:orange", label=f"card {CARD[task]['latency']:.3f} s")
            ax.set_xlabel("latency (s, clipped at 0)")
            ax.set_ylabel("samples")
            ax.set_title(task)
            ax.legend()
        fig.tight_layout()
        fig.savefig(out / "latency.png", dpi=100)
        plt.close(fig)
        lines.append("![latency histograms](latency.png)")
    dist = results.get("backchannel", {}).get("distribution")
    if dist:
        fig, ax = plt.subplots(figsize=(6, 3.2))
        grid = [i / (len(dist["pred"]) - 1) for i in range(len(dist["pred"]))]
        ax.plot(grid, dist["pred"], label="this run (VAD backchannels)")
        ax.plot(grid, dist["gt"], label="ICC ground truth")
        ax.set_xlabel("normalised time in the sample")
        ax.set_ylabel("mean occupancy")
        ax.set_title("backchannel timing distribution")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "backchannel.png", dpi=100)
        plt.close(fig)
        lines.append("![backchannel distribution](backchannel.png)")
    return lines


def write_report(out: Path, results: dict) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    md = ["# Full-Duplex-Bench v1.0 results", "",
          "Scored with Full-Duplex-Bench's rules at commit d7336bd (see docs/evaluation.md). The card column is "
          "the released PersonaPlex-7B-v1 model card; re-measurements of one model vary, so read it as a band.", "",
          "| task | figure | this run | card | better |", "|---|---|---|---|---|"]
    for task in ORDER:
        if task not in results:
            continue
        entry = results[task]
        names = [k for k in ("TOR", "latency", "rating", "freq", "JSD", "JSD_std") if k in entry]
        for key in names:
            card = CARD[task].get(key)
            md.append(f"| {task} | {key} | {_fmt(entry[key])} | {_fmt(card) if card is not None else ''} | "
                      f"{BETTER[task].get(key, '')} |")
        if task == "pause_handling":
            md.append(f"| {task} | TOR (Candor set) | | {CARD[task]['TOR (Candor)']:.3f} | lower |")
    md.append("")
    for task in ORDER:
        if task not in results:
            continue
        entry = results[task]
        settings = entry.get("settings", {})
        md.append(f"## {task}")
        md.append("")
        md.append(f"{entry.get('n', 0)} samples from `{settings.get('root', '?')}`; ASR `{settings.get('asr', '?')}`"
                  f"{' (VAD-gated)' if settings.get('vad_gate') and settings.get('asr') != 'existing' else ''}.")
        for note in entry.get("notes", []):
            md.append(f"- {note}")
        md.append("")
    try:
        lines = _plots(out, results)
    except ImportError:
        lines = ["(no plots: matplotlib is not installed; pip install -e \".[eval]\")"]
    if lines:
        md += ["## Plots", ""] + [line + "\n" for line in lines]
    path = out / "report.md"
    path.write_text("\n".join(md) + "\n", encoding="utf-8")
    return path
