"""The paper-comparison benchmarks run end to end in --quick mode, so they cannot rot between full runs."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
sys.path.insert(0, str(BENCH))  # the scripts' variant lists are the reference for what a report must hold


def run_quick(script: str, out: Path) -> dict:
    subprocess.run([sys.executable, str(BENCH / script), "--quick", "--out", str(out)], check=True, timeout=900, capture_output=True)
    assert (out / script.replace(".py", ".png")).read_bytes()[:8] == PNG_MAGIC
    assert (out / script.replace(".py", ".md")).read_text().startswith(("|", "**"))
    return json.loads((out / script.replace(".py", ".json")).read_text())


@pytest.mark.slow
def test_methods_glue_quick(tmp_path: Path) -> None:
    import methods_glue

    report = run_quick("methods_glue.py", tmp_path)
    rows = {(r["task"], r["variant"]): r for r in report["rows"]}
    assert set(rows) == {(t, v) for t in ("sst-2", "rte") for v in methods_glue.VARIANTS}
    hidden, layers, r = 384, 6, 8
    for task in ("sst-2", "rte"):
        row = lambda v: rows[(task, v)]  # noqa: E731
        # parameter counts from the formulas: LoRA r(d_in + d_out) per matrix on query and value of every layer
        assert row("lora-qv")["trainable_params"] == layers * 2 * r * (hidden + hidden) == 73_728
        assert row("hf-lora-qv")["trainable_params"] == row("lora-qv")["trainable_params"]
        assert row("prompt")["trainable_params"] == 20 * hidden
        assert row("prefix")["trainable_params"] == 20 * 2 * layers * hidden  # a key and a value per layer
        assert row("full")["trainable_params"] == row("full")["model_params"]
        assert all(rows[(task, v)]["head_params"] == hidden * 2 + 2 for v in methods_glue.VARIANTS)
        # adapter files hold the adapter and the head: tiny next to the full model
        for v in methods_glue.VARIANTS:
            if v != "full":
                assert row(v)["file_bytes"] < row("full")["file_bytes"] / 50
                assert row(v)["file_bytes"] >= 4 * (row(v)["trainable_params"] + row(v)["head_params"])
        for v in methods_glue.VARIANTS:
            assert 0.0 <= row(v)["accuracy_mean"] <= 1.0 and row(v)["peak_rss_mib"] > 100
    assert all(run["eval_examples"] == 32 and run["steps"] == 2 for run in report["runs"])
    assert not (tmp_path / "methods_glue.partial.jsonl").exists()  # a finished benchmark leaves nothing to resume


def test_methods_glue_resumes_finished_runs(tmp_path: Path) -> None:
    """Runs recorded before an interruption are reused only when every job argument matches; a torn line is skipped."""
    import methods_glue

    path = tmp_path / "methods_glue.partial.jsonl"
    job = dict(variant="bitfit", task="rte", seed=1, lr=1e-3, steps=30, batch=32, max_eval=None)
    result = {"accuracy": 0.6, "first_loss": 0.7, "last_loss": 0.65, "train_s": 12.0}
    methods_glue.FinishedRuns(path).add(job, result)
    with path.open("a") as f:
        f.write('{"job": "cut short by a ki')  # what a kill in the middle of a write leaves
    finished = methods_glue.FinishedRuns(path)
    assert finished.get(dict(reversed(list(job.items())))) == result  # argument order does not matter
    assert finished.get({**job, "seed": 2}) is None and finished.get({**job, "lr": 3e-3}) is None
    logs: list[str] = []
    assert methods_glue.run_all([job], 1, 1, logs.append, finished) == [result]  # nothing spawned
    assert logs[0].startswith("reusing 1 of 1 runs") and "accuracy 0.600" in logs[1]
    finished.forget()
    assert not path.exists()


@pytest.mark.slow
def test_latency_quick(tmp_path: Path) -> None:
    import latency

    report = run_quick("latency.py", tmp_path)
    cases = {(r["case"], r["variant"]): r for r in report["rows"]}
    assert set(cases) == {(c, v) for c in ("forward 1x128", "decode 1x1 (cache 128)") for v in latency.VARIANTS}
    assert all(r["ms"] > 0 for r in report["rows"])
    assert all(cases[(c, "base")]["ratio"] == 1.0 for c in ("forward 1x128", "decode 1x1 (cache 128)"))
    # every variant really changes the model (a no-op adapter would make its latency meaningless)
    assert set(report["max_abs_logit_difference_from_base"]) == set(latency.VARIANTS) - {"base"}
    assert min(report["max_abs_logit_difference_from_base"].values()) > 1e-4


def _tfew(tmp_path: Path, *extra: str) -> dict:
    subprocess.run([sys.executable, str(BENCH / "tfew_table.py"), "--quick", "--tasks", "rte", "--threads", "1", "--out", str(tmp_path), *extra],
                   check=True, timeout=900, capture_output=True)
    assert (tmp_path / "tfew_table.png").read_bytes()[:8] == PNG_MAGIC
    assert not (tmp_path / "tfew_table.partial.jsonl").exists()
    return json.loads((tmp_path / "tfew_table.json").read_text())


@pytest.mark.slow
def test_tfew_table_quick(tmp_path: Path) -> None:
    import tfew_table

    report = _tfew(tmp_path)
    rows = {r["condition"]: r for r in report["rows"]}
    assert set(rows) == {"zero-shot", *tfew_table.CONDITIONS}
    layers, hidden, kv, ffn, r = 30, 576, 192, 1536, 8  # SmolLM2-135M: 3 KV heads of 64
    assert rows["ia3-tfew"]["trainable_params"] == rows["ia3-lm"]["trainable_params"] == layers * (kv + kv + ffn) == 57_600
    assert rows["lora-lm"]["trainable_params"] == layers * r * ((hidden + hidden) + (hidden + kv)) == 460_800
    assert all(0 <= row["accuracy_mean"] <= 1 and row["shots"] in (0, 4) for row in rows.values())
    assert report["dev_sizes"] == {"rte": 8} and "| (IA)^3, L_LM + L_UL + L_LN | 4 |" in (tmp_path / "tfew_table.md").read_text()


def test_tfew_table_resumes_without_rerunning(tmp_path: Path) -> None:
    """Every run already in the partial file: the report is written from it, no model is loaded or trained."""
    from report import FinishedRuns

    import tfew_table

    finished = FinishedRuns(tmp_path / "tfew_table.partial.jsonl")
    result = {"accuracy": 0.5, "accuracy_norm": 0.625, "dev_loss": 1.0, "trainable_params": 7, "train_s": 3.0}
    finished.add({"kind": "zero-shot", "task": "rte", "max_eval": 8}, {**result, "trainable_params": 0, "train_s": 0.0})
    for condition, settings in tfew_table.CONDITIONS.items():
        finished.add({"kind": "train", "task": "rte", "condition": condition, "shots": 4, "seed": 0, "lr": settings["lr"],
                      "steps": 1, "max_eval": 8}, result)
    report = _tfew(tmp_path)
    assert [r["accuracy_norm"] for r in report["runs"]] == [0.625] * 4 and report["wall_s"] < 30


def _lora_table(tmp_path: Path, *args: str) -> dict:
    subprocess.run([sys.executable, str(BENCH / "lora_tables.py"), "--quick", "--threads", "1", "--out", str(tmp_path), *args],
                   check=True, timeout=900, capture_output=True)
    name = "lora_" + args[args.index("--table") + 1]
    assert (tmp_path / f"{name}.png").read_bytes()[:8] == PNG_MAGIC and not (tmp_path / f"{name}.partial.jsonl").exists()
    return json.loads((tmp_path / f"{name}.json").read_text())


@pytest.mark.slow
def test_lora_targets_table_quick_has_one_budget(tmp_path: Path) -> None:
    import lora_tables

    report = _lora_table(tmp_path, "--table", "targets", "--models", "minilm")
    rows = {r["variant"]: r for r in report["rows"]}
    assert list(rows) == list(lora_tables.TARGETS["minilm"])
    # every variant: 6 layers x 8 x (384 + 384) LoRA parameters, plus the classifier head (384 x 2 + 2)
    assert {r["trainable_params"] for r in rows.values()} == {6 * 8 * 768 + 770}


def test_smollm2_budgets_are_equal_by_construction() -> None:
    import lora_tables

    cost = {"q": 576 + 576, "o": 576 + 576, "k": 576 + 192, "v": 576 + 192}  # parameters per unit of rank
    budgets = {v: sum(cost[t] * r for t, r in ranks.items()) for v, ranks in lora_tables.TARGETS["smollm2"].items()}
    assert set(budgets.values()) == {9216}
    settings = lora_tables.lora_settings("smollm2", {"q": 2, "k": 3, "v": 3, "o": 2})
    assert settings["r"] == 2 and settings["method_options"] == {"rank_pattern": {"k_proj": 3, "v_proj": 3}, "alpha_pattern": {"k_proj": 6, "v_proj": 6}}
    # --alpha: one alpha for every rank (the paper's convention in its rank table), so no alpha pattern
    fixed = lora_tables.lora_settings("smollm2", {"q": 1, "v": 1}, alpha=16)
    assert fixed["r"] == 1 and fixed["alpha"] == 16 and fixed["method_options"] == {}
    fixed = lora_tables.lora_settings("smollm2", {"q": 2, "k": 3}, alpha=16)
    assert fixed["method_options"] == {"rank_pattern": {"k_proj": 3}}


@pytest.mark.slow
def test_lora_rank_table_quick_with_figure3(tmp_path: Path) -> None:
    report = _lora_table(tmp_path, "--table", "rank", "--models", "minilm", "--ranks", "8", "64")
    assert [r["variant"] for r in report["rows"]] == ["q r=8", "q r=64", "q,v r=8", "q,v r=64"]
    phi = report["figure3"]["minilm"]
    assert len(phi["modules"]) == 12 and all(0 <= m["phi_1_jmax"] <= 1 for m in phi["modules"])
    assert (tmp_path / "lora_rank_phi-minilm.png").read_bytes()[:8] == PNG_MAGIC
    # --render writes the same table (and a chart) again from the figures alone
    table = (tmp_path / "lora_rank.md").read_text()
    (tmp_path / "lora_rank.png").unlink()
    subprocess.run([sys.executable, str(BENCH / "lora_tables.py"), "--render", str(tmp_path / "lora_rank.json")], check=True, capture_output=True)
    assert (tmp_path / "lora_rank.md").read_text() == table and (tmp_path / "lora_rank.png").read_bytes()[:8] == PNG_MAGIC


@pytest.mark.slow
def test_qlora_formats_quick_bits_per_weight(tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(BENCH / "qlora_formats.py"), "--quick", "--models", "minilm", "--threads", "1", "--out", str(tmp_path)],
                   check=True, timeout=900, capture_output=True)
    report = json.loads((tmp_path / "qlora_formats.json").read_text())
    rows = {r["format"]: r for r in report["rows"]}
    assert list(rows) == ["fp32", "int8", "fp4", "nf4", "nf4+dq"]
    # blocks of 64: 4 bits + one fp32 constant per block = 4.5; double quantization: 8-bit constants + one fp32 per
    # 256 blocks = 4 + 8/64 + 32/(64*256) = 4.127, plus each layer's small code tables, which weigh more in MiniLM's
    # 384 x 384 layers than in a 7B model's; int8: 8 + one fp32 scale per row of 384
    assert rows["fp32"]["bits_per_param"] is None
    assert rows["nf4"]["bits_per_param"] == pytest.approx(4.5, abs=0.01) and rows["fp4"]["bits_per_param"] == pytest.approx(4.5, abs=0.01)
    assert 4.127 <= rows["nf4+dq"]["bits_per_param"] < 4.2 and rows["nf4"]["bits_per_param"] - rows["nf4+dq"]["bits_per_param"] > 0.3
    assert rows["int8"]["bits_per_param"] == pytest.approx(8 + 32 / 384, abs=0.05)
    # before training the adapter is a no-op: fp32 scores the base itself, and the 4-bit formats differ from it
    assert all(0 <= r["accuracy_mean"] <= 1 and 0 <= r["before_accuracy_mean"] <= 1 for r in rows.values())
    assert (tmp_path / "qlora_formats.png").read_bytes()[:8] == PNG_MAGIC


def _tiny_llama(folder: Path) -> Path:
    """A 2-layer random Llama with SmolLM2's tokenizer and chat template: the serving benchmark's mechanics in seconds."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import peftkit as pk

    tok = pk.load_tokenizer("smollm2-135m")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.mark.slow
def test_serve_load_quick(tmp_path: Path) -> None:
    """Every configuration of the serving benchmark runs against real server processes (the mixed-methods one
    included); the figures are consistent with the records and plans they come from; nothing is lost or crossed."""
    import serve_load
    from serve_clients import make_plan

    model = _tiny_llama(tmp_path / "tiny")
    done = subprocess.run([sys.executable, str(BENCH / "serve_load.py"), "--quick", "--model", str(model), "--threads", "1",
                           "--out", str(tmp_path)], timeout=900, capture_output=True, text=True)
    assert (tmp_path / "serve_load.png").read_bytes()[:8] == PNG_MAGIC
    report = json.loads((tmp_path / "serve_load.json").read_text())
    assert (tmp_path / "serve_load.md").read_text().startswith("4 clients x 2 requests, max_tokens 8, batch 4")
    assert "Where each server run's time went" in (tmp_path / "serve_load.md").read_text()
    size = serve_load.SIZES["quick"]
    configs = ("batched", "one at a time", "HF PEFT")
    runs = {(r["adapters"], r["popularity"], r["config"]): r for r in report["runs"]}
    loads = [(1, "single"), (8, "zipf"), (8, "uniform"), (1, "single again")]  # (the one-adapter load again, last)
    assert set(runs) == {(n, p, c) for n, p in loads for c in configs} | {(6, "mixed methods", c) for c in configs}
    assert [(r["adapters"], r["popularity"]) for r in report["runs"]][-3:] == [(1, "single again")] * 3
    bounds = {(b["adapters"], b["popularity"]): b for b in report["bounds"]}

    def plan_for(count: int, popularity: str) -> list:  # the script's plan, drawn again from its seed
        return make_plan([f"lora-{i:03d}" for i in range(count)], popularity.removesuffix(" again"), 4, 2,
                         serve_load.PROMPTS, report["seed"] + count, size["prompts_per_adapter"])

    resident: dict[tuple[int, str], int] = {}  # per server (adapter count, config): loads - evictions so far
    for count, popularity in loads:
        used = {name for client in plan_for(count, popularity) for name, _ in client}
        bound = bounds[(count, popularity)]
        assert bound["rows"] == size["max_batch"] and bound["tokens_per_s"] == pytest.approx(4 / (bound["step_ms"] / 1e3))
        # measured before and after the load's runs: the medians are over both
        assert len(bound["step_times_ms"]) == bound["steps"] == 2 * size["bound_steps"] and len(bound["prefill_times_ms"]) == 2
        assert bound["step_ms"] == pytest.approx(statistics.median(bound["step_times_ms"]))
        for config in configs:
            r = runs[(count, popularity, config)]
            sent = 4 * (size["serial_requests"] if config == "one at a time" else 2)  # one at a time: each client's first
            assert (r["sent"], r["answered"], r["lost"], r["crossed"], r["equal_to_solo"]) == (sent, sent, 0, 0, sent), r
            assert sent <= r["tokens"] <= sent * size["max_tokens"] and r["tokens_per_s"] == pytest.approx(r["tokens"] / r["wall_s"])
            assert r["fraction_of_bound"] == pytest.approx(r["tokens_per_s"] / bound["tokens_per_s"])
            t = r["tokens"] / sent  # per request: 4 rows each prefill once, then decode t steps
            with_prefill = 4 * t / (bound["prefill_ms"] / 1e3 + t * bound["step_ms"] / 1e3)
            assert r["fraction_of_bound_with_prefill"] == pytest.approx(r["tokens_per_s"] / with_prefill)
            assert r["fraction_of_bound_with_prefill"] > r["fraction_of_bound"]
            assert 0 < r["p50_ttft_s"] <= r["p99_ttft_s"] and r["p50_ttft_s"] <= r["p50_latency_s"] <= r["p99_latency_s"]
            assert r["peak_rss_mib"] > 100 and r["peak_rss_since"] == "run start"
            if config == "HF PEFT":  # a fresh process per load, adapters loaded as first used, never evicted
                assert r["adapter_loads"] == len(used) and r["evictions"] == 0
                continue
            # the scheduler's counters over the run: every token after a request's first came from a decode row
            e = r["engine"]
            assert e["decode_rows"] == r["tokens"] - r["answered"] and 0 < e["decode_steps"] <= e["decode_rows"]
            assert e["decode_s"] + e["prefill_s"] + e["change_s"] + e["idle_s"] <= r["wall_s"] + 0.5, e
            # the server's own /metrics: every adapter it had to load, and never more resident than --max-adapters
            key = (count, config)
            resident[key] = resident.get(key, 0) + r["adapter_loads"] - r["evictions"]
            assert 1 <= resident[key] <= size["max_adapters"] and r["evictions"] >= 0
            assert 0 <= r["reuses"] <= r["evictions"]  # a reuse takes one evicted adapter's place
            first = {client[0][0] for client in plan_for(count, popularity)}
            needed = used if config == "batched" else first
            assert r["adapter_loads"] >= (1 if popularity == "uniform" else len(needed))  # uniform follows zipf: some resident
    assert all(runs[(1, p, c)]["adapter_loads"] == 1 and runs[(1, p, c)]["evictions"] == 0
               for c in configs for p in ("single", "single again"))
    for config, per_client in (("batched", 2), ("one at a time", size["serial_requests"])):
        both = {name for p in ("zipf", "uniform") for client in plan_for(8, p) for name, _ in client[:per_client]}
        if len(both) > size["max_adapters"]:  # 8 adapters through a budget of 4: the excess was evicted
            assert sum(runs[(8, p, config)]["evictions"] for p in ("zipf", "uniform")) >= len(both) - size["max_adapters"]
    goals = report["goals"]
    ones = [runs[(1, p, "batched")]["tokens_per_s"] for p in ("single", "single again")]
    assert goals["zipf_many_vs_one"]["one_adapter_runs"] == ones
    assert goals["zipf_many_vs_one"]["ratio"] == pytest.approx(runs[(8, "zipf", "batched")]["tokens_per_s"] / statistics.mean(ones))
    mixed = [runs[(6, "mixed methods", c)] for c in ("batched", "one at a time")]
    assert "skipped" in runs[(6, "mixed methods", "HF PEFT")]
    assert [(r["answered"], r["crossed"]) for r in mixed] == [(8, 0), (4 * size["serial_requests"], 0)]  # every method in one batch, each as if alone
    assert done.returncode == 0 and report["failures"] == [] and goals["nothing_lost_or_crossed"]["met"]


def test_serve_load_goals_from_hand_figures(tmp_path: Path) -> None:
    """The goals and the rendered table are judged from the figures alone (hand-made runs, no model)."""
    import serve_load

    def run(adapters: int, popularity: str, config: str, tokens_per_s: float, rss: float, lost: int = 0, crossed: int = 0) -> dict:
        return {"adapters": adapters, "popularity": popularity, "config": config, "sent": 32, "answered": 32 - lost,
                "lost": lost, "crossed": crossed, "equal_to_solo": 32 - lost - crossed, "tokens": 1024 - 32 * lost,
                "tokens_per_s": tokens_per_s, "p50_latency_s": 1.0, "p99_latency_s": 2.0, "p50_ttft_s": 0.1, "p99_ttft_s": 0.2,
                "adapter_loads": 1, "evictions": 0, "peak_rss_mib": rss}

    def bound(adapters: int, popularity: str, step_ms: float) -> dict:
        return {"adapters": adapters, "popularity": popularity, "rows": 16, "distinct_adapters": 16, "context": 53,
                "steps": 16, "step_ms": step_ms, "step_ms_before_after": [step_ms, step_ms], "tokens_per_s": 16 / (step_ms / 1e3),
                "prefill_ms": 800.0, "prompt_tokens": 600}

    report = {"dtype": "float32", "sizes": serve_load.SIZES["full"], "largest_adapter_mib": 10.0, "stack_slot_mib": 12.0, "threads": 2, "window_ms": 50,
              "seed": 0, "cpu": "x", "load_average": [1.0], "wall_s": 60.0, "failures": [],
              "runs": [run(1, "single", "batched", 40.0, 1000), run(512, "zipf", "batched", 36.0, 1100),
                       run(512, "zipf", "one at a time", 10.0, 1000, crossed=1)],
              "bounds": [bound(1, "single", 200.0), bound(512, "zipf", 400.0)]}
    path = tmp_path / "r.json"
    path.write_text(json.dumps(report))
    goals = serve_load.verdicts(report)
    # judged with prefill: 16 rows x 32 tokens in 0.8 s + 32 steps of 0.2 s (0.4 s) = 71.1 (37.6) tokens/s
    with_prefill = {"1 single": 40 / (16 * 32 / (0.8 + 32 * 0.2)), "512 zipf": 36 / (16 * 32 / (0.8 + 32 * 0.4))}
    assert goals["throughput_vs_bound"]["fractions"] == pytest.approx(with_prefill) and not goals["throughput_vs_bound"]["met"]
    # of the decode steps alone: 40 / (16 / 0.2 s) = 50%; 36 / 40 = 90%
    assert goals["throughput_vs_bound"]["decode_only"] == {"1 single": 0.5, "512 zipf": 0.9}
    assert goals["zipf_many_vs_one"]["ratio"] == pytest.approx(0.9) and goals["zipf_many_vs_one"]["met"]
    # 100 MiB of growth within --max-adapters 16 x 10 MiB + (17 + 2 headroom) stack slots x 12 MiB
    assert goals["peak_rss_bounded"]["growth_mib"] == 100 and goals["peak_rss_bounded"]["budget_mib"] == 160 + 19 * 12 and goals["peak_rss_bounded"]["met"]
    assert goals["nothing_lost_or_crossed"] == {"lost": 0, "crossed": 1, "requests": 96, "met": False}
    # with prefill: 16 rows x 32 tokens in 0.8 s + 32 steps of 0.2 s = 71.1 tokens/s; 40 / 71.1 = 56%
    assert report["runs"][0]["fraction_of_bound_with_prefill"] == pytest.approx(40 / (16 * 32 / (0.8 + 32 * 0.2)))
    done = subprocess.run([sys.executable, str(BENCH / "serve_load.py"), "--render", str(path)], check=True, capture_output=True, text=True)
    assert "| 512 | zipf | batched | 32/32 | 32/32 | 36.0 | 90% | 96% |" in done.stdout  # 36 / (512 / (0.8 + 32 x 0.4))
    assert "- throughput >= 80% of the bound: **not met** (1 single: 56%, 512 zipf: 96%)" in done.stdout
    assert "- nothing lost or crossed: **not met** (0 lost, 1 crossed of 96 server requests)" in done.stdout


@pytest.mark.slow
def test_adapter_reads_quick(tmp_path: Path) -> None:
    """The reader benchmark times both readers beside decoding and alone, and its figures are each round's."""
    import adapter_reads

    model = _tiny_llama(tmp_path / "tiny")
    done = subprocess.run([sys.executable, str(BENCH / "adapter_reads.py"), "--model", str(model), "--threads", "1",
                           "--rows", "4", "--rounds", "2", "--steps", "3", "--out", str(tmp_path)],
                          timeout=600, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "adapter_reads.png").read_bytes()[:8] == PNG_MAGIC
    report = json.loads((tmp_path / "adapter_reads.json").read_text())
    assert set(report["read_ms"]) == set(report["gil_held_ms"]) == set(adapter_reads.READERS)
    assert all(v > 0 for v in report["read_ms"].values()) and all(v >= 0 for v in report["gil_held_ms"].values())
    decode = report["decode"]
    assert [len(v) for v in decode["rounds"].values()] == [2, 2, 2]
    base = [ms for ms, _ in decode["rounds"]["no reader"]]
    for mode in adapter_reads.READERS:
        per_read = [(ms - b) / max(1, n) for (ms, n), b in zip(decode["rounds"][mode], base)]
        assert decode[mode]["per_round"] == pytest.approx(per_read)
        assert decode[mode]["lost_ms_per_read"] == pytest.approx(statistics.median(per_read))
    assert (tmp_path / "adapter_reads.md").read_text().count("| peftkit views |") == 1


@pytest.mark.slow
def test_serve_ratio_quick(tmp_path: Path) -> None:
    """The many/one goal in ABBA rounds: fresh servers, the plans serve_load.py draws, each round's own ratio."""
    import serve_ratio
    from serve_clients import make_plan
    from serve_load import PROMPTS

    model = _tiny_llama(tmp_path / "tiny")
    done = subprocess.run([sys.executable, str(BENCH / "serve_ratio.py"), "--quick", "--rounds", "2", "--model", str(model),
                           "--threads", "1", "--out", str(tmp_path)], timeout=600, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "serve_ratio.png").read_bytes()[:8] == PNG_MAGIC
    report = json.loads((tmp_path / "serve_ratio.json").read_text())
    one, many = serve_ratio.ONE, serve_ratio.MANY
    assert [(r["round"], r["load"]) for r in report["runs"]] == [(0, one), (0, many), (1, many), (1, one)]
    used = {name for client in make_plan([f"lora-{i:03d}" for i in range(8)], "zipf", 4, 2, PROMPTS,
                                         report["seed"] + 8, serve_ratio.SIZES["quick"]["prompts_per_adapter"]) for name, _ in client}
    for r in report["runs"]:
        assert (r["sent"], r["answered"], r["lost"], r["crossed"]) == (8, 8, 0, 0), r
        assert r["tokens_per_s"] == pytest.approx(r["tokens"] / r["wall_s"])
        # a fresh server each run: every adapter of the plan is loaded on demand within it (some again after eviction)
        if r["load"] == one:
            assert (r["adapters"], r["adapter_loads"], r["evictions"]) == (1, 1, 0)
        else:
            assert r["adapters"] == 8 and r["adapter_loads"] >= len(used) and r["adapter_loads"] - r["evictions"] <= 4
    rates = {(r["round"], r["load"]): r["tokens_per_s"] for r in report["runs"]}
    per_round = [rates[(k, many)] / rates[(k, one)] for k in (0, 1)]
    assert report["ratio_per_round"] == pytest.approx(per_round)
    assert report["ratio_median"] == pytest.approx(statistics.median(per_round))
    assert report["met"] == (report["ratio_median"] >= 0.8)
    assert (tmp_path / "serve_ratio.md").read_text().count("| many, Zipf | 8 |") == 2


def test_serve_steps_quick(tmp_path: Path) -> None:
    """The step-time benchmark serves its loads in process and over HTTP, every request answered, and its figures
    add up: steps split into plain and fused ones, every token after a request's first from a decode row, the same
    tokens both ways (greedy), the bound's formula."""
    model = _tiny_llama(tmp_path / "tiny")
    done = subprocess.run([sys.executable, str(BENCH / "serve_steps.py"), "--model", str(model), "--threads", "1",
                           "--rows", "4", "--rounds", "2", "--steps", "4", "--clients", "4", "--requests", "3",
                           "--max-tokens", "6", "--load-rounds", "1", "--swap-rounds", "2", "--out", str(tmp_path)],
                          timeout=900, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "serve_steps.png").read_bytes()[:8] == PNG_MAGIC
    report = json.loads((tmp_path / "serve_steps.json").read_text())
    assert list(report["steps"]) == ["one adapter (q/v, r 8)", "one all-linear adapter (r 8)", "12 adapters mixed",
                                     "12 adapters mixed, PyTorch gather (PEFTKIT_CPU_KERNELS=0)"]
    assert report["kernels"].startswith(("CPU kernel lora_rows_", "CPU kernels unavailable"))
    for figures in report["steps"].values():
        for kind in ("plain", "fused", "prefill"):
            assert len(figures["per_round"][kind]) == 2 and figures[kind] == pytest.approx(statistics.median(figures["per_round"][kind]))
    assert list(report["runs"]) == ["one adapter (q/v, r 8)", "12 adapters mixed"]
    for label, both in report["runs"].items():
        (r,), (h,) = both["in_process"], both["http"]
        assert r["requests"] == 12 and 12 <= r["tokens"] <= 12 * 6 and r["tokens_per_s"] == pytest.approx(r["tokens"] / r["wall_s"])
        assert r["decode_rows"] == r["tokens"] - r["requests"]
        assert r["plain"]["steps"] + r["fused"]["steps"] == r["decode_steps"] > 0
        assert h["tokens"] == r["tokens"] and both["http_of_in_process"] == pytest.approx(h["tokens_per_s"] / r["tokens_per_s"])
        steps = report["steps"][label]
        t = r["tokens"] / r["requests"]
        assert r["bound_with_prefill"] == pytest.approx(4 * t / (steps["prefill"] / 1e3 + t * steps["plain"] / 1e3))
    assert "| 12 adapters mixed | 1 |" in (tmp_path / "serve_steps.md").read_text()
    swaps = report["swaps"]  # part 3: a load by each path per round, timed, and the step after it
    assert list(swaps) == ["refill in place (same layout)", "detach + attach (another layout)"]
    for figures in swaps.values():
        assert len(figures["load_ms"]) == len(figures["first_step_extra_ms"]) == 2 and min(figures["load_ms"]) > 0
        assert figures["median_load_ms"] == pytest.approx(statistics.median(figures["load_ms"]))
    assert "| refill in place (same layout) |" in (tmp_path / "serve_steps.md").read_text()
