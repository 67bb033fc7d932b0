"""The run folder: its layout, checkpoints (save / load / list), metrics.jsonl, sample generations and the
end-of-run summary."""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from .. import checkpoint
from ..atomic import replace_folder, write_file
from ..distributed import Distributed

ADAPTER_DIR = "adapter"  # the final adapter inside a run folder
CHECKPOINTS_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.yaml"


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(
    directory: str | os.PathLike, peft_model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any],
    dist: Distributed | None = None,
) -> None:
    """Write a checkpoint folder atomically (:func:`peftkit.atomic.replace_folder`: built under a staging name, then
    swapped into place).

    ``adapter/`` is a usable adapter folder; ``training_state.safetensors`` holds the trainable parameters (by name,
    so every method resumes exactly), the optimizer's state tensors and the torch RNG states (CPU, and each rank's GPU when on CUDA); ``trainer_state.json`` the
    step, the optimizer's hyperparameters, the Python RNG state and ``state``. Nothing is pickled.

    Under torchrun (``dist``), every rank calls this: sharded tensors are gathered whole, each rank's RNG state is
    kept (``rng.torch.rank<r>``), and rank 0 alone writes, so the files do not depend on the strategy.
    """
    dist = dist or Distributed()
    adapters = dist.adapters(peft_model)
    names = list(trainable_parameters(peft_model))
    saved = optimizer.state_dict()
    tensors = dist.full({f"param.{n}": p for n, p in trainable_parameters(peft_model).items()})
    extra_state: dict[str, dict[str, Any]] = {}
    for index, entries in saved["state"].items():
        for key, value in _flatten(entries):  # bitsandbytes nests its 8-bit state in a dict
            if torch.is_tensor(value):
                tensors[f"optimizer.{index}.{key}"] = value
            else:
                extra_state.setdefault(str(index), {})[key] = value
    tensors = dist.full(tensors)
    rng_states = dist.rng_states()
    device = next(iter(trainable_parameters(peft_model).values())).device
    cuda_states = dist.rng_states(device) if device.type == "cuda" else []
    if not dist.is_main:
        return
    tensors["rng.torch"] = rng_states[0]
    if dist.enabled:
        tensors.update({f"rng.torch.rank{r}": s for r, s in enumerate(rng_states)})
    tensors.update({f"rng.cuda.rank{r}": s for r, s in enumerate(cuda_states)})  # GPU dropout masks resume exactly
    python_rng = random.getstate()
    trainer_state = {
        **state,
        "parameter_names": names,
        "optimizer_param_groups": saved["param_groups"],
        "optimizer_extra_state": extra_state,
        "python_rng": [python_rng[0], list(python_rng[1]), python_rng[2]],
    }

    def build(staging: Path) -> None:
        checkpoint.write_adapters(staging / ADAPTER_DIR, adapters)
        write_file(staging / "training_state.safetensors", checkpoint.tensor_bytes(tensors))
        write_file(staging / "trainer_state.json", (json.dumps(trainer_state, indent=2, sort_keys=True) + "\n").encode())

    replace_folder(directory, build)  # the same step saved again after a resume replaces it whole


def _flatten(entries: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """(key, value) pairs of a parameter's optimizer state, nested dicts as ``outer/inner`` keys."""
    pairs: list[tuple[str, Any]] = []
    for key, value in entries.items():
        if isinstance(value, dict):
            pairs += _flatten(value, f"{prefix}{key}/")
        else:
            pairs.append((f"{prefix}{key}", value))
    return pairs


def _unflatten(entries: dict[str, Any], key: str, value: Any) -> None:
    """Put ``value`` back under ``key`` (``outer/inner`` into nested dicts): the inverse of :func:`_flatten`."""
    *outer, last = key.split("/")
    for name in outer:
        entries = entries.setdefault(name, {})
    entries[last] = value


def load_checkpoint(
    directory: str | os.PathLike, peft_model: nn.Module, optimizer: torch.optim.Optimizer, dist: Distributed | None = None
) -> dict[str, Any]:
    """Restore parameters, optimizer and RNG states from ``directory``; returns its ``trainer_state.json``.

    Under torchrun every rank reads the whole files and keeps its own shard (FSDP) and its own RNG state, so a
    checkpoint resumes under either strategy.
    """
    dist = dist or Distributed()
    directory = Path(directory)
    try:
        state = json.loads((directory / "trainer_state.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{directory}: unreadable trainer_state.json ({err})") from None
    tensors = checkpoint.load_tensors(directory / "training_state.safetensors")
    params_saved = {k: v for k, v in tensors.items() if k.startswith("param.")}
    checkpoint.check_weights(params_saved, directory / "training_state.safetensors")  # resume from no NaN
    params = trainable_parameters(peft_model)
    if state["parameter_names"] != list(params):
        raise ValueError(
            f"{directory} was saved for other trainable parameters ({len(state['parameter_names'])} vs {len(params)}): "
            "was the run's model or method changed?"
        )
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(dist.like(tensors[f"param.{name}"], p))
    ordered = [p for group in optimizer.param_groups for p in group["params"]]
    optimizer_state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, entry = key.split(".", 2)
            param = ordered[int(index)]
            if value.shape == param.shape:  # moments are laid out as their parameter; the step count is a scalar
                value = dist.like(value, param)
            _unflatten(optimizer_state.setdefault(int(index), {}), entry, value)
    for index, entries in state["optimizer_extra_state"].items():
        for entry, value in entries.items():
            _unflatten(optimizer_state.setdefault(int(index), {}), entry, value)
    groups = [dict(g, betas=tuple(g["betas"])) if "betas" in g else g for g in state["optimizer_param_groups"]]
    optimizer.load_state_dict({"state": optimizer_state, "param_groups": groups})
    torch.set_rng_state(tensors.get(f"rng.torch.rank{dist.rank}", tensors["rng.torch"]))
    device = next(iter(params.values())).device
    if device.type == "cuda" and f"rng.cuda.rank{dist.rank}" in tensors:  # saved on a GPU: resumed on one
        torch.cuda.set_rng_state(tensors[f"rng.cuda.rank{dist.rank}"], device)
    version, internal, gauss = state["python_rng"]
    random.setstate((version, tuple(internal), gauss))
    return state


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Checkpoint folders of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.exists():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]))


@dataclass
class TrainResult:
    run_dir: Path
    adapter_dir: Path | None
    steps: int
    total_steps: int
    train_loss: float | None
    eval_initial: dict[str, float]
    eval_final: dict[str, float]
    tokens_per_second: float
    train_seconds: float
    trainable_parameters: int
    total_parameters: int
    mode: str
    skipped_rows: dict[str, int] = field(default_factory=dict)  # bad rows skipped, per data file


def check_output_folder(path: str | os.PathLike, flag: str) -> None:
    """Refuse, before any work, a folder that cannot be created: one of its parents is a file, or not writable."""
    path = Path(path)
    for parent in [path, *path.parents]:
        if parent.exists():
            if not parent.is_dir():
                raise NotADirectoryError(f"{flag} {path}: {parent} is a file, not a folder; pick another {flag}")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise PermissionError(f"{flag} {path}: cannot write in {parent}; pick another {flag}")
            return


def default_run_dir(method: str) -> Path:
    return Path("runs") / f"{datetime.now().strftime('%Y%m%d-%H%M%S')}-{method}"


def write_samples(path: str | os.PathLike, before: Sequence[dict[str, str]], after: Sequence[dict[str, str]]) -> None:
    """A markdown file: per held-out prompt, the base model's and the fine-tuned model's answers side by side."""

    def cell(text: str) -> str:
        return text.strip().replace("|", "\\|").replace("\n", "<br>") or "(empty)"

    lines = ["# Sample generations: before and after training", "",
             "Greedy decoding on held-out prompts (never trained on).", ""]
    for i, (b, a) in enumerate(zip(before, after), start=1):
        lines += [f"## Sample {i}", "", "```text", b["prompt"].strip(), "```", "",
                  "| before training (base model) | after training | reference |", "|---|---|---|",
                  f"| {cell(b['output'])} | {cell(a['output'])} | {cell(b['reference'])} |", ""]
    text = "\n".join(lines)
    checkpoint.atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def summary_table(result: TrainResult, metric: str | None = None) -> str:
    """The end-of-run table a person reads."""

    def fmt(scores: dict[str, float], key: str) -> str:
        return f"{scores[key]:.4f}" if key in scores else "-"

    rows = [
        ("run folder", str(result.run_dir)),
        ("steps", f"{result.steps} / {result.total_steps}"),
        ("train time", _duration(result.train_seconds)),
        ("useful tokens/s", f"{result.tokens_per_second:.1f} ({result.mode} batches)"),
        ("trainable params", f"{result.trainable_parameters:,} of {result.total_parameters:,} "
                             f"({100 * result.trainable_parameters / max(result.total_parameters, 1):.3f}%)"),
        ("last train loss", f"{result.train_loss:.4f}" if result.train_loss is not None else "-"),
        ("eval loss", f"{fmt(result.eval_initial, 'loss')} -> {fmt(result.eval_final, 'loss')}"),
    ]
    for key in ("accuracy", "f1", "matthews_corrcoef"):
        if key in result.eval_final:
            mark = "  <- this task's score" if key == metric else ""
            rows.append((key, f"{fmt(result.eval_initial, key)} -> {fmt(result.eval_final, key)}{mark}"))
    rows.append(("adapter", str(result.adapter_dir)))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k.ljust(width)}  {v}" for k, v in rows)


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m {secs:02d}s" if hours else f"{minutes}m {secs:02d}s"
