"""The many-adapter goal of issue 18 in interleaved rounds: `peftkit serve` with 512 adapters on disk under Zipf
popularity against the same server with one adapter, alternately, so that the ratio of their tokens/s does not
depend on which hour of a shared VM each ran in.

serve_load.py runs each load once, in sequence, and brackets the drift with the one-adapter load run again at the
end; on this VM one run can be off by a fifth, which is more than the margin the goal is judged on (0.8x). Here the
two loads alternate in ABBA order (one, many, many, one, one, many, ...) on the same plans, adapter folders and
server settings as serve_load.py's (its SIZES["full"]: 16 clients x 8 requests, max_tokens 32, batch 16, budget 16),
each run on a fresh server, so every many-adapter run starts with no adapter resident and loads every one on demand
as serve_load.py's does. Reported: each run's tokens/s, adapter loads and evictions, lost and crossed answers
(checked against each adapter generating alone), each round's ratio (many / one, the two runs of that round) and
their median. Writes serve_ratio.json, .md and .png into --out.

    python bench/serve_ratio.py --out bench/results            # 3 rounds: about 8 minutes on 2 cores
    python bench/serve_ratio.py --quick --out /tmp/sr          # tiny sizes (counts 1 and 8)
    python bench/serve_ratio.py --max-adapters 128 --out /tmp/sr128   # a budget that holds all 73 adapters the
                                                                      # plan uses: loads without evictions
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import peftkit as pk  # noqa: E402
from peftkit.device import resolve_precision  # noqa: E402
from report import write_report  # noqa: E402
from serve_adapters import solo_references  # noqa: E402
from serve_clients import ServerProcess  # noqa: E402
from serve_load import SIZES, cpu_name, log, serve_run, write_loads  # noqa: E402
from serve_report import ZIPF_GOAL  # noqa: E402

from peftkit import kernels  # noqa: E402

ONE, MANY = "one adapter", "many, Zipf"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: 8 adapters, 4 clients x 2 requests, 8 tokens")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of one run of each load (default: %(default)s)")
    parser.add_argument("--many", type=int, help="adapters on disk for the Zipf load (full: 512, quick: 8)")
    parser.add_argument("--max-adapters", type=int,
                        help="the servers' budget, --max-adapters (full: 16, quick: 4); one that holds every adapter "
                             "the plan uses shows what the loads cost without evictions")
    parser.add_argument("--out", type=Path, default=Path("bench/results"), help="folder for serve_ratio.json/.md/.png")
    parser.add_argument("--model", default="smollm2-135m", help="base model, as `peftkit serve --model` takes it")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of each server")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="compute precision of the servers and the solo references (default: float32)")
    parser.add_argument("--seed", type=int, default=0, help="adapters' weights and the plans, as serve_load.py's")
    args = parser.parse_args(argv)
    for flag, value, least in (("--rounds", args.rounds, 1), ("--many", args.many, 2), ("--max-adapters", args.max_adapters, 1)):
        if value is not None and value < least:
            parser.error(f"{flag} must be at least {least}, got {value}")
    return args


def order(rounds: int) -> list[tuple[int, str]]:
    """(round, load) in ABBA order: a steady drift in the machine's speed weighs on both loads alike."""
    pairs = [(ONE, MANY), (MANY, ONE)]
    return [(r, load) for r in range(rounds) for load in pairs[r % 2]]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    size = dict(SIZES["quick" if args.quick else "full"])
    size["counts"] = [1, args.many or size["counts"][-1]]
    size["max_adapters"] = args.max_adapters or size["max_adapters"]
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    model, tok = pk.load_model(args.model)
    args.no_mixed = True  # (write_loads: LoRA folders only)
    runs, failures = [], []
    with tempfile.TemporaryDirectory(prefix="peftkit-serve-ratio-") as tmp_name:
        tmp = Path(tmp_name)
        loads, folders = write_loads(model, tmp, size, args)
        chosen = {ONE: next(x for x in loads if x[1] == "single"), MANY: next(x for x in loads if x[1] == "zipf")}
        precision = resolve_precision(args.dtype, torch.device("cpu"))
        pairs = {job for *_, plan in chosen.values() for client in plan for job in client}
        expected = solo_references(model, tok, folders, pairs, size["max_tokens"], args.model, precision)
        log(f"{len(folders)} adapter folders and {len(pairs)} solo references in {time.perf_counter() - started:.0f} s")
        del model
        for rnd, load in order(args.rounds):
            count, _, folder, plan = chosen[load]
            server = ServerProcess(args.model, folder, tmp / f"server-{rnd}-{count}.log", max_batch=size["max_batch"],
                                   max_queue=size["clients"], threads=args.threads, max_adapters=size["max_adapters"],
                                   dtype=args.dtype)
            try:
                server.wait_ready()
                row = serve_run(server, plan, expected, size)
            finally:
                server.stop()
            runs.append({"round": rnd, "load": load, "adapters": count} | row)
            log(f"round {rnd + 1}, {load} ({count} on disk): {row['tokens_per_s']:.1f} tokens/s, {row['adapter_loads']} "
                f"loads, {row['answered']}/{row['sent']} answered, {row['crossed']} crossed")
            if row["lost"] or row["crossed"]:
                failures.append(f"round {rnd + 1}, {load}: {row['lost']} lost, {row['crossed']} crossed")
    report = {"sizes": size, "rounds": args.rounds, "threads": args.threads, "dtype": args.dtype, "seed": args.seed,
              "cpu": cpu_name(), "kernels": kernels.status(), "load_average": os.getloadavg(), "runs": runs,
              "wall_s": time.perf_counter() - started} | ratios(runs)
    write_report(args.out, "serve_ratio", report, markdown(report), lambda path: plot(report, path))
    for failure in failures:
        print(f"FAILED: {failure}", file=sys.stderr)
    return 1 if failures else 0


def ratios(runs: list[dict]) -> dict:
    """Each round's many / one ratio of tokens/s, their median, and the goal's verdict on that median."""
    by_round: dict[int, dict[str, float]] = {}
    for r in runs:
        by_round.setdefault(r["round"], {})[r["load"]] = r["tokens_per_s"]
    per_round = [rates[MANY] / rates[ONE] for _, rates in sorted(by_round.items())]
    median = statistics.median(per_round)
    return {"ratio_per_round": per_round, "ratio_median": median, "goal": ZIPF_GOAL, "met": median >= ZIPF_GOAL}


def markdown(report: dict) -> str:
    s = report["sizes"]
    lines = [f"{s['clients']} clients x {s['requests']} requests, max_tokens {s['max_tokens']}, batch {s['max_batch']}, "
             f"budget {s['max_adapters']} adapters, {report['dtype']}, {report['threads']} threads; {report['cpu']}; "
             f"{report['kernels']}; {report['rounds']} rounds in ABBA order, each run on a fresh server", "",
             "| round | load | adapters on disk | tokens/s | adapter loads | evictions | lost | crossed | many / one |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in report["runs"]:
        ratio = report["ratio_per_round"][r["round"]] if r["load"] == MANY else None
        lines.append(f"| {r['round'] + 1} | {r['load']} | {r['adapters']} | {r['tokens_per_s']:.1f} | {r['adapter_loads']:.0f} "
                     f"| {r['evictions']:.0f} | {r['lost']} | {r['crossed']} | {'' if ratio is None else f'{ratio:.2f}x'} |")
    verdict = "met" if report["met"] else "not met"
    lines += ["", f"Median of the rounds' ratios: **{report['ratio_median']:.2f}x** "
                  f"(goal >= {report['goal']}x: {verdict})"]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for load, color in ((ONE, "tab:blue"), (MANY, "tab:orange")):
        runs = [r for r in report["runs"] if r["load"] == load]
        label = f"{load} ({runs[0]['adapters']} on disk)" if runs else load
        ax.plot([r["round"] + 1 for r in runs], [r["tokens_per_s"] for r in runs], "o-", color=color, label=label)
    ax.set_xlabel("round (ABBA order)")
    ax.set_ylabel("tokens/s (batched server)")
    ax.set_ylim(bottom=0)
    ax.set_xticks(range(1, report["rounds"] + 1))
    ax.set_title(f"many / one, median of rounds: {report['ratio_median']:.2f}x (goal {report['goal']}x)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
