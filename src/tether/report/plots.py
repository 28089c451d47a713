"""PNG plots of a run directory's metrics, drawn with matplotlib's Agg backend (no display)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

PPO_PANELS = (
    ("objective/rm_score", "RM score (calibrated)"),
    ("objective/gold_score", "gold score"),
    ("objective/kl", "KL to reference (per sequence)"),
    ("objective/kl_coef", "beta (KL coefficient)"),
    ("response/length", "response length (tokens)"),
    ("objective/entropy", "policy entropy (per token)"),
    ("policy/clipfrac", "policy clip fraction"),
    ("val/explained_var", "critic explained variance"),
)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def series(rows: Sequence[dict], key: str) -> tuple[list[float], list[float]]:
    pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_ppo_curves(runs: dict[str, Sequence[dict]], path: Path) -> Path | None:
    """One panel per PPO metric, one line per run (e.g. default beta and beta = 0)."""
    panels = [(k, t) for k, t in PPO_PANELS if any(series(rows, k)[0] for rows in runs.values())]
    if not panels:
        return None
    plt = _pyplot()
    cols = 4
    fig, axes = plt.subplots((len(panels) + cols - 1) // cols, cols, figsize=(16, 3.4 * ((len(panels) + cols - 1) // cols)),
                             squeeze=False)
    for ax, (key, title) in zip(axes.flat, panels):
        for name, rows in runs.items():
            xs, ys = series(rows, key)
            if xs:
                ax.plot(xs, ys, label=name, linewidth=1.6)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("PPO iteration", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_overoptimisation(runs: dict[str, Sequence[dict]], path: Path) -> Path | None:
    """Proxy (RM) and gold reward against KL: Gao et al.'s over-optimisation curve."""
    usable = {n: r for n, r in runs.items() if series(r, "objective/gold_score")[0]}
    if not usable:
        return None
    plt = _pyplot()
    fig, (ax_rm, ax_gold) = plt.subplots(1, 2, figsize=(12, 4))
    for name, rows in usable.items():
        kl = {r["step"]: r.get("objective/kl") for r in rows}
        for ax, key in ((ax_rm, "objective/rm_score"), (ax_gold, "objective/gold_score")):
            xs, ys = series(rows, key)
            pts = sorted((kl[x], y) for x, y in zip(xs, ys) if isinstance(kl.get(x), (int, float)))
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=12, label=name)
    ax_rm.set_title("proxy reward (RM) vs KL")
    ax_gold.set_title("gold reward (judge) vs KL")
    for ax in (ax_rm, ax_gold):
        ax.set_xlabel("KL(policy || SFT), nats per sequence")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_win_rates(win_rates: dict[str, dict], path: Path) -> Path | None:
    """Bars of win rate against SFT with 95% intervals."""
    if not win_rates:
        return None
    plt = _pyplot()
    names = list(win_rates)
    rates = [win_rates[n]["win_rate"] for n in names]
    err = [[r - win_rates[n]["ci95_low"] for n, r in zip(names, rates)],
           [win_rates[n]["ci95_high"] - r for n, r in zip(names, rates)]]
    fig, ax = plt.subplots(figsize=(1.6 * len(names) + 3, 4))
    ax.bar(names, rates, yerr=err, capsize=6, color="#4c72b0")
    ax.axhline(0.5, color="grey", linestyle="--", linewidth=1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("win rate vs SFT (gold judge)")
    for i, r in enumerate(rates):  # inside the bar, where the interval's whisker never is
        ax.text(i, r / 2, f"{r:.1%}", ha="center", va="center", color="white", fontweight="bold")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_losses(runs: dict[str, Sequence[dict]], path: Path) -> Path | None:
    """Train and eval loss of the supervised stages (pretrain, SFT, RM, DPO)."""
    runs = {n: r for n, r in runs.items() if series(r, "train/loss")[0]}
    if not runs:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(runs), figsize=(4.2 * len(runs), 3.4), squeeze=False)
    for ax, (name, rows) in zip(axes.flat, runs.items()):
        for key, label in (("train/loss", "train"), ("eval/loss", "eval")):
            xs, ys = series(rows, key)
            if xs:
                ax.plot(xs, ys, label=label, marker="o" if label == "eval" else None, markersize=3)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
