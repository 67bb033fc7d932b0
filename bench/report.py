"""Writing a benchmark's results: the raw figures (JSON), the table BENCHMARKS.md quotes (Markdown) and its chart."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any, Callable


def write_report(folder: Path, name: str, report: dict[str, Any], table: str, plot: Callable[[Path], None]) -> None:
    """``<folder>/<name>.json``, ``.md`` and ``.png``; the table is printed too."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(report, indent=1))
    (folder / f"{name}.md").write_text(table)
    plot(folder / f"{name}.png")
    print(table)


class FinishedRuns:
    """Each finished run as one line of ``<out>/<benchmark>.partial.jsonl``, so an interrupted benchmark resumes.

    A run is reused only if every argument of its job matches; the file is deleted once the report is written, so a
    fresh invocation measures everything again. A line cut short by a kill is ignored (that run simply reruns).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock = threading.Lock()
        self.results: dict[str, dict] = {}
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    continue
                self.results[entry["job"]] = entry["result"]

    @staticmethod
    def key(job: dict) -> str:
        return json.dumps(job, sort_keys=True)

    def get(self, job: dict) -> dict | None:
        return self.results.get(self.key(job))

    def add(self, job: dict, result: dict) -> None:
        with self.lock, self.path.open("a") as f:
            f.write(json.dumps({"job": self.key(job), "result": result}) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.results[self.key(job)] = result

    def forget(self) -> None:
        self.path.unlink(missing_ok=True)


def panels(count: int, width: float = 6.0, height: float = 4.0):
    """A figure of ``count`` side-by-side panels (matplotlib's Agg backend: no display needed): (figure, axes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, count, figsize=(width * count, height), squeeze=False)
    return fig, list(axes[0])


def save_figure(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
