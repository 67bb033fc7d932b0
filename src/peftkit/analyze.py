"""How much of its rank a LoRA adapter uses: the spectrum of each update, and how alike two adapters' subspaces are.

One adapter. A module's update is ``dW = scale * B @ A`` with ``B`` (d_out x r) and ``A`` (r x d_in). Its singular
values s_1 >= ... >= s_r say how the update's energy (sum of s_k^2, its squared Frobenius norm) spreads over
directions; the smallest k with ``sum_{i<=k} s_i^2 >= 90%`` of the total is the rank that keeps 90% of the update.
When most modules need far fewer directions than r, the rank is larger than the task needs. The scale does not
change these shares, so alpha and rsLoRA play no part.

Two adapters (the LoRA paper, section 7.2 and Figure 3). For the same module, take the right-singular vectors of
``A1`` (r1 x d) and ``A2`` (r2 x d): orthonormal columns U1 (d x r1), U2 (d x r2), sorted by singular value. Then

    phi(i, j) = || U1[:, :i]^T @ U2[:, :j] ||_F^2 / min(i, j)        in [0, 1]

is 1 when the top-i directions of one lie inside the span of the top-j of the other, and 0 when they are
orthogonal. For ``B`` the left-singular vectors play the same part. Random subspaces give about max(i, j) / d, the
baseline printed beside it. The paper found that the top directions of an r = 8 and an r = 64 adapter trained on
the same task overlap strongly (phi(1, j) > 0.5) while the rest look random: most of r = 64 is noise.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from . import checkpoint
from .tuners.base import FILE_PREFIX

_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>A|B)\.weight$")


@dataclass(frozen=True)
class ModuleSpectrum:
    """One module of one adapter: its rank, singular values of B @ A, and the ranks keeping 90% / 99% of it."""

    module: str
    rank: int
    singular_values: list[float]
    rank_90: int
    rank_99: int


def lora_factors(folder: str | os.PathLike) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{module path: (A, B)}`` of a LoRA adapter folder, in float64 (the analysis is about directions, not speed)."""
    config = checkpoint.read_config(folder)
    if config.peft_type != "LORA":
        raise ValueError(f"{folder} is a {config.peft_type} adapter: rank analysis needs a LoRA adapter")
    tensors = checkpoint.load_tensors(Path(folder) / checkpoint.WEIGHTS_NAME)
    checkpoint.check_weights(tensors, folder)  # NaN or integer tensors would give meaningless spectra
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _LORA_KEY.match(key[len(FILE_PREFIX):] if key.startswith(FILE_PREFIX) else key)
        if match:
            pairs.setdefault(match["module"], {})[match["which"]] = tensor.detach().to(torch.float64)
    factors = {m: (p["A"], p["B"]) for m, p in sorted(pairs.items(), key=lambda kv: _natural(kv[0])) if len(p) == 2}
    if not factors:
        raise ValueError(f"{folder} holds no lora_A / lora_B pairs to analyse")
    return factors


def update_singular_values(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Singular values of ``B @ A`` without forming the d_out x d_in product.

    With ``B = Qb Rb`` and ``A^T = Qa Ra`` (thin QR), ``B A = Qb (Rb Ra^T) Qa^T`` and Qb, Qa have orthonormal
    columns, so ``B A`` has the singular values of the r x r matrix ``Rb Ra^T``.
    """
    _, r_b = torch.linalg.qr(b)
    _, r_a = torch.linalg.qr(a.T)
    return torch.linalg.svdvals(r_b @ r_a.T)


def rank_keeping(singular_values: torch.Tensor, share: float) -> int:
    """The smallest k whose top-k singular values hold ``share`` of the energy sum(s^2) (0 for a zero update)."""
    energy = singular_values.pow(2)
    total = energy.sum()
    if total <= 0:
        return 0
    return int(torch.searchsorted(energy.cumsum(0) / total, torch.tensor(share, dtype=energy.dtype)).item()) + 1


def spectrum(folder: str | os.PathLike) -> list[ModuleSpectrum]:
    """Every LoRA module's spectrum, in module order."""
    rows = []
    for module, (a, b) in lora_factors(folder).items():
        s = update_singular_values(a, b)
        rows.append(ModuleSpectrum(module, a.shape[0], s.tolist(), rank_keeping(s, 0.90), rank_keeping(s, 0.99)))
    return rows


def subspace_basis(matrix: torch.Tensor, which: str) -> torch.Tensor:
    """Orthonormal columns spanning A's rows (right-singular vectors) or B's columns (left), by singular value."""
    if which == "A":
        return torch.linalg.svd(matrix, full_matrices=False).Vh.T
    if which == "B":
        return torch.linalg.svd(matrix, full_matrices=False).U
    raise ValueError(f"which must be 'A' or 'B', got {which!r}")


def subspace_similarity(x: torch.Tensor, y: torch.Tensor, which: str = "A") -> torch.Tensor:
    """``phi[i-1, j-1] = ||Ux[:, :i]^T Uy[:, :j]||_F^2 / min(i, j)`` for every i <= rank(x), j <= rank(y)."""
    ux, uy = subspace_basis(x, which), subspace_basis(y, which)
    if ux.shape[0] != uy.shape[0]:
        raise ValueError(f"the two {which} matrices act on spaces of different sizes ({ux.shape[0]} vs {uy.shape[0]})")
    overlap = (ux.T @ uy).pow(2)  # overlap[p, q] = (u_p . v_q)^2
    cumulative = overlap.cumsum(0).cumsum(1)  # sum over p <= i, q <= j
    i = torch.arange(1, ux.shape[1] + 1, dtype=overlap.dtype)[:, None]
    j = torch.arange(1, uy.shape[1] + 1, dtype=overlap.dtype)[None, :]
    return cumulative / torch.minimum(i, j)


def compare(folder_x: str | os.PathLike, folder_y: str | os.PathLike, which: str = "A") -> dict[str, torch.Tensor]:
    """``{module: phi}`` over the modules both adapters adapt (an error when they share none)."""
    fx, fy = lora_factors(folder_x), lora_factors(folder_y)
    shared = [m for m in fx if m in fy]
    if not shared:
        raise ValueError(f"{folder_x} and {folder_y} adapt no module in common: nothing to compare")
    pick = 0 if which == "A" else 1
    return {m: subspace_similarity(fx[m][pick], fy[m][pick], which) for m in shared}


def _natural(text: str) -> list:
    """Sort key putting layers.2 before layers.10."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]
