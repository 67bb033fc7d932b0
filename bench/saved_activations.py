"""Where training memory goes per method: bytes autograd keeps for the backward pass, against optimizer-side state.

Explains the peak-RSS column of ``methods_glue.py``, where LoRA on all linear layers peaks as high as full
fine-tuning on MiniLM-L6. One training forward of a batch of 32 x 128 tokens per variant; the tensors autograd
saves are counted once per storage (a tensor saved by two ops costs once; weights not at all), through
``torch.autograd.graph.saved_tensors_hooks``. "Trainable state" is what full-precision AdamW adds per trainable
parameter: a gradient and two moments, 12 bytes.

    python bench/saved_activations.py
"""

from __future__ import annotations

import os

import torch
from torch.autograd.graph import saved_tensors_hooks

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import peftkit as pk  # noqa: E402

VARIANTS = {
    "full fine-tuning": None,
    "LoRA all linear, dropout 0.1": dict(target_modules="all-linear", lora_dropout=0.1),
    "LoRA all linear, dropout 0.0": dict(target_modules="all-linear", lora_dropout=0.0),
    "LoRA q,v, dropout 0.1": dict(target_modules=["query", "value"], lora_dropout=0.1),
}


def saved_mib(model: torch.nn.Module, input_ids: torch.Tensor) -> float:
    """MiB of distinct storages autograd saves in one training forward, the model's own weights excluded (they are
    held anyway); then runs backward to check the graph is usable."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in weights:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    model.train()
    with saved_tensors_hooks(pack, lambda t: t):
        out = model(input_ids=input_ids, labels=torch.zeros(input_ids.shape[0], dtype=torch.long))
    out.loss.backward()
    return sum(storages.values()) / 2**20


def main() -> None:
    torch.manual_seed(0)
    input_ids = torch.randint(1000, 20000, (32, 128))
    print("| variant | saved for backward (MiB) | trainable state, 12 B/param (MiB) | sum (MiB) |\n|---|---|---|---|")
    for name, lora in VARIANTS.items():
        model, _ = pk.load_model("minilm-l6", task="seq-cls", num_labels=2)
        if lora is None:
            model.requires_grad_(True)
        else:
            model = pk.get_peft_model(model, pk.LoraConfig(r=8, lora_alpha=16, task_type="SEQ_CLS", **lora))
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        saved, state = saved_mib(model, input_ids), trainable * 12 / 2**20
        print(f"| {name} | {saved:.0f} | {state:.0f} | {saved + state:.0f} |")


if __name__ == "__main__":
    main()
