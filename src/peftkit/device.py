"""Where a run computes and in which precision: ``--device`` and ``--dtype`` resolved once, for every command.

Device: ``auto`` is CUDA when present (under torchrun, the process's ``LOCAL_RANK`` GPU), else the CPU;
``cpu``, ``cuda`` and ``cuda:N`` are taken as asked, with one clear error when no such GPU exists.

Precision: weights stay in float32 (adapter weights always: they are what the optimizer updates) and matrix
products run under ``torch.autocast`` in the chosen dtype. ``auto`` picks:

- bfloat16 on a CUDA GPU that supports it (Ampere and newer), float32 on older ones;
- on a CPU, bfloat16 only where it is really faster. CPUs differ by orders of magnitude here: with AMX or
  AVX512-BF16 (``/proc/cpuinfo`` flags ``amx_bf16``, ``avx512_bf16``) a bf16 matmul can run several times faster
  than fp32, without them it is emulated and can be hundreds of times slower. So the flags decide whether to try
  at all, and a short measured probe (fp32 vs bf16 ``torch.mm``, well under a second) confirms it: bf16 is chosen
  when it reaches at least :data:`BF16_MIN_SPEEDUP` times the fp32 GFLOP/s. The probe's result is cached per
  machine in ``$PEFTKIT_CACHE/precision.json`` (keyed by CPU model, flags, thread count and torch version);
  ``PEFTKIT_PRECISION_CACHE=0`` turns the cache off.

``PEFTKIT_AUTO_DTYPE=float32`` (or bfloat16) fixes what ``auto`` means on this machine, skipping the choice: the
test suite sets it to float32 so that results do not depend on which CPU runs them.

:class:`Precision` carries the dtype and the reason, which the commands print.
"""

from __future__ import annotations

import json
import os
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import torch

DEVICES_HELP = "auto|cpu|cuda|cuda:N"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
BF16_MIN_SPEEDUP = 1.2  # bf16 must beat fp32 by this factor in the probe to be worth its rounding
PROBE_SIZE = 1024  # n of the n x n probe matmul: 2.1 GFLOP, ~10-40 ms per product on a 2-core server CPU


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """The device ``spec`` names (``auto``/None, ``cpu``, ``cuda``, ``cuda:N``); ``ValueError`` with the fix when
    it names no usable device. Under torchrun, ``auto`` and ``cuda`` mean GPU ``LOCAL_RANK`` (one per process)."""
    text = "auto" if spec is None else str(spec)
    if text == "cpu":
        return torch.device("cpu")
    if text not in ("auto", "cuda") and not (text.startswith("cuda:") and text[5:].isdigit()):
        raise ValueError(f"--device must be {DEVICES_HELP}, got {text!r}")
    available = torch.cuda.is_available()
    if text == "auto" and not available:
        return torch.device("cpu")
    if not available:
        raise ValueError(f"--device {text}: no CUDA device is available to this process (torch {torch.__version__}, "
                         f"CUDA build {torch.version.cuda or 'none'}); use --device cpu or --device auto")
    count = torch.cuda.device_count()
    if text.startswith("cuda:"):
        index = int(text[5:])
    else:
        index = int(os.environ.get("LOCAL_RANK", torch.cuda.current_device()))
    if index >= count:
        raise ValueError(f"--device {text}: GPU {index} does not exist, this machine has {count} (cuda:0..cuda:{count - 1})")
    return torch.device("cuda", index)


@dataclass(frozen=True)
class Precision:
    """The compute dtype of a run: ``dtype`` float32 means no autocast; ``reason`` says why it was chosen."""

    dtype: torch.dtype
    reason: str

    @property
    def name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    def autocast(self, device: torch.device) -> AbstractContextManager:
        """``torch.autocast`` in this dtype on ``device`` (disabled for float32)."""
        return torch.autocast(device_type=device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    def describe(self) -> str:
        return f"precision: {self.name}{' autocast' if self.dtype != torch.float32 else ''} ({self.reason})"


def resolve_precision(spec: str | None, device: torch.device, training: bool = False, serving: bool = False) -> Precision:
    """The precision ``--dtype spec`` (``auto``/None, ``float32``, ``bfloat16``, ``float16``) means on ``device``.

    float16 is refused for training (it needs loss scaling to keep small gradients from underflowing) and on the
    CPU (no fast fp16 kernels there); bfloat16 on a GPU without bf16 support is refused. ``serving``: auto on the CPU
    is float32 whatever the probe says. Why: the probe times large matrix products, where bf16 autocast wins; a
    server's decode steps read every weight once per step, and autocast casts every float32 weight to bf16 on every
    step. `peftkit serve` with auto (bf16 autocast) on a 2-core Intel Xeon with AMX took 43.7-45.1 s for
    bench/serve_ratio.py's one-adapter load against 24.6-25.9 s in float32 (two interleaved pairs)."""
    text = "auto" if spec is None else str(spec)
    if text != "auto" and text not in DTYPES:
        raise ValueError(f"--dtype must be auto, {', '.join(DTYPES)}; got {text!r}")
    if text == "auto" and os.environ.get("PEFTKIT_AUTO_DTYPE"):
        fixed = os.environ["PEFTKIT_AUTO_DTYPE"]
        if fixed not in ("float32", "bfloat16"):
            raise ValueError(f"PEFTKIT_AUTO_DTYPE must be float32 or bfloat16, got {fixed!r}")
        return Precision(DTYPES[fixed], f"auto fixed by PEFTKIT_AUTO_DTYPE={fixed}")
    if text == "float32":
        return Precision(torch.float32, "asked for with --dtype float32")
    if text == "float16":
        if device.type != "cuda":
            raise ValueError(f"--dtype float16 needs a CUDA device (this run is on {device}); on a CPU use bfloat16 or float32")
        if training:
            raise ValueError("--dtype float16 is for eval, generate and serve; train in bfloat16 or float32 "
                             "(fp16 training needs loss scaling, which peftkit does not do)")
        return Precision(torch.float16, "asked for with --dtype float16")
    if device.type == "cuda":
        supported = torch.cuda.is_bf16_supported()
        name = torch.cuda.get_device_name(device)
        if text == "bfloat16":
            if not supported:
                raise ValueError(f"--dtype bfloat16: {name} has no bf16 support; use --dtype float32 (or float16 for inference)")
            return Precision(torch.bfloat16, "asked for with --dtype bfloat16")
        if supported:
            return Precision(torch.bfloat16, f"auto: {name} supports bf16")
        return Precision(torch.float32, f"auto: {name} has no bf16 support")
    if text == "bfloat16":
        return Precision(torch.bfloat16, "asked for with --dtype bfloat16")
    if device.type != "cpu":
        return Precision(torch.float32, f"auto: float32 on {device.type}")
    if serving:
        return Precision(torch.float32, "auto: serving on the CPU, where bf16 autocast would cast every weight on "
                                        "every decode step (--dtype bfloat16 to force it)")
    return cpu_auto_precision()


# ---------------------------------------------------------------------------------------------------- CPU probe


def cpu_identity() -> tuple[str, tuple[str, ...]]:
    """(model name, the bf16 matrix flags present) from ``/proc/cpuinfo`` (empty on systems without it)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown", ()
    model, flags = "unknown", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model == "unknown":
            model = value.strip()
        elif key == "flags" and not flags:
            flags = set(value.split())
    return model, tuple(f for f in CPU_BF16_FLAGS if f in flags)


def matmul_gflops(dtype: torch.dtype, size: int = PROBE_SIZE, repeats: int = 3) -> float:
    """Best-of-``repeats`` GFLOP/s of one ``size`` x ``size`` ``torch.mm`` in ``dtype`` (2 n^3 flops) on the CPU,
    after one warm-up product."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=g).to(dtype)
    b = torch.randn(size, size, generator=g).to(dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


@dataclass(frozen=True)
class CpuProbe:
    """What the CPU offers: its model, bf16 flags, and (when the flags are there) measured fp32 / bf16 GFLOP/s."""

    model: str
    flags: tuple[str, ...]
    fp32_gflops: float | None
    bf16_gflops: float | None

    @property
    def bf16_faster(self) -> bool:
        return bool(self.flags and self.fp32_gflops and self.bf16_gflops
                    and self.bf16_gflops >= BF16_MIN_SPEEDUP * self.fp32_gflops)


def _cache_path() -> Path | None:
    if os.environ.get("PEFTKIT_PRECISION_CACHE", "1") == "0":
        return None
    from .models import cache_dir

    return cache_dir() / "precision.json"


def cpu_probe(measure_without_flags: bool = False) -> CpuProbe:
    """Probe the CPU (cached per machine, see the module docstring). Without bf16 flags no bf16 matmul is run
    (it may be emulated and very slow) unless ``measure_without_flags``."""
    model, flags = cpu_identity()
    key = f"{model} | flags {','.join(flags) or 'none'} | threads {torch.get_num_threads()} | torch {torch.__version__}"
    path = _cache_path()
    cache: dict = {}
    if path is not None and path.exists():
        try:
            cache = json.loads(path.read_text())
        except (OSError, ValueError):
            cache = {}  # a damaged cache is measured again and rewritten
        entry = cache.get(key)
        if isinstance(entry, dict) and (entry.get("bf16_gflops") is not None or not measure_without_flags):
            return CpuProbe(model, flags, entry.get("fp32_gflops"), entry.get("bf16_gflops"))
    if not flags and not measure_without_flags:
        return CpuProbe(model, flags, None, None)
    probe = CpuProbe(model, flags, matmul_gflops(torch.float32), matmul_gflops(torch.bfloat16))
    if path is not None:
        cache[key] = {"fp32_gflops": probe.fp32_gflops, "bf16_gflops": probe.bf16_gflops}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(cache, indent=1))
        os.replace(tmp, path)
    return probe


def cpu_auto_precision(probe: CpuProbe | None = None) -> Precision:
    """``--dtype auto`` on the CPU: bfloat16 autocast when the probe says it is really faster, else float32."""
    probe = probe or cpu_probe()
    if not probe.flags:
        return Precision(torch.float32, f"auto: this CPU ({probe.model}) has no {'/'.join(CPU_BF16_FLAGS)}, bf16 would be emulated")
    measured = f"bf16 matmul {probe.bf16_gflops:.0f} vs fp32 {probe.fp32_gflops:.0f} GFLOP/s"
    if probe.bf16_faster:
        return Precision(torch.bfloat16, f"auto: CPU has {','.join(probe.flags)} and {measured}")
    return Precision(torch.float32, f"auto: CPU has {','.join(probe.flags)} but {measured}, under {BF16_MIN_SPEEDUP}x")


def pin(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device``: from pinned memory with a non-blocking copy when ``device`` is a GPU, so the copy
    overlaps the host's next work; CPU tensors pass unchanged."""
    if device.type != "cuda":
        return tensor if tensor.device == device else tensor.to(device)
    if tensor.device.type == "cpu":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def to_device(batch: dict, device: torch.device) -> dict:
    """Every tensor of ``batch`` on ``device`` (see :func:`pin`); other values unchanged."""
    return {k: pin(v, device) if torch.is_tensor(v) else v for k, v in batch.items()}
