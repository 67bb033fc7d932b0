"""``peftkit analyze``: is my LoRA rank larger than it needs to be? (spectra, and the LoRA paper's Figure 3)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .. import strict_json

EXAMPLES = """examples:
  peftkit analyze runs/sst2-r64/adapter                       # per module: how many directions hold 90% / 99%
  peftkit analyze runs/sst2-r8 runs/sst2-r64 --plot fig3.png   # subspace similarity of two adapters' A matrices
  peftkit analyze runs/a runs/b --which B --json

One adapter: the singular values of each module's update B @ A, and the smallest rank keeping 90% and 99% of its
energy. When most modules need far fewer than r directions, a smaller r would do.
Two adapters (same base, same modules, e.g. r = 8 and r = 64 on one task): phi(i, j) = ||U1_i^T U2_j||_F^2 /
min(i, j), how much of the top-i directions of the first lie in the top-j of the second (1: inside, 0:
orthogonal; random directions give about j / d). A high phi(1, r2) with a low phi for the rest means the extra
rank of the larger adapter learned little beyond its top directions.
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("analyze", help="how much of its rank a LoRA adapter uses; compare two adapters' subspaces",
                              description="Rank analysis of LoRA adapters (the LoRA paper, section 7.2).",
                              epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("adapters", nargs="+", metavar="ADAPTER", help="one or two LoRA adapter or run folders")
    p.add_argument("--which", choices=["A", "B"], default="A", help="two adapters: compare the A (default) or B matrices")
    p.add_argument("--plot", metavar="PNG", help="also draw the figure (spectra, or the mean phi(i, j) heatmap)")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    p.set_defaults(func=cmd_analyze)


def cmd_analyze(args: argparse.Namespace) -> int:
    from ..train import find_adapter

    if len(args.adapters) > 2:
        raise ValueError(f"analyze takes one or two adapters, got {len(args.adapters)}")
    folders = [find_adapter(a)[0] for a in args.adapters]
    result = _spectra(folders[0]) if len(folders) == 1 else _similarity(folders[0], folders[1], args.which)
    if args.plot:
        _plot(result, Path(args.plot))
    if args.json:
        print(strict_json.dumps({k: v for k, v in result.items() if k != "phi"}))
    else:
        print("\n".join(result["lines"]))
        if args.plot:
            print(f"figure: {args.plot}")
    return 0


def _spectra(folder: Path) -> dict[str, Any]:
    from ..analyze import spectrum

    rows = spectrum(folder)
    width = max(len(r.module) for r in rows)
    lines = [f"{folder}: singular values of B @ A per module (rank keeping 90% / 99% of the update's energy)",
             f"  {'module'.ljust(width)}  r    90%  99%  top singular values"]
    for r in rows:
        top = ", ".join(f"{s:.3g}" for s in r.singular_values[:4])
        lines.append(f"  {r.module.ljust(width)}  {r.rank:<4} {r.rank_90:<4} {r.rank_99:<4} {top}")
    ranks = sorted({r.rank for r in rows})
    r90 = sorted(r.rank_90 for r in rows)
    lines.append(f"median rank keeping 90%: {r90[len(r90) // 2]} of r = {'/'.join(map(str, ranks))}")
    return {"adapter": str(folder), "modules": [r.__dict__ for r in rows], "lines": lines}


def _similarity(x: Path, y: Path, which: str) -> dict[str, Any]:
    import torch

    from ..analyze import compare

    phis = compare(x, y, which)
    modules = list(phis)
    width = max(len(m) for m in modules)
    lines = [f"subspace similarity of the {which} matrices: {x} (i) vs {y} (j)",
             f"  {'module'.ljust(width)}  phi(1,1)  phi(1,j_max)  phi(i_max,j_max)"]
    rows = []
    for m, phi in phis.items():
        rows.append({"module": m, "phi_1_1": phi[0, 0].item(), "phi_1_jmax": phi[0, -1].item(), "phi_all": phi[-1, -1].item()})
        lines.append(f"  {m.ljust(width)}  {rows[-1]['phi_1_1']:<8.3f}  {rows[-1]['phi_1_jmax']:<12.3f}  {rows[-1]['phi_all']:.3f}")
    shapes = {tuple(p.shape) for p in phis.values()}
    mean = torch.stack(list(phis.values())).mean(0) if len(shapes) == 1 else None
    if mean is not None:
        lines.append(f"mean over modules: phi(1,1) = {mean[0, 0]:.3f}, phi(1,{mean.shape[1]}) = {mean[0, -1]:.3f}, "
                     f"phi({mean.shape[0]},{mean.shape[1]}) = {mean[-1, -1]:.3f}")
    return {"x": str(x), "y": str(y), "which": which, "modules": rows, "phi": mean, "lines": lines}


def _plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..checkpoint import atomic_write

    fig, ax = plt.subplots(figsize=(6.5, 4))
    if "phi" in result:
        if result["phi"] is None:
            raise ValueError("the modules' ranks differ, so there is no single phi(i, j) grid to draw; drop --plot")
        image = ax.imshow(result["phi"].numpy(), aspect="auto", origin="upper", vmin=0, vmax=1, cmap="viridis",
                          extent=(0.5, result["phi"].shape[1] + 0.5, result["phi"].shape[0] + 0.5, 0.5))
        fig.colorbar(image, ax=ax, label="phi(i, j), mean over modules")
        ax.set_xlabel(f"j (top directions of {Path(result['y']).name})")
        ax.set_ylabel(f"i (top directions of {Path(result['x']).name})")
        ax.set_title(f"subspace similarity of the {result['which']} matrices")
    else:
        for row in result["modules"]:
            energy = [s * s for s in row["singular_values"]]
            total = sum(energy) or 1.0
            shares = [sum(energy[: k + 1]) / total for k in range(len(energy))]
            ax.plot(range(1, len(shares) + 1), shares, color="tab:blue", alpha=0.3)
        ax.axhline(0.9, color="gray", linestyle="--", linewidth=0.8)
        ax.set_xlabel("rank k")
        ax.set_ylabel("share of the update's energy in the top k")
        ax.set_title("one line per module")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
