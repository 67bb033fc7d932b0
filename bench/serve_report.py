"""The serving benchmark's figures: per-run summary, the goals of issue 18 judged from them, the markdown table and
the chart (tokens/s and peak RSS against the number of adapters)."""

from __future__ import annotations

import statistics
from pathlib import Path

from report import panels, save_figure

BOUND_GOAL, ZIPF_GOAL = 0.8, 0.8  # issue 18: >= 80% of the decode bound; 512 adapters (Zipf) >= 0.8x one adapter
AGAIN = "single again"  # the one-adapter load run once more at the end of the benchmark


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 1]) of a non-empty list."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summarize(records: list[dict], wall: float, expected: dict) -> dict:
    """Lost = sent without a full answer; crossed = answered, but not what its adapter generates alone.
    ``distinguishable``: requests whose solo answer no other adapter of this load gives to the same prompt (a crossed
    answer is only visible for those)."""
    answered = [r for r in records if r["error"] is None and r["tokens"] is not None]
    crossed = [r for r in answered if r["text"] != expected[(r["model"], r["prompt"])]]
    pairs = {(r["model"], r["prompt"]) for r in records}
    distinguishable = sum(1 for r in records if all(expected[(r["model"], r["prompt"])] != expected[(m, p)]
                                                    for m, p in pairs if p == r["prompt"] and m != r["model"]))
    tokens = sum(r["tokens"] for r in answered)
    latency, ttft = [r["latency"] for r in answered] or [float("nan")], [r["ttft"] for r in answered] or [float("nan")]
    return {
        "sent": len(records), "answered": len(answered), "lost": len(records) - len(answered), "crossed": len(crossed),
        "equal_to_solo": len(answered) - len(crossed), "distinguishable": distinguishable, "tokens": tokens,
        "wall_s": wall, "tokens_per_s": tokens / wall,
        "p50_latency_s": statistics.median(latency), "p99_latency_s": percentile(latency, 0.99),
        "p50_ttft_s": statistics.median(ttft), "p99_ttft_s": percentile(ttft, 0.99),
        "mismatches": [{"model": r["model"], "prompt": r["prompt"], "text": r["text"],
                        "solo": expected[(r["model"], r["prompt"])]} for r in crossed][:5],
        "errors": [r["error"] for r in records if r["error"] is not None],
    }


def _bound(report: dict, adapters: int, popularity: str, key: str = "tokens_per_s") -> float | None:
    return next((b.get(key) for b in report["bounds"] if (b["adapters"], b["popularity"]) == (adapters, popularity)), None)


def with_prefill(bound: dict, tokens_per_request: float) -> float:
    """Tokens/s of full batches that also prefill their prompts: B rows generate T tokens each in one prefill of
    the B prompts plus T decode steps."""
    t = tokens_per_request
    return bound["rows"] * t / (bound["prefill_ms"] / 1e3 + t * bound["step_ms"] / 1e3)


def _run(report: dict, adapters: int, popularity: str, config: str) -> dict | None:
    return next((r for r in report["runs"] if (r["adapters"], r["popularity"], r["config"]) == (adapters, popularity, config)
                 and "tokens_per_s" in r), None)


def verdicts(report: dict) -> dict:
    """Each goal with the figures it is judged on; ``met`` is None where the run lacks what it needs."""
    lora = [r for r in report["runs"] if r["popularity"] != "mixed methods" and "tokens_per_s" in r]
    batched = [r for r in lora if r["config"] == "batched"]
    for r in report["runs"]:
        bound = next((b for b in report["bounds"] if (b["adapters"], b["popularity"]) == (r["adapters"], r["popularity"])), {})
        if "tokens_per_s" in r and "tokens_per_s" in bound and r["answered"]:
            r["fraction_of_bound"] = r["tokens_per_s"] / bound["tokens_per_s"]
            r["fraction_of_bound_with_prefill"] = r["tokens_per_s"] / with_prefill(bound, r["tokens"] / r["answered"])
    # judged on the bound that prefills: every server must run each prompt once before decoding it
    fractions = {f"{r['adapters']} {r['popularity']}": r["fraction_of_bound_with_prefill"]
                 for r in batched if "fraction_of_bound_with_prefill" in r}
    decode_only = {f"{r['adapters']} {r['popularity']}": r["fraction_of_bound"] for r in batched if "fraction_of_bound" in r}
    counts = sorted({r["adapters"] for r in batched})
    single, many = _run(report, counts[0], "single", "batched"), _run(report, counts[-1], "zipf", "batched")
    # the one-adapter reference: its run at the start and, when there is one, again at the end, averaged
    ones = [r["tokens_per_s"] for r in (single, _run(report, counts[0], AGAIN, "batched")) if r]
    one = statistics.mean(ones) if ones else None
    peaks: dict[int, float] = {}
    for r in batched:  # each count's highest run (the one-adapter run again at the end is a throughput reference)
        if r["popularity"] != AGAIN:
            peaks[r["adapters"]] = max(peaks.get(r["adapters"], 0.0), r["peak_rss_mib"])
    growth = max(peaks.values()) - min(peaks.values()) if len(peaks) > 1 else None  # needs two adapter counts
    # what the budget may hold: max_adapters adapters (each at most the largest) and the mixed-batch stacks: the base
    # row and max_adapters slots plus StackCache's headroom (one per 8), each slot padded to the largest rank per layer
    n = report["sizes"]["max_adapters"] + 1
    slots = n + max(1, n // 8)
    budget = (report["sizes"]["max_adapters"] * report.get("largest_adapter_mib", float("nan"))
              + slots * report.get("stack_slot_mib", float("nan")))
    full = [n for n in sorted(peaks) if n >= report["sizes"]["max_adapters"]]  # adapter counts that fill the budget
    on_disk = peaks[full[-1]] - peaks[full[0]] if len(full) > 1 else None
    server_runs = [r for r in report["runs"] if r["config"] != "HF PEFT" and "lost" in r]
    return {
        "throughput_vs_bound": {"fractions": fractions, "decode_only": decode_only, "goal": BOUND_GOAL,
                                "met": min(fractions.values()) >= BOUND_GOAL if fractions else None},
        "zipf_many_vs_one": {"adapters": counts[-1], "ratio": many["tokens_per_s"] / one if one and many else None,
                             "one_adapter_runs": ones, "goal": ZIPF_GOAL,
                             "met": many["tokens_per_s"] / one >= ZIPF_GOAL if one and many else None},
        "peak_rss_bounded": {"batched_peak_mib_by_adapters": peaks, "growth_mib": growth, "slots": slots,
                             "budget_mib": budget, "growth_with_adapters_on_disk_mib": on_disk,
                             "met": growth <= budget if growth is not None else None},
        "nothing_lost_or_crossed": {"lost": sum(r["lost"] for r in server_runs), "crossed": sum(r["crossed"] for r in server_runs),
                                    "requests": sum(r["sent"] for r in server_runs),
                                    "met": not any(r["lost"] or r["crossed"] for r in server_runs) and bool(server_runs)},
    }


def _f(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown(report: dict) -> str:
    size = report["sizes"]
    lines = [f"{size['clients']} clients x {size['requests']} requests, max_tokens {size['max_tokens']}, batch {size['max_batch']}, "
             f"--max-adapters {size['max_adapters']} (adapters loaded on demand), "
             f"{report['dtype']}, {report['threads']} torch threads, {report['cpu']}, load average at the end {_f(report['load_average'][0], 1)}; "
             f"whole run {report['wall_s'] / 60:.1f} min; {report.get('kernels', 'before the CPU kernel')}", "",
             "| adapters | popularity | config | answered | equal to solo | tokens/s | of bound | of bound with prefill | "
             "p50 / p99 latency (s) | p50 / p99 TTFT (s) | adapter loads | evictions | peak RSS (MiB) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["runs"]:
        head = f"| {r['adapters']} | {r['popularity']} | {r['config']} |"
        if "tokens_per_s" not in r:
            lines.append(f"{head} skipped: {r.get('skipped', '')} ||||||||||")
            continue
        fractions = " | ".join("-" if r.get(k) is None else f"{r[k]:.0%}" for k in ("fraction_of_bound", "fraction_of_bound_with_prefill"))
        lines.append(f"{head} {r['answered']}/{r['sent']} | {r['equal_to_solo']}/{r['answered']} | {r['tokens_per_s']:.1f} | "
                     f"{fractions} | {_f(r['p50_latency_s'])} / {_f(r['p99_latency_s'])} | "
                     f"{_f(r['p50_ttft_s'])} / {_f(r['p99_ttft_s'])} | {_f(r.get('adapter_loads'), 0)} | "
                     f"{_f(r.get('evictions'), 0)} | {r['peak_rss_mib']:.0f} |")
    lines += ["", "Bound (the server's decode step, B rows with the load's first adapters, timed before and after the "
              "load's runs in this run; step = median over both):", "",
              "| adapters | popularity | rows | distinct adapters | context | step (ms) | before / after (ms) | tokens/s | "
              "prefill of the rows' prompts (ms) |",
              "|---|---|---|---|---|---|---|---|---|"]
    for b in report["bounds"]:
        if "error" in b:
            lines.append(f"| {b['adapters']} | {b['popularity']} | failed: {b['error']} |||||||")
        else:
            lines.append(f"| {b['adapters']} | {b['popularity']} | {b['rows']} | {b['distinct_adapters']} | {b['context']} | "
                         f"{b['step_ms']:.0f} | {b['step_ms_before_after'][0]:.0f} / {b['step_ms_before_after'][1]:.0f} | {b['tokens_per_s']:.1f} | {b['prefill_ms']:.0f} ({b['prompt_tokens']} tokens) |")
    lines += _engine_table(report)
    g = report["goals"]
    fr = g["throughput_vs_bound"]["fractions"]
    lines += ["", "Goals:", "",
              f"- throughput >= {BOUND_GOAL:.0%} of the bound: {_met(g['throughput_vs_bound'])} "
              f"({', '.join(f'{k}: {v:.0%}' for k, v in fr.items())}). The bound: B rows that prefill their prompts in one "
              "pass and then decode in full B-row steps, both timed through the server's own code in this run (the "
              "table below); of the decode steps alone: "
              f"{', '.join(f'{k}: {v:.0%}' for k, v in g['throughput_vs_bound'].get('decode_only', {}).items())}",
              f"- {g['zipf_many_vs_one']['adapters']} adapters (Zipf) >= {ZIPF_GOAL}x one adapter: {_met(g['zipf_many_vs_one'])} "
              f"({_f(g['zipf_many_vs_one']['ratio'])}x the one-adapter server's "
              f"{' and '.join(_f(x, 1) for x in g['zipf_many_vs_one'].get('one_adapter_runs', []))} tokens/s"
              f"{' (first and last load of the run; their mean)' if len(g['zipf_many_vs_one'].get('one_adapter_runs', [])) > 1 else ''})",
              f"- peak RSS bounded by the budget: {_met(g['peak_rss_bounded'])} (batched server, growth from the fewest to the most "
              f"adapters {_f(g['peak_rss_bounded']['growth_mib'], 0)} MiB; budget {_f(g['peak_rss_bounded']['budget_mib'], 0)} MiB = "
              f"--max-adapters x the largest adapter + {g['peak_rss_bounded'].get('slots', '-')} stack slots (the base and each "
              f"adapter padded to the largest rank per layer, {_f(report.get('stack_slot_mib'), 1)} MiB each); between the "
              f"adapter counts that fill the budget: {_f(g['peak_rss_bounded'].get('growth_with_adapters_on_disk_mib'), 0)} MiB)",
              f"- nothing lost or crossed: {_met(g['nothing_lost_or_crossed'])} ({g['nothing_lost_or_crossed']['lost']} lost, "
              f"{g['nothing_lost_or_crossed']['crossed']} crossed of {g['nothing_lost_or_crossed']['requests']} server requests)"]
    lines += [f"- FAILED: {f}" for f in report["failures"]]
    return "\n".join(lines) + "\n"


def _engine_table(report: dict) -> list[str]:
    """Where each server run's time went, from the scheduler's own counters (/metrics, differences over the run):
    decode steps (their count, mean rows and mean time), prefill forwards, attaching and removing adapters, waiting
    with nothing to do, and the rest of the wall time (admission, bookkeeping, the HTTP side holding the GIL)."""
    runs = [r for r in report["runs"] if r.get("engine", {}).get("decode_steps")]
    if not runs:
        return []
    lines = ["", "Where each server run's time went (the scheduler thread's own counters from /metrics over the run; "
             "rest = wall - the four, i.e. admission, bookkeeping and waiting for the GIL):", "",
             "| adapters | popularity | config | wall (s) | decode (s) | steps x mean rows | ms per step | prefill (s) | "
             "prefill tokens | adapter changes (s) | loads (of which reused an evicted adapter's layers) | idle (s) | rest (s) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        e = r["engine"]
        rest = r["wall_s"] - e["decode_s"] - e["prefill_s"] - e["change_s"] - e["idle_s"]
        lines.append(f"| {r['adapters']} | {r['popularity']} | {r['config']} | {r['wall_s']:.1f} | {e['decode_s']:.1f} | "
                     f"{e['decode_steps']:.0f} x {e['decode_rows'] / e['decode_steps']:.1f} | "
                     f"{1e3 * e['decode_s'] / e['decode_steps']:.0f} | {e['prefill_s']:.1f} | {e['prefill_tokens']:.0f} | "
                     f"{e['change_s']:.1f} | {_f(r.get('adapter_loads'), 0)} ({_f(r.get('reuses'), 0)}) | {e['idle_s']:.1f} | {rest:.1f} |")
    return lines


def _met(goal: dict) -> str:
    return {True: "**met**", False: "**not met**", None: "not judged"}[goal["met"]]


def plot(report: dict, path: Path) -> None:
    """Tokens/s (left) and peak RSS (right) against adapters on disk; the one-adapter point starts both lines."""
    fig, (speed, memory) = panels(2)
    styles = {"batched": "o-", "one at a time": "s--", "HF PEFT": "^:"}
    for config, style in styles.items():
        for popularity in ("zipf", "uniform"):
            points = sorted((r["adapters"], r["tokens_per_s"], r["peak_rss_mib"]) for r in report["runs"]
                            if r["config"] == config and r["popularity"] in (popularity, "single") and "tokens_per_s" in r)
            if points:
                xs, ys, rss = zip(*points)
                speed.plot(xs, ys, style, label=f"{config}, {popularity}")
                memory.plot(xs, rss, style, label=f"{config}, {popularity}")
    for popularity in ("zipf", "uniform"):
        points = sorted((b["adapters"], b["tokens_per_s"]) for b in report["bounds"]
                        if b["popularity"] in (popularity, "single") and "tokens_per_s" in b)
        if points:
            speed.plot(*zip(*points), "k-" if popularity == "zipf" else "k--", alpha=0.5, label=f"decode bound, {popularity}")
    again = [(r["adapters"], r["tokens_per_s"]) for r in report["runs"]
             if r["popularity"] == AGAIN and r["config"] == "batched" and "tokens_per_s" in r]
    if again:  # the one-adapter reference measured again at the end: how far one run of it can move
        speed.plot(*zip(*again), "k*", markersize=10, label="batched, one adapter, again at the end")
    for ax, title in ((speed, "generated tokens/s"), (memory, "peak RSS of the serving process (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("adapters on disk")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    speed.legend(fontsize=7)
    save_figure(fig, path)
