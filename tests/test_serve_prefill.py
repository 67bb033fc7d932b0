"""Chunked prefill: newcomers' prompts enter the cache at most ``prefill_chunk`` tokens per scheduler step, between
decode steps. Driven step by step on the tiny random Llama of test_serve.py, against each adapter generating alone
(``generate(do_sample=False)``)."""

from __future__ import annotations

import math

import torch
from test_serve import _scheduler, _seq, adapters_dir, ref, solo, tok  # noqa: F401  (fixtures)

from peftkit.serve.prefill import PrefillJob, plan_step
from peftkit.tuners.base import BASE


def _job(length: int, done: int = 0, virtual: int = 0) -> PrefillJob:
    class Seq:
        context = list(range(length))

    job = PrefillJob(Seq(), virtual=virtual)  # type: ignore[arg-type]
    job.done = done
    if done:
        job.batch = object()  # type: ignore[assignment]  (started: continues in chunks)
    return job


def test_plan_counts_padding_short_prompts_first_long_ones_always_progress():
    # 4 short newcomers of 10, 30, 20, 5 tokens and a budget of 64: a group costs rows x longest, so {10, 30} (60)
    # fit and 20 more would make 3 x 30 = 90; the third waits for the next step (it fits a budget whole), and so does
    # the fourth, behind it
    a, b, c, d = _job(10), _job(30), _job(20), _job(5)
    plan = plan_step([a, b, c, d], 64)
    assert plan.group == [a, b] and plan.chunks == [] and plan.cost == 60
    # one longer than the budget is prefilled in chunks; while it is, the group gets half the budget (32), so {10}
    long = _job(100)
    plan = plan_step([long, a, b, d], 64)
    assert plan.group == [a] and plan.chunks == [(long, 54)] and plan.cost == 64
    # short ones do not wait for a long one's chunks, and two long ones go in arrival order
    long2 = _job(300)
    plan = plan_step([long, long2, _job(5)], 64)
    assert len(plan.group) == 1 and plan.chunks == [(long, 59)]
    # a started job continues with its remaining tokens; the group is not held back beyond what it needs
    started, fresh = _job(200, done=180), _job(30)
    plan = plan_step([started, fresh], 64)
    assert plan.chunks == [(started, 20)] and plan.group == [fresh] and plan.cost == 50
    # a budget of 1 still moves a long prompt
    assert plan_step([_job(5), _job(1)], 1).chunks[0][1] == 1


def test_plan_counts_prompt_tuning_virtual_tokens():
    # a prompt-tuning newcomer feeds its 8 virtual tokens too: with it, a group of {10 + 8, 30} costs 2 x (8 + 30) = 76
    # (each row gets the widest front and the longest context), over a budget of 64 that {10, 30} alone fits
    prompt, plain, short = _job(10, virtual=8), _job(30), _job(10)
    assert plan_step([short, plain], 64).group == [short, plain]
    plan = plan_step([prompt, plain], 64)
    assert plan.group == [prompt] and plan.cost == 18
    # 60 context tokens and 8 virtual ones are longer than the budget: chunks, the first one 64 - 8 = 56 tokens long
    long = _job(60, virtual=8)
    plan = plan_step([long], 64)
    assert plan.chunks == [(long, 56)] and plan.cost == 64
    # once started, the front is in its cache: later chunks are context only
    started = _job(60, done=56, virtual=8)
    assert started.front == 0 and plan_step([started], 64).cost == 4
    # a budget smaller than the front still moves the prompt by one token a step (that step costs the front too)
    assert plan_step([_job(5, virtual=8)], 4).chunks[0][1] == 1 and plan_step([_job(5, virtual=8)], 4).cost == 9


def _record_forwards(registry) -> list[tuple[int, int]]:
    """Every forward's (rows, tokens per row), in order."""
    calls: list[tuple[int, int]] = []
    forward = registry.forward

    def recording(**inputs):
        calls.append(tuple(inputs["input_ids"].shape))
        return forward(**inputs)

    registry.forward = recording
    return calls


def test_long_prompt_in_chunks_equals_solo_and_decode_rows_keep_going(adapters_dir, tok, solo):
    chunk = 16
    sched, registry = _scheduler(adapters_dir, tok, max_batch_size=4, prefill_chunk=chunk)
    calls = _record_forwards(registry)
    runner, _ = _seq(tok, "a", tok("Once upon a time").input_ids, 40)
    long_ids = torch.randint(0, 49152, (100,), generator=torch.Generator().manual_seed(3)).tolist()
    newcomer, _ = _seq(tok, "b", long_ids, 6)
    sched.submit(runner)
    sched.step()
    sched.step()
    before, first_call = len(runner.output_ids), len(calls)
    sched.submit(newcomer)
    steps = 0
    while not newcomer.output_ids:
        sched.step()
        steps += 1
    # 100 prompt tokens at 16 per step: 7 steps, each of which also decoded the running row
    assert steps == math.ceil(100 / chunk) == 7
    assert len(runner.output_ids) - before == steps
    assert all(rows * width <= chunk for rows, width in calls if width > 1), calls  # no prefill forward over budget
    widths = [width for rows, width in calls[first_call:] if width > 1]
    assert widths == [16] * 6 + [4]  # the last chunk is what is left
    while sched.load["running"] or sched.load["waiting"]:
        sched.step()
    assert tuple(newcomer.output_ids) == solo("b", tuple(long_ids), 6)
    assert tuple(runner.output_ids) == solo("a", tuple(tok("Once upon a time").input_ids), 40)
    stats = sched.summary()
    assert stats["decode_rows"] == sum(rows for rows, width in calls if width == 1)
    assert stats["mean_rows_per_decode_step"] == stats["decode_rows"] / stats["decode_steps"] > 1
    assert stats["prefill_tokens"] == len(tok("Once upon a time").input_ids) + 100


def test_newcomers_beyond_the_budget_wait_for_later_steps_in_order(adapters_dir, tok, solo):
    """Many short newcomers at once: each step prefills what fits (padding counted), all join, all equal solo."""
    sched, registry = _scheduler(adapters_dir, tok, max_batch_size=8, prefill_chunk=24)
    calls = _record_forwards(registry)
    jobs = [(["a", "b", "c", BASE][i % 4], f"Request {i}" + " again" * i, 5) for i in range(6)]
    seqs = [_seq(tok, adapter, tok(text).input_ids, n)[0] for adapter, text, n in jobs]
    sched.submit(*seqs)
    while sched.load["running"] or sched.load["waiting"]:
        sched.step()
    assert all(rows * width <= 24 for rows, width in calls if width > 1), calls
    for seq, (adapter, text, n) in zip(seqs, jobs):
        assert tuple(seq.output_ids) == solo(adapter, tuple(tok(text).input_ids), n)
    assert sched.stats["max_rows"] >= 3


def test_a_failing_chunk_fails_only_its_request(adapters_dir, tok, solo):
    chunk, poison = 8, 4242
    sched, registry = _scheduler(adapters_dir, tok, max_batch_size=4, prefill_chunk=chunk)
    forward = registry.forward

    def faulty(**inputs):
        if (inputs["input_ids"] == poison).any():
            raise RuntimeError("poisoned chunk")
        return forward(**inputs)

    registry.forward = faulty
    good, good_events = _seq(tok, "a", tok("Hello there").input_ids, 12)
    bad_ids = list(range(100, 120)) + [poison] + list(range(120, 130))  # the poison is in the third chunk
    bad, bad_events = _seq(tok, "c", bad_ids, 5)
    sched.submit(good)
    sched.step()
    sched.submit(bad)
    while sched.load["running"] or sched.load["waiting"]:
        sched.step()
    assert [e.kind for e in bad_events] == ["error"] and "poisoned chunk" in bad_events[0].error
    assert bad.output_ids == [] and good_events[-1].kind == "finish"
    assert tuple(good.output_ids) == solo("a", tuple(tok("Hello there").input_ids), 12)


def test_a_failed_decode_step_prefills_the_rows_again_in_chunks(adapters_dir, tok, solo):
    """A transient decode failure sends every row back to (chunked) prefill; their outputs are unchanged."""
    sched, registry = _scheduler(adapters_dir, tok, max_batch_size=4, prefill_chunk=8)
    forward, calls = registry.forward, {"decode": 0}

    def flaky(**inputs):
        if inputs["input_ids"].shape[1] == 1:
            calls["decode"] += 1
            if calls["decode"] == 4:
                raise RuntimeError("transient")
        return forward(**inputs)

    registry.forward = flaky
    jobs = [("a", "A first prompt that is long enough to need chunks", 10), ("b", "Short", 10)]
    seqs = [_seq(tok, adapter, tok(text).input_ids, n)[0] for adapter, text, n in jobs]
    sched.submit(*seqs)
    while sched.load["running"] or sched.load["waiting"]:
        sched.step()
    assert sched.stats["recoveries"] == 1
    for seq, (adapter, text, n) in zip(seqs, jobs):
        assert tuple(seq.output_ids) == solo(adapter, tuple(tok(text).input_ids), n)


def test_a_request_cancelled_while_prefilling_frees_its_place(adapters_dir, tok, solo):
    sched, _ = _scheduler(adapters_dir, tok, max_batch_size=1, prefill_chunk=8)
    long, long_events = _seq(tok, "a", list(range(100, 140)), 5)
    after, _ = _seq(tok, "b", tok("Next").input_ids, 4)
    sched.submit(long, after)
    sched.step()
    sched.step()
    assert sched.load == {"running": 1, "prefilling": 1, "waiting": 1}
    sched.cancel(long)
    while sched.load["running"] or sched.load["waiting"]:
        sched.step()
    assert long.output_ids == [] and long_events == []
    assert tuple(after.output_ids) == solo("b", tuple(tok("Next").input_ids), 4)
