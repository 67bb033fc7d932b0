"""The compiled CPU kernel for mixed LoRA rows (peftkit.kernels): the formula computed by hand, the model-level
path against the pure-PyTorch gather it replaces, and the fallback when it cannot be built."""

import os
import subprocess
import sys

import pytest
import torch
from conftest import tiny_llama
from test_lora import X, assert_mixed_equals_solo, logits, randomize_b
from test_serve_fused import _apart_and_fused, _registry

import peftkit as pk
from peftkit import kernels

pytestmark = pytest.mark.skipif(kernels.lora_rows() is None, reason=f"this machine cannot build it: {kernels.status()}")


def reference(y, x, A, B, scale, rows, slots):
    """y[rows[j]] += scale[s] B[s] A[s] x[rows[j]], s = slots[j], by hand in float64 (B given as the kernel takes it,
    transposed: (S, r, out))."""
    out = y.double().clone()
    for row, s in zip(rows.tolist(), slots.tolist()):
        out[row] += float(scale[s]) * (B[s].double().T @ (A[s].double() @ x[row].double()))
    return out


@pytest.mark.parametrize("dtype,out_dtype,tol", [(torch.float32, torch.float32, 1e-5), (torch.float64, torch.float64, 1e-12),
                                                 (torch.bfloat16, torch.bfloat16, 2e-2), (torch.float32, torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("r", [1, 2, 4, 6, 8, 16, 40])
@pytest.mark.parametrize("d_out", [23, 601])  # (odd sizes: the vectorized loops' remainders; 601: tiles of 256 outputs)
def test_lora_rows_kernel_is_the_formula(dtype, out_dtype, tol, r, d_out):
    g = torch.Generator().manual_seed(0)
    S, d_in, R = 5, 37, 7
    A, B = torch.randn(S, r, d_in, generator=g).to(dtype), torch.randn(S, r, d_out, generator=g).to(dtype)
    x, y = torch.randn(R, d_in, generator=g).to(dtype), torch.randn(R, d_out, generator=g).to(out_dtype)
    scale = torch.tensor([0.0, 0.5, 2.0, 1.5, 0.25], dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    rows, slots = torch.tensor([0, 2, 3, 6]), torch.tensor([1, 4, 1, 2])  # rows 1, 4 and 5 untouched
    expected = reference(y, x, A, B, scale, rows, slots)
    kernels.lora_rows()(y, x, A, B, scale, rows, slots)
    assert ((y.double() - expected).abs().max() / expected.abs().max()).item() < tol
    assert torch.equal(y[[1, 4, 5]].double(), expected[[1, 4, 5]])


def test_lora_rows_kernel_takes_every_row_when_rows_is_absent_and_rows_of_one_token():
    """rows None: row j through slots[j]; x and y as a decode step has them, (rows, 1, features)."""
    g = torch.Generator().manual_seed(1)
    A, B = torch.randn(4, 8, 19, generator=g), torch.randn(4, 8, 300, generator=g)
    x, y, scale, slots = torch.randn(5, 1, 19, generator=g), torch.randn(5, 1, 300, generator=g), torch.rand(4), torch.tensor([3, 0, 1, 3, 2])
    expected = reference(y[:, 0], x[:, 0], A, B, scale, torch.arange(5), slots)
    kernels.lora_rows()(y, x, A, B, scale, None, slots)
    assert (y[:, 0].double() - expected).abs().max().item() < 1e-5


def test_lora_rows_kernel_skips_each_slots_padding_given_its_rank():
    """ranks[s] < r: slot s is its first ranks[s] rows of A and B, and the rest is never read (here it holds
    garbage that would change the result)."""
    g = torch.Generator().manual_seed(2)
    ranks = torch.tensor([0, 3, 8, 1])
    A, B = torch.randn(4, 8, 19, generator=g), torch.randn(4, 8, 40, generator=g)
    x, y, scale, slots = torch.randn(6, 19, generator=g), torch.randn(6, 40, generator=g), torch.rand(4), torch.tensor([1, 2, 3, 0, 1, 2])
    trimmed_A, trimmed_B = A.clone(), B.clone()
    for s, k in enumerate(ranks.tolist()):
        trimmed_A[s, k:], trimmed_B[s, k:] = 0, 0
    expected = reference(y, x, trimmed_A, trimmed_B, scale, torch.arange(6), slots)
    kernels.lora_rows()(y, x, A, B, scale, None, slots, ranks)
    assert (y.double() - expected).abs().max().item() < 1e-5


def test_lora_rows_kernel_refuses_bad_input_with_one_line():
    A, B, x, y = torch.zeros(3, 2, 4), torch.zeros(3, 2, 5), torch.zeros(2, 4), torch.zeros(2, 5)
    op = kernels.lora_rows()
    with pytest.raises(RuntimeError, match="row or slot out of range"):
        op(y, x, A, B, torch.ones(3), torch.tensor([0]), torch.tensor([3]))
    with pytest.raises(RuntimeError, match="shapes do not agree"):
        op(y, x, A, torch.zeros(3, 2, 6), torch.ones(3), torch.tensor([0]), torch.tensor([1]))
    with pytest.raises(RuntimeError, match="a rank out of range"):
        op(y, x, A, B, torch.ones(3), torch.tensor([0]), torch.tensor([1]), torch.tensor([0, 3, 1]))
    with pytest.raises(RuntimeError, match="scale must be float64 for float64 factors, else float32"):
        op(y, x, A, B, torch.ones(3, dtype=torch.float64), torch.tensor([0]), torch.tensor([1]))


def counting(monkeypatch) -> list:
    """Count the kernel's calls (one per mixed LoRA layer that takes it)."""
    calls, op = [], kernels.lora_rows()
    monkeypatch.setattr(kernels, "lora_rows", lambda: (lambda *a: calls.append(1) or op(*a)) if kernels.enabled() else None)
    return calls


def test_mixed_lora_batches_run_the_kernel_and_agree_with_the_gather_path(monkeypatch):
    """Every mixed LoRA layer without autograd on the CPU takes the kernel for rows of one token (decode steps); its
    logits equal the PyTorch gather's (PEFTKIT_CPU_KERNELS=0) and each row's solo run, with rows of the base and
    adapters of three ranks and targets. Rows of several tokens (a prefill) keep the gather."""
    pm = pk.get_peft_model(tiny_llama(), pk.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), "qv")
    pm.add_adapter("mlp", pk.LoraConfig(r=8, target_modules=["up_proj", "down_proj"]))
    pm.add_adapter("all", pk.LoraConfig(r=2, target_modules="all-linear"))
    for i, name in enumerate(pm.peft_config):
        randomize_b(pm, name, seed=i + 1)
    pm.eval()
    calls, names, one_token = counting(monkeypatch), ["all", "qv", "__base__"], X[:, :1]
    with_kernel = logits(pm, one_token, adapter_names=names)
    # 2 layers x (q, v: qv and all; k, o, gate: all; up, down: mlp and all) = 14 mixed LoRA layers
    assert len(calls) == 14
    assert_mixed_equals_solo(pm, names, x=one_token)
    assert_mixed_equals_solo(pm, ["mlp", "all", "mlp"], x=one_token)
    calls.clear()
    logits(pm, X, adapter_names=names)  # 12 tokens a row
    assert not calls
    monkeypatch.setenv("PEFTKIT_CPU_KERNELS", "0")
    assert kernels.status().startswith("CPU kernels off")
    gathered = logits(pm, one_token, adapter_names=names)
    assert not calls and (with_kernel - gathered).abs().max().item() < 1e-5


def test_a_fused_step_takes_the_kernel_for_every_token_and_agrees_with_the_runs_path(monkeypatch):
    """A fused serving step (the running rows' next tokens, then each newcomer's prompt as a run of its adapter)
    makes one kernel call per mixed LoRA layer for all its tokens, prompts included; its logits equal the decode
    step and the prefills apart, and the PyTorch path's (PEFTKIT_CPU_KERNELS=0: a matmul per run, which is all
    this step is made of, as the two running rows share an adapter)."""
    rows, prompts = ["lora-all", "lora-all"], [[5, 9, 11], [3, 7, 5, 9]]
    newcomers = [("lora-qv", [4, 8, 15, 16, 23, 42]), ("lora-all", [7, 7, 1, 5])]
    calls = counting(monkeypatch)
    out = _apart_and_fused(_registry(), rows, prompts, newcomers)
    assert len(calls) == 14  # the fused step alone (the others have one adapter a row): 2 layers x 7 linear layers
    assert (out["fused"][: len(rows)] - out["decoded"]).abs().max().item() < 1e-5
    for k, alone in enumerate(out["alone"]):
        assert (out["fused"][len(rows) + k] - alone[0]).abs().max().item() < 1e-5
    monkeypatch.setenv("PEFTKIT_CPU_KERNELS", "0")
    runs = _apart_and_fused(_registry(), rows, prompts, newcomers)["fused"]
    assert len(calls) == 14 and (out["fused"] - runs).abs().max().item() < 1e-5


def test_a_machine_that_cannot_build_it_keeps_the_pytorch_path(tmp_path):
    """A compiler that fails (here /bin/false as CXX) leaves one logged line and the gather path, with the same
    numbers as before."""
    code = (
        "import torch, peftkit as pk\nfrom peftkit import kernels\nfrom conftest import tiny_llama\n"
        "from test_lora import randomize_b, assert_mixed_equals_solo\n"
        "pm = pk.get_peft_model(tiny_llama(), pk.LoraConfig(r=4, target_modules='all-linear'), 'a')\n"
        "pm.add_adapter('b', pk.LoraConfig(r=2, target_modules=['q_proj']))\n"
        "randomize_b(pm, 'a', 1); randomize_b(pm, 'b', 2); pm.eval()\n"
        "assert_mixed_equals_solo(pm, ['b', 'a', '__base__'])\nprint(kernels.status())\n"
    )
    env = {**os.environ, "CXX": "/bin/false", "PEFTKIT_CACHE": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(__file__), env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("CPU kernels unavailable (building the CPU kernel with /bin/false failed")
    assert "mixed LoRA batches on the CPU use the slower PyTorch path" in done.stderr
    assert not list(tmp_path.glob("kernels/*.so"))


def test_under_bfloat16_autocast_the_kernel_agrees_with_the_gather_path(monkeypatch):
    """What `peftkit serve` runs on CPUs with AMX or AVX512-BF16: bfloat16 autocast, so the base layers' outputs the
    kernel adds into are bfloat16 while the stacks stay float32. The kernel's logits stay within bfloat16 rounding
    of the gather's, and the batch's rows still rank the same tokens first."""
    pm = pk.get_peft_model(tiny_llama(), pk.LoraConfig(r=8, target_modules="all-linear"), "a")
    pm.add_adapter("b", pk.LoraConfig(r=4, target_modules=["q_proj", "down_proj"]))
    randomize_b(pm, "a", 1)
    randomize_b(pm, "b", 2)
    pm.eval()
    calls, names, one_token = counting(monkeypatch), ["a", "b", "__base__"], X[:, :1]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with_kernel = logits(pm, one_token, adapter_names=names).float()
        assert len(calls) == 14
        monkeypatch.setenv("PEFTKIT_CPU_KERNELS", "0")
        gathered = logits(pm, one_token, adapter_names=names).float()
    assert len(calls) == 14 and with_kernel.dtype == gathered.dtype and torch.isfinite(with_kernel).all()
    assert (with_kernel - gathered).abs().max().item() < 0.05 * gathered.abs().max().item()
    assert (with_kernel.argmax(-1) == gathered.argmax(-1)).float().mean().item() >= 2 / 3
