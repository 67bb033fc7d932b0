"""Using a trained adapter: find it in a run folder, tell its task, and score it on data (``peftkit eval``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .. import checkpoint
from ..atomic import recover
from ..device import resolve_device, resolve_precision
from ..errors import SettingsError
from ..families import classifier_weight_suffixes
from .config import TrainConfig, read_settings_file
from .model import load_base_model
from .run_folder import ADAPTER_DIR, CONFIG_FILE
from .task_data import TaskData, load_eval_data, load_task_data, resolve_config
from .tasks import make_task

def find_adapter(path: str | os.PathLike) -> tuple[Path, TrainConfig | None]:
    """(adapter folder, the run's config if ``path`` is, or is inside, a run folder) for an adapter or run folder."""
    path = Path(path)
    for folder in (path, path / ADAPTER_DIR):
        recover(folder)  # a save killed between its two renames left the folder under a staging name
    if (path / checkpoint.CONFIG_NAME).exists():
        run = path.parent if (path.parent / CONFIG_FILE).exists() else None
        adapter = path
    elif (path / ADAPTER_DIR / checkpoint.CONFIG_NAME).exists():
        run, adapter = path, path / ADAPTER_DIR
    else:
        raise FileNotFoundError(f"{path} is neither an adapter folder (adapter_config.json) nor a peftkit run folder")
    if run is None:
        return adapter, None
    return adapter, TrainConfig.from_dict(read_settings_file(run / CONFIG_FILE, "the run's"), source=str(run / CONFIG_FILE))


def adapter_task(adapter_dir: str | os.PathLike) -> tuple[str | None, int | None]:
    """("seq-cls" or None, number of classes) from an adapter folder's task type and classifier weights."""
    config = checkpoint.read_config(adapter_dir)
    if config.task_type != "SEQ_CLS":
        return None, None
    suffixes = classifier_weight_suffixes()
    for key, shape in checkpoint.tensor_shapes(Path(adapter_dir) / checkpoint.WEIGHTS_NAME).items():
        if key.endswith(suffixes):
            return "seq-cls", shape[0]
    return "seq-cls", None


def evaluate_adapter(
    adapter: str | os.PathLike | None = None,
    data: str | None = None,
    model: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> tuple[dict[str, float], TrainConfig, TaskData]:
    """Metrics of ``model`` (+ ``adapter``, an adapter or run folder) on ``data`` (``peftkit eval``).

    With a run folder and no ``data``, the run's own evaluation split is used (the held-out slice it never trained
    on, or the GLUE dev split). The model defaults to the run's, else the adapter's base model. ``overrides``
    ``device`` and ``dtype`` say where and how to compute (default auto, not the run's).
    """
    from ..peft_model import PeftModel

    adapter_dir, run_config = find_adapter(adapter) if adapter is not None else (None, None)
    task, num_labels = adapter_task(adapter_dir) if adapter_dir is not None else (None, None)
    settings: dict[str, Any] = run_config.to_dict() if run_config is not None else {}
    for name in ("out", "device", "dtype"):  # where the run trained says nothing about where it is evaluated
        settings.pop(name, None)
    if model is not None:
        settings["model"] = model
    elif "model" not in settings and adapter_dir is not None:
        base = checkpoint.read_config(adapter_dir).base_model_name_or_path
        if base:
            settings["model"] = base
    if task:
        settings["task"] = task
    settings.update(overrides or {})
    if data is not None:
        settings["data"] = data
    config = resolve_config(TrainConfig.from_dict(settings))
    device = resolve_device(config.device)
    precision = resolve_precision(config.dtype, device)
    held_out = data is None and run_config is not None
    if config.task == "seq-cls":
        if num_labels is not None and config.labels is not None and len(config.labels) != num_labels:
            raise SettingsError(f"{adapter_dir} classifies into {num_labels} classes, but the labels are "
                                f"{','.join(config.labels)}: pass --labels with {num_labels} values in class-id order")
        evaluation = load_task_data(config, None) if held_out else load_eval_data(config, None, num_labels)
        if num_labels is not None and len(evaluation.file_labels) != num_labels:
            raise SettingsError(f"{adapter_dir} classifies into {num_labels} classes, but the labels are "
                                f"{','.join(evaluation.file_labels)}: pass --labels with {num_labels} values in class-id order")
        base, tokenizer = load_base_model(config, num_labels=num_labels or len(evaluation.label_names), device=device)
    else:
        base, tokenizer = load_base_model(config, device=device)
        evaluation = load_task_data(config, tokenizer) if held_out else load_eval_data(config, tokenizer)
    network = PeftModel.from_pretrained(base, adapter_dir) if adapter_dir is not None else base
    network.eval()
    scores = make_task(network, tokenizer, config, device, precision).evaluate(evaluation.eval, config.eval_batch_size)
    return scores, config, evaluation
