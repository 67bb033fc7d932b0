"""Writing a benchmark's results: the raw figures (JSON), the table BENCHMARKS.md quotes (Markdown) and its chart."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable


def write_report(folder: Path, name: str, report: dict[str, Any], table: str, plot: Callable[[Path], None]) -> None:
    """``<folder>/<name>.json``, ``.md`` and ``.png``; the table is printed too."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(report, indent=1))
    (folder / f"{name}.md").write_text(table)
    plot(folder / f"{name}.png")
    print(table)
