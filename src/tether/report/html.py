"""`tether report RUN_DIR`: PNG plots and one self-contained report.html (images inlined).

It reads what the stages wrote: each stage directory's metrics.jsonl and config.yaml, the
demo's summary.json, and the eval results (eval/*.json with samples). It works on the demo's
directory and on a single run's directory alike.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from tether.config import ReportConfig
from tether.data.prompts import shown_text
from tether.report import plots
from tether.training.metrics import read_metrics


def _stage_dirs(root: Path) -> dict[str, Path]:
    found = {p.name: p for p in sorted(root.iterdir()) if (p / "metrics.jsonl").is_file()}
    if (root / "metrics.jsonl").is_file():
        found[root.name] = root
    return found


def _is_ppo(rows: list[dict]) -> bool:
    return any("objective/kl" in r for r in rows)


def _img(path: Path | None, alt: str) -> str:
    if path is None:
        return ""
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"><figcaption>{html.escape(alt)}</figcaption></figure>'


def _table(rows: list[tuple[str, object]]) -> str:
    def fmt(v: object) -> str:
        return f"{v:.4g}" if isinstance(v, float) else html.escape(str(v))

    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{fmt(v)}</td></tr>" for k, v in rows)
    return f"<table class='kv'>{body}</table>"


def _samples(eval_dir: Path) -> str:
    parts = []
    for path in sorted(eval_dir.glob("*.json")) if eval_dir.is_dir() else []:
        result = json.loads(path.read_text())
        samples = result.get("samples") or []
        if not samples:
            continue
        a, b = result.get("policy_a", "A"), result.get("policy_b", "B")
        head = (f"<tr><th>prompt</th><th>{html.escape(str(a))}</th><th>score</th>"
                f"<th>{html.escape(str(b))}</th><th>score</th></tr>")
        body = "".join(
            f"<tr><td>{html.escape(shown_text(s['prompt']))}</td><td>{html.escape(s['a'])}</td><td>{s['score_a']:.2f}</td>"
            f"<td>{html.escape(s['b'])}</td><td>{s['score_b']:.2f}</td></tr>" for s in samples[:8])
        parts.append(f"<h3>{html.escape(path.stem)}</h3><table class='samples'>{head}{body}</table>")
    return "".join(parts)


def _configs(dirs: dict[str, Path]) -> str:
    parts = []
    for name, d in dirs.items():
        cfg = d / "config.yaml"
        if cfg.is_file():
            parts.append(f"<details><summary>{html.escape(name)}</summary><pre>{html.escape(cfg.read_text())}</pre></details>")
    return "".join(parts)


_CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222}
h1{margin-bottom:0}table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;
padding:4px 8px;text-align:left;vertical-align:top;font-size:13px}table.kv th{background:#f4f4f4}
table.samples td{max-width:330px}figure{margin:1em 0}img{max-width:100%}figcaption{color:#666;
font-size:12px}pre{background:#f7f7f7;padding:8px;font-size:12px;overflow:auto}"""


def build_report(cfg: ReportConfig) -> Path:
    """Write the PNGs and report.html into cfg.run_dir; returns the HTML path."""
    root = Path(cfg.run_dir)
    dirs = _stage_dirs(root)
    metrics = {name: read_metrics(d / "metrics.jsonl") for name, d in dirs.items()}
    ppo = {n: r for n, r in metrics.items() if _is_ppo(r)}
    supervised = {n: r for n, r in metrics.items() if not _is_ppo(r)}
    summary_path = root / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    win_rates = summary.get("win_rates", {})
    figures = [
        (plots.plot_ppo_curves(ppo, root / "ppo_curves.png"), "PPO: reward, KL, beta, length, entropy, clipfrac, explained variance per iteration"),
        (plots.plot_overoptimisation(ppo, root / "overoptimisation.png"), "Proxy (RM) and gold reward as KL grows (Gao et al. 2022): over-optimisation shows as the proxy rising while gold stalls or falls"),
        (plots.plot_win_rates(win_rates, root / "win_rates.png"), "Win rate against SFT on held-out prompts, judged by the gold judge (95% CI)"),
        (plots.plot_losses(supervised, root / "losses.png"), "Train and eval loss of the supervised stages"),
    ]
    scalars = [(k, v) for k, v in summary.items() if isinstance(v, (int, float, str))]
    page = [f"<!doctype html><html><head><meta charset='utf-8'><title>tether report: {html.escape(root.name)}</title>",
            f"<style>{_CSS}</style></head><body><h1>tether report</h1><p>{html.escape(str(root.resolve()))}</p>"]
    if scalars:
        page.append("<h2>Summary</h2>" + _table(scalars))
    iterated = summary.get("iterated")
    if isinstance(iterated, dict):
        page.append("<h2>Iterated RLHF</h2><p>The RM retrained on the last policy's own samples, and "
                    "the beta = 0 stress test against the first RM and against the retrained one "
                    "(gold loss: SFT gold minus the run's gold).</p>"
                    + _table([(k, v) for k, v in iterated.items() if isinstance(v, (int, float, str))]))
    page.append("<h2>Plots</h2>" + "".join(_img(p, alt) for p, alt in figures))
    samples = _samples(root / "eval")
    if samples:
        page.append("<h2>Samples side by side</h2>" + samples)
    page.append("<h2>Configs</h2>" + _configs(dirs) + "</body></html>")
    out = root / "report.html"
    from tether.training.files import atomic_write_text

    atomic_write_text(out, "".join(page))
    print(f"report: {out}")
    return out


def run(cfg: ReportConfig) -> Path:
    return build_report(cfg)


__all__ = ["ReportConfig", "build_report", "run"]
