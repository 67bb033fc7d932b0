"""Compiled CPU kernels, built from source on first use and cached per machine.

One kernel so far, ``lora_rows_`` (``lora_rows.cpp``): a mixed-adapter LoRA update that reads each row's factors
straight from their slot in the stacks, where the Python path copies them out first (BGMV, as Punica and vLLM run
it on GPUs). On a 16-row decode step of SmolLM2-135M with 12 mixed adapters it cuts the LoRA layers' added time
about threefold (BENCHMARKS.md).

The source is compiled with the machine's C++ compiler (``$CXX``, else ``g++``/``c++``) against the installed
torch's headers, for this CPU (``-march=native``), into ``$PEFTKIT_CACHE/kernels`` (default ``~/.cache/peftkit``)
under a name that hashes the source, the torch version, the compiler and the CPU; the first build takes about 5
seconds, later processes load it at once. Written to a temporary name and renamed, so processes that build at the
same time never load half a file.

Where no compiler is found, the build fails or ``PEFTKIT_CPU_KERNELS=0`` is set, :func:`lora_rows` returns None
and callers keep their pure-PyTorch path, which gives the same numbers more slowly; the reason is logged once.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Callable

import torch

from ..models import cache_dir

log = logging.getLogger(__name__)
SOURCE = Path(__file__).with_name("lora_rows.cpp")
BUILD_TIMEOUT_S = 300
_lock = threading.Lock()
_loaded: dict[str, Callable | None] = {}  # per process: "lora_rows" -> the op, or None once it is known unusable
_why_not: list[str] = []


def enabled() -> bool:
    """False when ``PEFTKIT_CPU_KERNELS`` is 0/false/no: the pure-PyTorch paths only (benchmarks compare both)."""
    return os.environ.get("PEFTKIT_CPU_KERNELS", "1").strip().lower() not in ("0", "false", "no")


def lora_rows() -> Callable | None:
    """``torch.ops.peftkit.lora_rows_`` (see ``lora_rows.cpp``), built on the first call; None when kernels are
    turned off or cannot be built here (:func:`status` says why)."""
    if not enabled():
        return None
    if "lora_rows" not in _loaded:
        with _lock:
            if "lora_rows" not in _loaded:
                _loaded["lora_rows"] = _load()
    return _loaded["lora_rows"]


def add_lora_rows(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: torch.Tensor,
                  rows: torch.Tensor | None, slots: torch.Tensor, ranks: torch.Tensor | None = None) -> bool:
    """``y[rows[j]] += scale[s] * B[s] A[s] x[rows[j]]`` (s = slots[j]; every row when ``rows`` is None) in place
    through :func:`lora_rows`, where it applies: autograd off, the CPU, one token per row (decode steps, and each
    token of a fused step) and ``y`` writable in place. False, with nothing done, otherwise: the caller's gather
    path then runs (GPUs, training, no compiler). Rows of several tokens (a prefill) keep the gather too: its copy
    of a row's factors is shared by the row's tokens and its batched matmuls beat these loops there (16 prompts of
    12 mixed adapters on SmolLM2-135M: 770 against 804 ms, measured with an earlier form of the kernel's second
    half; not measured since).

    Shapes: y (rows, [1,] out), x (rows, [1,] in), A (S, r, in), B (S, r, out) (transposed), scale (S,); ranks
    (S,), each slot's own rank, whose padding up to r is then skipped (None: r everywhere)."""
    if torch.is_grad_enabled() or not y.is_cpu or not y.is_contiguous() or x.shape[1:-1].numel() != 1:
        return False
    if not (A.is_contiguous() and B.is_contiguous()):
        return False
    op = lora_rows()
    if op is None:
        return False
    # (this runs in every mixed LoRA layer of every step: each conversion is made only where it changes something)
    x = x.contiguous() if x.dtype == A.dtype else x.to(A.dtype).contiguous()
    accumulate = torch.float64 if A.dtype == torch.float64 else torch.float32
    op(y, x, A, B, scale if scale.dtype == accumulate else scale.to(accumulate), rows, slots, ranks)
    return True


def status() -> str:
    """One line for logs and benchmark headers: which path mixed LoRA batches take on the CPU, and why."""
    if not enabled():
        return "CPU kernels off (PEFTKIT_CPU_KERNELS=0): mixed LoRA rows are gathered in PyTorch"
    if lora_rows() is None:
        return f"CPU kernels unavailable ({_why_not[-1]}): mixed LoRA rows are gathered in PyTorch"
    return "CPU kernel lora_rows_ (compiled for this CPU) for mixed LoRA rows"


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "g++", "c++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_signature() -> str:
    """What ``-march=native`` compiles for: the CPU's model and flags (a cache shared between machines must not hand
    one CPU's build to another)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    keep = [line for line in lines if line.startswith(("model name", "flags"))]
    return "\n".join(keep[:2])


def _load() -> Callable | None:
    def unusable(why: str) -> None:
        _why_not.append(why)
        log.warning("peftkit: %s; mixed LoRA batches on the CPU use the slower PyTorch path", why)
        return None

    if platform.system() != "Linux":
        return unusable(f"the CPU kernel is built on Linux only, not {platform.system()}")
    compiler = _compiler()
    if compiler is None:
        return unusable("no C++ compiler (set CXX or install g++) to build the CPU kernel")
    source = SOURCE.read_bytes()
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    key = hashlib.sha256(b"\0".join(s.encode() if isinstance(s, str) else s for s in (
        source, torch.__version__, version, _cpu_signature(), str(torch._C._GLIBCXX_USE_CXX11_ABI)))).hexdigest()[:16]
    target = cache_dir() / "kernels" / f"lora_rows-{key}.so"
    if not target.exists():
        try:
            _build(compiler, target)
        except (OSError, subprocess.SubprocessError) as e:
            lines = (getattr(e, "stderr", "") or str(e)).strip().splitlines() or [""]
            first_error = next((line for line in lines if "error" in line), lines[-1])
            return unusable(f"building the CPU kernel with {compiler} failed: {first_error.strip()}")
    try:
        torch.ops.load_library(str(target))
    except (OSError, RuntimeError) as e:
        return unusable(f"loading the CPU kernel {target} failed: {e}")
    return torch.ops.peftkit.lora_rows_


def _build(compiler: str, target: Path) -> None:
    torch_dir = Path(torch.__file__).parent
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}")
    command = [
        compiler, "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17", "-w",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        f"-I{torch_dir / 'include'}", str(SOURCE), f"-L{torch_dir / 'lib'}", "-ltorch_cpu", "-lc10",
        f"-Wl,-rpath,{torch_dir / 'lib'}", "-o", str(partial),
    ]
    log.info("peftkit: compiling the CPU kernel %s (once per machine, about 5 s)", target.name)
    try:
        subprocess.run(command, check=True, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
        os.replace(partial, target)  # (atomic: a process building at the same time loads one whole file or the other)
    finally:
        partial.unlink(missing_ok=True)
