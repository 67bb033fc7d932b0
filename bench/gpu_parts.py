"""The three comparisons of the GPU check (bench/gpu_check.py runs each in its own process, under a time cap).

Every model is a random-weight Llama built from a config (no download; speed and memory do not depend on the
weights). Token ids come from the Alpaca sample in ../shared/data as UTF-8 bytes (a byte-level tokenization that
needs no tokenizer file), or are random when that file is absent; the JSON says which.

- ``train``: LoRA r=16 on q_proj/v_proj, bf16 autocast (fp32 on CPU), AdamW lr 2e-4, the same batches and steps.
  HF PEFT trains through transformers' ``Trainer``; a ``TrainerCallback`` runs one peftkit step after each Trainer
  step, so the two alternate step by step (interleaved rounds) on the same GPU. Then both adapters are scored on the
  same held-out batches by the same code.
- ``qlora``: NF4 + double quantization base, LoRA r=16 on q_proj/v_proj: peak ``torch.cuda.max_memory_allocated``
  of each side alone (build + steps, the other side not loaded), then step times in interleaved rounds.
- ``decode``: one decode step of 32 rows (KV cache of 64 tokens) over 32 LoRA adapters, one per row, against the
  base model and against HF PEFT's ``adapter_names``, in interleaved rounds.
"""

from __future__ import annotations

import copy
import gc
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "instruct" / "alpaca_sample_1727.json"
TARGETS = ["q_proj", "v_proj"]


def llama(size: str, device: str, dtype: torch.dtype) -> torch.nn.Module:
    """A random-weight Llama: ``full`` is about 0.89B parameters (hidden 2048, 16 layers, 16 heads, 8 KV heads,
    MLP 5632, vocab 32000); ``tiny`` is for the CPU dry run."""
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=8,
                 intermediate_size=5632, vocab_size=32000) if size == "full" else \
        dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=128, vocab_size=512)  # fmt: skip
    torch.manual_seed(0)
    config = LlamaConfig(**shape, max_position_embeddings=4096, attn_implementation="sdpa", use_cache=False)
    with torch.device(device):  # initialise where it will live (fast on a GPU; nothing is allocated on "meta")
        return LlamaForCausalLM(config).to(dtype=dtype)


def token_batches(vocab: int, batch: int, seq: int, count: int) -> tuple[list[torch.Tensor], str]:
    """``count`` batches of ``batch x seq`` ids: Alpaca bytes when the data file exists, else random ids."""
    if DATA.exists():
        records = json.loads(DATA.read_text())
        text = "\n\n".join(f"{r['instruction']}\n{r.get('input', '')}\n{r['output']}" for r in records)
        ids = torch.tensor(list(text.encode("utf-8")), dtype=torch.long) % vocab
        source = f"{DATA.name} as UTF-8 bytes"
    else:
        ids = torch.randint(0, vocab, (count * batch * seq,), generator=torch.Generator().manual_seed(0))
        source = "random token ids (no data folder)"
    need = count * batch * seq
    if ids.numel() < need:
        ids = ids.repeat(need // ids.numel() + 1)
    chunks = ids[:need].view(count, batch, seq)
    return list(chunks), source


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def autocast(device: str):
    return torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=device.startswith("cuda"))


def held_out_loss(model: torch.nn.Module, batches: list[torch.Tensor], device: str) -> float:
    losses = []
    with torch.no_grad(), autocast(device):
        for x in batches:
            x = x.to(device)
            losses.append(model(input_ids=x, labels=x).loss.float().item())
    return statistics.mean(losses)


def lora_pair(base: torch.nn.Module, r: int = 16):
    """peftkit and HF PEFT LoRA on copies of ``base``, with identical initial adapter weights."""
    import peft

    import peftkit as pk

    torch.manual_seed(0)
    ours = pk.get_peft_model(copy.deepcopy(base), pk.LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS))
    theirs = peft.get_peft_model(base, peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=TARGETS))
    # the same adapter weights, matched by their path inside the layer stack (the wrappers' prefixes differ)
    theirs_params = {n[n.index("layers."):]: p for n, p in theirs.named_parameters() if p.requires_grad}
    ours_params = {n[n.index("layers."):]: p for n, p in ours.named_parameters() if p.requires_grad}
    if set(theirs_params) != set(ours_params):
        raise RuntimeError(f"adapter parameters differ: {sorted(set(theirs_params) ^ set(ours_params))[:4]}")
    with torch.no_grad():
        for name, p in ours_params.items():
            theirs_params[name].copy_(p)
    return ours, theirs


def _train_step(model, optimizer, x, device) -> float:
    sync(device)
    start = time.perf_counter()
    with autocast(device):
        loss = model(input_ids=x, labels=x).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    sync(device)
    return time.perf_counter() - start


def part_train(device: str, size: str, steps: int, batch: int, seq: int) -> dict:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    cuda = device.startswith("cuda")
    base = llama(size, device, torch.bfloat16 if cuda else torch.float32)
    batches, source = token_batches(base.config.vocab_size, batch, seq, steps + 4)
    train, held = batches[:steps], batches[steps:]
    ours, theirs = lora_pair(base)
    ours.train()
    optimizer = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=2e-4)
    ours_times: list[float] = []
    hf_times: list[float] = []

    def our_step(i: int) -> None:
        ours_times.append(_train_step(ours, optimizer, train[i].to(device), device))

    class Alternate(TrainerCallback):  # HF step, then one peftkit step: interleaved rounds
        def on_step_begin(self, *a, **k):
            sync(device)
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k):
            sync(device)
            hf_times.append(time.perf_counter() - self.start)
            our_step(len(ours_times))

    data = [{"input_ids": x[j], "labels": x[j]} for x in train for j in range(batch)]
    scratch = tempfile.mkdtemp(prefix="peftkit-gpu-check-trainer-")  # Trainer wants a folder; nothing is saved
    args = TrainingArguments(output_dir=scratch, per_device_train_batch_size=batch,
                             max_steps=steps, learning_rate=2e-4, lr_scheduler_type="constant", warmup_steps=0,
                             bf16=cuda, use_cpu=not cuda, save_strategy="no", report_to=[], disable_tqdm=True,
                             logging_steps=10**6, seed=0, dataloader_drop_last=True)  # fmt: skip
    class InOrder(Trainer):  # the same batches in the same order as the peftkit side
        def _get_train_sampler(self, *a, **k):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    try:
        InOrder(model=theirs, args=args, train_dataset=data, callbacks=[Alternate()]).train()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    skip = 2 if steps > 4 else 0  # warm-up steps (kernel selection, allocator growth)
    tokens = batch * seq
    ours_s, hf_s = statistics.median(ours_times[skip:]), statistics.median(hf_times[skip:])
    paired = [h / o for o, h in zip(ours_times[skip:], hf_times[skip:])]
    return {"part": "train", "data": source, "steps": steps, "batch": batch, "seq": seq,
            "params": sum(p.numel() for p in base.parameters()),
            "peftkit_tokens_per_s": tokens / ours_s, "hf_tokens_per_s": tokens / hf_s,
            "speedup": statistics.median(paired), "peftkit_step_s": ours_times, "hf_step_s": hf_times,
            "peftkit_held_out_loss": held_out_loss(ours, held, device),
            "hf_held_out_loss": held_out_loss(theirs, held, device)}  # fmt: skip


def _qlora_side(side: str, device: str, size: str, folder: str):
    """One side's QLoRA model and its optimizer; NF4 + double quantization, bf16 compute on CUDA. peftkit quantizes
    the random model in place on the device; HF loads the same weights from ``folder`` with a BitsAndBytesConfig."""
    import peftkit as pk

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    if side == "peftkit":
        from peftkit.quant import quantize_model

        model = quantize_model(llama(size, device, dtype), "nf4", True, compute_dtype=dtype)
        model = pk.prepare_model_for_kbit_training(model, gradient_checkpointing=False)
        torch.manual_seed(0)
        model = pk.get_peft_model(model, pk.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS))
    else:
        import peft
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                    bnb_4bit_compute_dtype=dtype)  # fmt: skip
        model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=config, device_map={"": device}, dtype=dtype)
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        torch.manual_seed(0)
        model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS))
    model.config.use_cache = False
    model.train()
    optimizer = pk.make_optimizer("adamw", model.parameters(), lr=2e-4)
    return model, optimizer


def part_qlora(device: str, size: str, steps: int, batch: int, seq: int) -> dict:
    cuda = device.startswith("cuda")
    batches, source = token_batches(32000 if size == "full" else 512, batch, seq, steps)
    out = {"part": "qlora", "data": source, "steps": steps, "batch": batch, "seq": seq}
    folder = tempfile.mkdtemp(prefix="peftkit-gpu-check-")
    try:
        llama(size, device, torch.bfloat16 if cuda else torch.float32).save_pretrained(folder)
        for side in ("peftkit", "hf"):  # peak memory of training: each side alone, counted from after its build
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
            model, optimizer = _qlora_side(side, device, size, folder)
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
                out[f"{side}_weights_mib"] = torch.cuda.memory_allocated(device) / 2**20
            for x in batches[: min(3, steps)]:
                _train_step(model, optimizer, x.to(device), device)
            out[f"{side}_peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None
            del model, optimizer
        sides = {side: _qlora_side(side, device, size, folder) for side in ("peftkit", "hf")}
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    times: dict[str, list[float]] = {side: [] for side in sides}
    for x in batches:  # interleaved rounds
        for side, (model, optimizer) in sides.items():
            times[side].append(_train_step(model, optimizer, x.to(device), device))
    skip = 1 if steps > 2 else 0
    out["peftkit_step_s"], out["hf_step_s"] = times["peftkit"], times["hf"]
    out["step_time_ratio"] = statistics.median(o / h for o, h in zip(times["peftkit"][skip:], times["hf"][skip:]))
    return out


def _decode_fn(model, prompt: torch.Tensor, device: str, **kw) -> Callable[[], None]:
    from peftkit.hf_compat import cache_arg, find_cache

    with torch.inference_mode():
        cache = find_cache(model(input_ids=prompt, use_cache=True, **kw))
    step = torch.randint(0, 500, (prompt.shape[0], 1), generator=torch.Generator().manual_seed(2)).to(device)

    def run() -> None:
        model(input_ids=step, use_cache=True, **{cache_arg(model): cache}, **kw)
        cache.crop(-1)

    return run


def part_decode(device: str, size: str, rounds: int, adapters: int = 32, rows: int = 32) -> dict:
    import peft

    import peftkit as pk

    cuda = device.startswith("cuda")
    base = llama(size, device, torch.bfloat16 if cuda else torch.float32).eval()
    ours = pk.get_peft_model(copy.deepcopy(base), pk.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS), "a0")
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS), adapter_name="a0")
    for i in range(1, adapters):
        ours.add_adapter(f"a{i}", pk.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
        theirs.add_adapter(f"a{i}", peft.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for model in (ours, theirs):
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_((torch.randn(p.shape, generator=g) * 0.01).to(p.dtype))
    ours.eval(), theirs.eval()
    names = [f"a{i % adapters}" for i in range(rows)]
    prompt = torch.randint(0, 500, (rows, 64), generator=g).to(device)
    fns = {"base": _decode_fn(base, prompt, device), "peftkit": _decode_fn(ours, prompt, device, adapter_names=names),
           "hf": _decode_fn(theirs, prompt, device, adapter_names=names)}  # fmt: skip
    times: dict[str, list[float]] = {k: [] for k in fns}
    with torch.inference_mode():
        for i in range(rounds + 2):
            for name, fn in fns.items():
                sync(device)
                start = time.perf_counter()
                fn()
                sync(device)
                if i >= 2:
                    times[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"part": "decode", "rows": rows, "adapters": adapters, "cache_tokens": 64, "rounds": rounds,
            "median_ms": {k: 1e3 * v for k, v in med.items()},
            "peftkit_over_base": med["peftkit"] / med["base"], "hf_over_base": med["hf"] / med["base"]}  # fmt: skip


def part_plan(device: str, size: str, batch: int, seq: int) -> dict:
    """``peftkit plan`` against this device: LoRA r=16 on q_proj/v_proj over the random Llama in its own dtype (bf16
    on CUDA), AdamW; after a warm-up step, the peak of one training step: ``torch.cuda.max_memory_allocated`` on
    CUDA, torch's CPU allocator events on the CPU (bench/plan_validate.py), against the planner's estimate."""
    import peftkit as pk
    from peftkit.plan import Recipe, make_plan
    from peftkit.plan_shapes import ModelShape
    from plan_validate import profiled_peak, tensor_bytes

    cuda = device.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    base = llama(size, device, dtype)
    c = base.config
    weights_dtype = str(base.dtype).removeprefix("torch.")  # the planner's compute dtype
    shape = ModelShape("gpu-check-llama", c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads,
                       c.intermediate_size, c.vocab_size, head_dim=c.head_dim, tied=bool(c.tie_word_embeddings))  # fmt: skip
    torch.manual_seed(0)
    model = pk.get_peft_model(base, pk.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS)).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-4)
    x = token_batches(c.vocab_size, batch, seq, 1)[0][0].to(device).clone()  # its own storage, not the corpus

    def step() -> None:
        model(input_ids=x, labels=x).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize()
        measured = torch.cuda.max_memory_allocated(device)
    else:
        held = list(model.parameters()) + list(model.buffers()) + [x]
        held += [v for state in optimizer.state.values() for v in state.values()]
        measured = tensor_bytes(held) + profiled_peak(step)
    adapter_dtype = str(params[0].dtype).removeprefix("torch.")
    recipe = Recipe(method="lora", targets=tuple(TARGETS), r=16, batch=batch, seq=seq, dtype=weights_dtype,
                    adapter_dtype=adapter_dtype, device="cuda" if cuda else "cpu")  # fmt: skip
    predicted = make_plan(shape, recipe).peak_bytes
    return {"part": "plan", "batch": batch, "seq": seq, "dtype": recipe.dtype, "adapter_dtype": adapter_dtype,
            "measured_peak_mib": measured / 2**20, "planned_peak_mib": predicted / 2**20,
            "relative_error": predicted / measured - 1}  # fmt: skip
