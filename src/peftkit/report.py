"""Run reports: one self-contained HTML page per run (``runs/<run>/report.html``, written at the end of every run)
or for several runs side by side (``peftkit report RUN [RUN...]``).

The page holds everything inline, with no network: loss and metric curves as SVG drawn here, the before/after
samples, the resolved config, and the adapter's size and parameter count. A few lines of inline script add hover
read-outs to the charts and mark the page ``data-report="ready"`` once they ran, which is how the browser test
knows that scripts ran without error.
"""

from __future__ import annotations

import html
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf")
SCORES = ("accuracy", "f1", "matthews_corrcoef")
REPORT_FILE = "report.html"
SAMPLES_FILE = "samples.json"


@dataclass
class RunData:
    """What a report shows of one run folder."""

    name: str
    config: dict[str, Any]
    metrics: list[dict[str, Any]]
    summary: dict[str, Any]
    samples: list[dict[str, str]] = field(default_factory=list)
    adapter_bytes: int = 0


def read_run(run_dir: str | os.PathLike) -> RunData:
    """Read a run folder's config.yaml, metrics.jsonl, summary.json, samples.json and adapter files."""
    import yaml

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").exists():
        raise FileNotFoundError(f"{run_dir} is not a peftkit run folder: it has no config.yaml")
    metrics_path = run_dir / "metrics.jsonl"
    metrics = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()] if metrics_path.exists() else []
    summary_path, samples_path = run_dir / "summary.json", run_dir / SAMPLES_FILE
    adapter = run_dir / "adapter"
    return RunData(
        name=run_dir.name,
        config=yaml.safe_load((run_dir / "config.yaml").read_text()) or {},
        metrics=metrics,
        summary=json.loads(summary_path.read_text()) if summary_path.exists() else {},
        samples=json.loads(samples_path.read_text())["samples"] if samples_path.exists() else [],
        adapter_bytes=sum(f.stat().st_size for f in adapter.rglob("*") if f.is_file()) if adapter.exists() else 0,
    )


# ------------------------------------------------------------------------------------------------------------ charts


def svg_chart(title: str, series: Sequence[tuple[str, Sequence[tuple[float, float]]]], y_label: str,
              width: int = 520, height: int = 300) -> str:
    """A line chart as inline SVG: one polyline (and dots) per named series of (x, y) points, linear axes with
    five ticks each. Empty series are left out; with no point at all the chart says so."""
    left, right, top, bottom = 58, 12, 28, 42
    points = [p for _, pts in series for p in pts]
    out = [f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" role="img"><title>{html.escape(title)}</title>',
           f'<text x="{width / 2}" y="17" text-anchor="middle" font-weight="bold">{html.escape(title)}</text>']
    if not points:
        out.append(f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle" fill="#888">no data</text></svg>')
        return "".join(out)
    x0, x1 = min(x for x, _ in points), max(x for x, _ in points)
    y0, y1 = min(y for _, y in points), max(y for _, y in points)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    pad = (y1 - y0) * 0.05 or abs(y0) * 0.05 or 1.0
    y0, y1 = y0 - pad, y1 + pad
    inner_w, inner_h = width - left - right, height - top - bottom

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * inner_w

    def sy(y: float) -> float:
        return top + (1 - (y - y0) / (y1 - y0)) * inner_h

    out.append(f'<rect x="{left}" y="{top}" width="{inner_w}" height="{inner_h}" fill="none" stroke="#ccc"/>')
    for i in range(5):
        xv, yv = x0 + (x1 - x0) * i / 4, y0 + (y1 - y0) * i / 4
        if x1 - x0 >= 8:  # steps: whole numbers on the axis
            xv = round(xv)
        out.append(f'<line x1="{left}" x2="{left + inner_w}" y1="{sy(yv):.1f}" y2="{sy(yv):.1f}" stroke="#eee"/>'
                   f'<text x="{left - 4}" y="{sy(yv) + 4:.1f}" text-anchor="end" font-size="11">{yv:.3g}</text>'
                   f'<text x="{sx(xv):.1f}" y="{top + inner_h + 15}" text-anchor="middle" font-size="11">{xv:.4g}</text>')
    out.append(f'<text x="{left + inner_w / 2}" y="{height - 6}" text-anchor="middle" font-size="12">step</text>'
               f'<text x="14" y="{top + inner_h / 2}" text-anchor="middle" font-size="12" '
               f'transform="rotate(-90 14 {top + inner_h / 2})">{html.escape(y_label)}</text>')
    legend_y = top + 14
    for k, (name, pts) in enumerate(s for s in series if s[1]):
        color = COLORS[k % len(COLORS)]
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
        out.append(f'<polyline class="series" data-name="{html.escape(name)}" fill="none" stroke="{color}" '
                   f'stroke-width="1.8" points="{path}"/>')
        if len(pts) <= 40:
            out += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{color}" data-x="{x:g}" data-y="{y:.4g}" '
                    f'data-name="{html.escape(name)}"/>' for x, y in pts]
        out.append(f'<rect x="{left + 8}" y="{legend_y - 9}" width="10" height="10" fill="{color}"/>'
                   f'<text x="{left + 22}" y="{legend_y}" font-size="11">{html.escape(name)}</text>')
        legend_y += 15
    out.append("</svg>")
    return "".join(out)


def _points(metrics: Sequence[dict[str, Any]], kind: str, key: str) -> list[tuple[float, float]]:
    return [(r["step"], r[key]) for r in metrics if r.get("type") == kind and isinstance(r.get(key), (int, float))]


def charts(runs: Sequence[RunData]) -> list[str]:
    """Training loss, evaluation loss and each evaluation score present, one chart each, a series per run."""
    label = (lambda run: run.name) if len(runs) > 1 else (lambda run: "")
    out = [svg_chart("training loss", [(label(r) or "train loss", _points(r.metrics, "train", "loss")) for r in runs], "loss"),
           svg_chart("held-out loss", [(label(r) or "eval loss", _points(r.metrics, "eval", "loss")) for r in runs], "loss")]
    for key in SCORES:
        series = [(label(r) or key, _points(r.metrics, "eval", key)) for r in runs]
        if any(pts for _, pts in series):
            out.append(svg_chart(f"held-out {key}", series, key))
    return out


# -------------------------------------------------------------------------------------------------------------- page


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _size(num_bytes: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if num_bytes < 1024 or unit == "GiB":
            return f"{num_bytes:.1f} {unit}" if unit != "B" else f"{num_bytes} B"
        num_bytes /= 1024
    return ""


def summary_rows(run: RunData) -> list[tuple[str, str]]:
    """The figures a person compares: scores before -> after, steps, time, adapter size and parameters."""
    s = run.summary
    rows = [("method", str(run.config.get("method", "-"))), ("model", str(run.config.get("model", "-"))),
            ("task", str(run.config.get("task", "-"))), ("steps", f"{s.get('steps', '-')} / {s.get('total_steps', '-')}")]
    before, after = s.get("eval_initial") or {}, s.get("eval_final") or {}
    for key in ("loss", *SCORES):
        if key in after:
            rows.append((f"held-out {key}", f"{_fmt(before.get(key, '-'))} &rarr; <b>{_fmt(after[key])}</b>"))
    if "train_seconds" in s:
        rows.append(("train time", f"{s['train_seconds']:.1f} s"))
    if "trainable_parameters" in s:
        rows.append(("trainable parameters", f"{s['trainable_parameters']:,} of {s.get('total_parameters', 0):,}"))
    rows.append(("adapter size", _size(run.adapter_bytes)))
    return rows


def _table(rows: Sequence[tuple[str, str]]) -> str:
    return "<table>" + "".join(f"<tr><th>{html.escape(k)}</th><td>{v}</td></tr>" for k, v in rows) + "</table>"


def _samples(run: RunData) -> str:
    if not run.samples:
        return "<p class='muted'>no sample generations (instruction and chat runs have them)</p>"
    parts = []
    for i, s in enumerate(run.samples, start=1):
        cells = "".join(f"<td><pre>{html.escape(s.get(k, '').strip() or '(empty)')}</pre></td>" for k in ("before", "after", "reference"))
        parts.append(f"<h4>sample {i}</h4><pre class='prompt'>{html.escape(s['prompt'].strip())}</pre>"
                     f"<table class='samples'><tr><th>before training</th><th>after training</th><th>reference</th></tr>"
                     f"<tr>{cells}</tr></table>")
    return "".join(parts)


def _config(run: RunData) -> str:
    import yaml

    return f"<details><summary>resolved config</summary><pre>{html.escape(yaml.safe_dump(run.config, sort_keys=False))}</pre></details>"


STYLE = """body{font-family:system-ui,sans-serif;margin:24px;color:#222}h1{font-size:22px}h2{font-size:18px;margin-top:28px}
table{border-collapse:collapse;margin:8px 0}th,td{border:1px solid #ddd;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f6f6f6}.charts{display:flex;flex-wrap:wrap;gap:12px}.runs{display:flex;gap:24px;flex-wrap:wrap}
.run{flex:1;min-width:380px}pre{white-space:pre-wrap;margin:0;font-size:12px}pre.prompt{background:#f6f6f6;padding:6px}
.muted{color:#888}#tip{position:fixed;background:#333;color:#fff;padding:2px 6px;font-size:12px;display:none}"""

SCRIPT = """(function(){var tip=document.getElementById('tip');var n=0;
document.querySelectorAll('svg.chart circle').forEach(function(c){n++;
c.addEventListener('mouseenter',function(e){tip.textContent=c.dataset.name+' step '+c.dataset.x+': '+c.dataset.y;
tip.style.left=(e.clientX+10)+'px';tip.style.top=(e.clientY+10)+'px';tip.style.display='block';});
c.addEventListener('mouseleave',function(){tip.style.display='none';});});
document.body.dataset.charts=document.querySelectorAll('svg.chart polyline.series').length;
document.body.dataset.points=n;document.body.dataset.report='ready';})();"""


def render_report(runs: Sequence[RunData]) -> str:
    """The HTML page for one run, or several side by side (their curves overlaid on shared charts)."""
    if not runs:
        raise ValueError("a report needs at least one run")
    title = f"peftkit run {runs[0].name}" if len(runs) == 1 else f"peftkit: {len(runs)} runs compared"
    columns = "".join(
        f"<div class='run'><h2>{html.escape(r.name)}</h2>{_table(summary_rows(r))}{_config(r)}"
        f"<h3>samples (greedy, held-out prompts never trained on)</h3>{_samples(r)}</div>" for r in runs)
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{STYLE}</style>"
            f"</head><body><h1>{html.escape(title)}</h1><div class='charts'>{''.join(charts(runs))}</div>"
            f"<div class='runs'>{columns}</div><div id='tip'></div><script>{SCRIPT}</script></body></html>")


def write_report(run_dirs: Sequence[str | os.PathLike], out: str | os.PathLike) -> Path:
    """Write the report of ``run_dirs`` to ``out`` atomically."""
    from .checkpoint import atomic_write

    text = render_report([read_run(d) for d in run_dirs])
    out = Path(out)
    atomic_write(out, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return out
