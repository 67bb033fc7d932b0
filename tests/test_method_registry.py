"""One method registry: ``peftkit train --method``, its options and default learning rates come from the tuners."""

import pytest

import peftkit as pk
from peftkit import cli
from peftkit import train as T
from peftkit.train.model import build_peft_config
from peftkit.tuners.base import TUNERS, method_names, tuner_for_method
from peftkit.tuners.lora import LoraTuner


def method_choices() -> list[str]:
    train = next(a for a in cli.build_parser()._actions if a.dest == "verb").choices["train"]
    return list(next(a for a in train._actions if a.dest == "method").choices)


def test_the_command_line_lists_the_registered_methods():
    assert method_names() == ["lora", "ia3", "houlsby", "pfeiffer", "prompt", "prefix", "bitfit"]
    assert method_choices() == method_names()
    assert tuner_for_method("pfeiffer") is tuner_for_method("houlsby") is TUNERS["BOTTLENECK"]
    with pytest.raises(ValueError, match="unknown method 'dora': choose one of lora, ia3, houlsby"):
        tuner_for_method("dora")


@pytest.mark.parametrize("method,task,lr,options", [
    ("lora", "sft", 2e-4, {"r": 8, "alpha": 16, "dropout": 0.05}),
    ("lora", "seq-cls", 5e-4, {"r": 8}),
    ("ia3", "seq-cls", 5e-3, {"r": None, "dropout": None}),
    ("pfeiffer", "text", 1e-3, {"reduction_factor": 16, "dropout": None}),
    ("prefix", "sft", 1e-2, {"num_virtual_tokens": 20}),
])
def test_run_defaults_come_from_the_tuner(method, task, lr, options):
    config = T.TrainConfig(method=method).resolved(task)
    assert config.lr == lr and {k: getattr(config, k) for k in options} == options


def test_a_method_registered_at_run_time_is_a_command_line_method(monkeypatch):
    class RsLoraTuner(LoraTuner):
        peft_type = "RSLORA_TEST"
        cli_names = {"rslora": {"use_rslora": True}}
        default_lr = (1e-3, 2e-3)

    monkeypatch.setitem(TUNERS, RsLoraTuner.peft_type, RsLoraTuner())
    assert method_choices()[-1] == "rslora"
    config = T.TrainConfig(method="rslora", r=4).resolved("seq-cls")
    assert (config.lr, config.alpha) == (2e-3, 16)  # its own learning rate, LoRA's options
    peft_config = build_peft_config(config)
    assert isinstance(peft_config, pk.LoraConfig) and peft_config.use_rslora and peft_config.r == 4
    with pytest.raises(ValueError, match="--num-virtual-tokens does not apply to method 'rslora' .it takes: --r, "):
        build_peft_config(T.TrainConfig(method="rslora", num_virtual_tokens=5).resolved("sft"))
