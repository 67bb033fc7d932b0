"""The models of a run: the frozen base model and the method's adapter config, from a :class:`TrainConfig`."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

import torch
from torch import nn

from ..tuners.base import tuner_for_method
from ..errors import SettingsError
from .config import METHOD_OPTIONS, TrainConfig, fits_type, type_name


def build_peft_config(config: TrainConfig) -> Any:
    """The method's config from the run settings: the fields its ``--method`` name fixes, its options, task type.
    Targets left unset get the model family's defaults when the adapter is added (:mod:`peftkit.families`)."""
    tuner = tuner_for_method(config.method)
    cls = tuner.config_cls
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = dict(tuner.cli_names[config.method])
    for option in METHOD_OPTIONS:
        value = getattr(config, option)
        if value is None:
            continue
        if option not in tuner.cli_options:
            raise ValueError(
                f"--{option.replace('_', '-')} does not apply to method {config.method!r} "
                f"(it takes: {', '.join('--' + o.replace('_', '-') for o in tuner.cli_options) or 'no extra options'})"
            )
        kwargs[tuner.cli_options[option].field] = value
    if config.target_modules is not None:
        kwargs["target_modules"] = config.target_modules
    kwargs.update(config.method_options)
    unknown = sorted(set(kwargs) - fields)
    if unknown:
        raise ValueError(f"{cls.__name__} has no field(s) {unknown}; its fields: {', '.join(sorted(fields))}")
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # noqa: BLE001 - a hint that does not resolve: the config's own checks still run
        hints = {}
    for name, value in kwargs.items():
        if name in hints and not fits_type(value, hints[name]):
            raise SettingsError(f"{cls.__name__}.{name} must be {type_name(hints[name])}, got {value!r}: fix "
                                f"--method-option {name}=... (or the matching flag)")
    kwargs["task_type"] = "SEQ_CLS" if config.task == "seq-cls" else "CAUSAL_LM"
    return cls(**kwargs)


def load_base_model(
    config: TrainConfig, num_labels: int | None = None, device: torch.device | None = None
) -> tuple[nn.Module, Any]:
    """The frozen base model for ``config.task`` (4-bit when ``config.quantization`` is set), on ``device``."""
    from ..models import load_model

    task = "seq-cls" if config.task == "seq-cls" else "causal-lm"
    kwargs: dict[str, Any] = {}
    if config.quantization:
        kwargs["quantization"] = config.quantization
        kwargs["double_quant"] = config.double_quant
    try:
        model, tokenizer = load_model(config.model, task=task, num_labels=num_labels, device=device, **kwargs)
    except TypeError as err:
        if config.quantization and "quantization" in str(err):
            raise ValueError(f"--quantization {config.quantization}: this peftkit's load_model has no 4-bit path") from None
        raise
    from ..data import set_chat_template

    set_chat_template(tokenizer, config.chat_template)
    if config.quantization:
        from ..kbit_training import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, gradient_checkpointing=config.gradient_checkpointing)
    elif config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, tokenizer
