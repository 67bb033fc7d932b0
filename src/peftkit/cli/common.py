"""Argument parsing and adapter-folder helpers shared by the verbs."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Sequence

EXIT_ERROR, EXIT_INTERRUPTED = 1, 130


def target_modules(text: str) -> list[str] | str:
    """``all-linear``, a regex (when it has regex characters) or a comma-separated list of module names."""
    if text == "all-linear" or any(c in text for c in "*()[]|^$\\+?"):
        return text
    return [t.strip() for t in text.split(",") if t.strip()]


def key_value(text: str) -> tuple[str, Any]:
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip().replace("-", "_"), yaml.safe_load(value)


def model_of(adapters: list) -> str | None:
    from .. import checkpoint

    if not adapters:
        return None
    folder, run_config = adapters[0]
    if run_config is not None:
        return run_config.model
    return checkpoint.read_config(folder).base_model_name_or_path


def adapter_names(paths: Sequence[str]) -> list[str]:
    """Distinct adapter names (letters, digits, _ and -) from the folders' names."""
    import re

    names: list[str] = []
    for path in paths:
        resolved = Path(path).resolve()
        stem = resolved.parent.name if resolved.name == "adapter" else resolved.name
        name = re.sub(r"[^\w\-]", "_", stem) or "adapter"
        candidate, n = name, 2
        while candidate in names:
            candidate, n = f"{name}-{n}", n + 1
        names.append(candidate)
    return names
