"""Argument parsing and adapter-folder helpers shared by the verbs."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Sequence


def target_modules(text: str) -> list[str] | str:
    """``all-linear``, a regex (when it has regex characters) or a comma-separated list of module names.

    A regex is compiled here, at parse time, so a typo is a usage error before any model loads."""
    import re

    if text == "all-linear":
        return text
    if any(c in text for c in "*()[]|^$\\+?"):
        try:
            re.compile(text)
        except re.error as err:
            raise argparse.ArgumentTypeError(f"invalid regular expression {text!r}: {err}") from None
        return text
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"no module name in {text!r}: pass names separated by commas, a regex or all-linear")
    return names


def positive_int(text: str) -> int:
    """An integer >= 1 (argparse type)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def label_list(text: str) -> list[str]:
    """``--labels a,b,c``: the label values as written in the data, in class-id order (distinct, at least 2)."""
    labels = [t.strip() for t in text.split(",")]
    if len(labels) < 2 or any(not t for t in labels):
        raise argparse.ArgumentTypeError(f"expected at least 2 non-empty labels separated by commas, got {text!r}")
    if len(set(labels)) != len(labels):
        raise argparse.ArgumentTypeError(f"a label is repeated in {text!r}")
    return labels


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


DEVICE_HELP = ("where to compute: auto (a CUDA GPU when present, under torchrun the process's LOCAL_RANK GPU), cpu, "
               "cuda or cuda:N (default auto)")
DTYPE_HELP = ("compute precision: auto (bf16 autocast on a GPU that has it, and on a CPU only where a measured probe "
              "finds bf16 matmul faster; else float32), float32, bfloat16, or float16 (GPU inference only); weights "
              "stay float32 (default auto)")


def add_device_options(parser: argparse.ArgumentParser, dtype_help: str = DTYPE_HELP, suppress: bool = False) -> None:
    """``--device`` and ``--dtype`` in a "hardware" group (``suppress``: no default, for config-file verbs)."""
    g = parser.add_argument_group("hardware")
    defaults = {} if suppress else {"default": "auto"}
    g.add_argument("--device", metavar="auto|cpu|cuda|cuda:N", help=DEVICE_HELP, **defaults)
    g.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], help=dtype_help, **defaults)


def resolve_hardware(args: argparse.Namespace, verb: str) -> tuple[Any, Any]:
    """(device, precision) from ``--device`` / ``--dtype``, with the choice and its reason printed to stderr."""
    import sys

    from ..device import resolve_device, resolve_precision

    device = resolve_device(args.device)
    precision = resolve_precision(args.dtype, device, serving=verb == "serve")
    print(f"peftkit {verb} runs on {device}, {precision.describe()}", file=sys.stderr)  # not "VERB:": errors start so
    return device, precision
