"""peftkit train under torchrun on CPU (gloo, 2 processes): the same adapter as one process with the global batch,
under DDP and FSDP; a killed rank fails the run quickly, keeps the last checkpoint, and --resume finishes it."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from conftest import ALPACA_TINY

import peftkit
from peftkit import distributed as D
from peftkit import train as T

# 13 training examples (87 held out) in global batches of 4: every 4th micro-batch holds 1 example, so rank 1
# gets none and trains on a zero-weight stand-in; 2 micro-batches per step, a checkpoint every 2 steps.
# LoRA starts with a random B (init_lora_weights=false), not B = 0: with B = 0, A's first gradients are 0 and then
# tiny, and Adam divides them by their own size, so the rounding differences of packing 2 instead of 4 examples
# per row (~2e-8 in a gradient) grow to ~3e-5 in the weights. Measured in one process, splitting each batch in two
# without any distributed code: 2.8e-5 with B = 0, 3.7e-7 with a random B. Dropout 0: each rank draws its own masks.
RUN_ARGS = ("--max-steps", "8", "--grad-accum", "2", "--eval-fraction", "0.87", "--dropout", "0", "--lr", "0.01",
            "--method-option", "init_lora_weights=false", "--save-every", "2", "--keep-checkpoints", "10",
            "--eval-every", "8", "--num-samples", "1", "--sample-tokens", "4", "--quiet", "--dist-timeout", "60")
KILL_AT_STEP = 5  # rank 1 kills itself when it starts step 6: step-000004 is the last checkpoint
LAUNCH_TIMEOUT = 300  # seconds: bounds every torchrun launch, so a hang fails the test instead of stalling CI
TOLERANCE = 1e-5

# Runs as each rank's main script: rank 1 SIGKILLs itself (no cleanup, sockets closed by the kernel, as when the
# kernel's OOM killer or a lost machine ends it) when it starts step KILL_AT_STEP + 1, after noting the time.
KILLER = """\
import os, signal, sys, time
from peftkit import cli, train

step_at = int(os.environ["PEFTKIT_TEST_KILL_AT_STEP"])
original = train.TrainingRun.train_step

def train_step(self):
    if self.dist.rank == 1 and self.step == step_at:
        with open(os.environ["PEFTKIT_TEST_KILL_STAMP"], "w") as f:
            f.write(repr(time.time()))
        os.kill(os.getpid(), signal.SIGKILL)
    return original(self)

train.TrainingRun.train_step = train_step
sys.exit(cli.main(sys.argv[1:]))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(cwd: Path, *command: str, env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess, float]:
    """Two processes on this machine, on 127.0.0.1 and a free port; (result, time.time() when torchrun exited)."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                "--master-addr", "127.0.0.1", "--master-port", str(_free_port())]
    result = subprocess.run([*launcher, *command], cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True,
                            text=True, timeout=LAUNCH_TIMEOUT)
    return result, time.time()


def _train_args(tiny_lm: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--model", str(tiny_lm), "--data", str(ALPACA_TINY), "--out", str(out), *RUN_ARGS, *extra]


def _max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], skip: str = "rng.") -> float:
    keys = {k for k in a if not k.startswith(skip)}
    assert keys == {k for k in b if not k.startswith(skip)}
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in keys)


def _adapter(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "adapter_model.safetensors")


def _training_state(run: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(run / "checkpoints" / f"step-{step:06d}" / "training_state.safetensors")


def _metrics(run: Path, last_step: int | None = None) -> list[dict]:
    return [m for m in T.read_metrics(run / T.METRICS_FILE) if last_step is None or m["step"] <= last_step]


def _same_metrics(run: Path, reference: Path, last_step: int | None = None) -> None:
    got, want = _metrics(run, last_step), _metrics(reference, last_step)
    assert [(m["type"], m["step"]) for m in got] == [(m["type"], m["step"]) for m in want]
    assert [m["loss"] for m in got] == pytest.approx([m["loss"] for m in want], abs=TOLERANCE)
    assert [m.get("tokens") for m in got] == [m.get("tokens") for m in want]  # tokens summed over ranks


# ------------------------------------------------------------------------------------------------------ unit


def test_shard_splits_a_global_batch_into_contiguous_parts():
    assert [D.shard(range(8), r, 2) for r in range(2)] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert [D.shard([9, 4, 7], r, 2) for r in range(2)] == [[9, 4], [7]]
    assert [D.shard([5], r, 2) for r in range(2)] == [[5], []]
    for world in range(1, 5):
        for n in range(12):
            parts = [D.shard(list(range(n)), r, world) for r in range(world)]
            assert sum(parts, []) == list(range(n))  # the global batch, in order, nothing twice
            assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_one_process_needs_no_process_group(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    d = D.Distributed.setup("fsdp")
    assert (d.rank, d.world_size, d.is_main, d.enabled) == (0, 1, True, False)
    assert not torch.distributed.is_initialized() and D.is_main_process()
    assert d.sum([1, 2.5]) == [1.0, 2.5] and d.shard([3, 1, 2]) == [3, 1, 2]
    model = torch.nn.Linear(2, 2)
    runner = d.wrap(model)
    assert type(runner) is D.ForwardCall and runner.model is model
    assert torch.equal(runner(model, torch.ones(1, 2)), model(torch.ones(1, 2)))
    with pytest.raises(ValueError, match="strategy must be one of ddp, fsdp"):
        D.Distributed.setup("zero3")
    with pytest.raises(ValueError, match="strategy must be one of ddp, fsdp"):
        T.TrainConfig(strategy="zero3").resolved("sft")


def test_ranks_that_see_different_checkpoints_stop_together(monkeypatch):
    d = D.Distributed(rank=1, world_size=2)
    monkeypatch.setattr(D.Distributed, "gather", lambda self, value: [4.0, float(value)])  # rank 0 resumes at 4
    d.check_same("the step to resume from", 4, "share the run folder")
    with pytest.raises(ValueError, match=r"disagree on the step to resume from \(rank 0: 4, rank 1: 0\): share the"):
        d.check_same("the step to resume from", 0, "share the run folder")


def test_a_missing_rank_fails_after_the_timeout_instead_of_hanging(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")  # rank 1 never starts
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    start = time.time()
    with pytest.raises(torch.distributed.DistError, match="1/2 clients joined"):
        D.init_distributed(timeout=2)
    assert 2 <= time.time() - start < 30
    assert not torch.distributed.is_initialized()
    monkeypatch.delenv("MASTER_PORT")
    with pytest.raises(RuntimeError, match="MASTER_PORT not set: start several processes with torchrun"):
        D.init_distributed()


# -------------------------------------------------------------------------------------------- two processes


@dataclass
class Runs:
    reference: Path  # one process, batch 4: what 2 processes with batch 2 must reproduce
    killed: Path  # DDP, 2 processes with batch 2; rank 1 SIGKILLed when it starts step KILL_AT_STEP + 1
    killed_result: subprocess.CompletedProcess
    seconds_after_kill: float | None  # from rank 1's death to torchrun's exit
    resumed: Path  # a copy of the killed run, resumed on 2 processes under FSDP
    resumed_result: subprocess.CompletedProcess


@pytest.fixture(scope="module")
def runs(tiny_lm, tmp_path_factory) -> Runs:
    """The one-process reference runs in a subprocess while the two torchrun launches run (the tests' wall time
    is that of the launches). It gets one thread, as torchrun gives each of its processes: on 2 busy cores two
    threads per process are several times slower."""
    root = tmp_path_factory.mktemp("runs")
    one = [sys.executable, "-m", "peftkit.cli", *_train_args(tiny_lm, root / "reference", "--batch-size", "4")]
    reference = subprocess.Popen(one, cwd=root, env={**os.environ, "OMP_NUM_THREADS": "1"},
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        (root / "killer.py").write_text(KILLER)
        stamp = root / "killed_at"
        env = {"PEFTKIT_TEST_KILL_AT_STEP": str(KILL_AT_STEP), "PEFTKIT_TEST_KILL_STAMP": str(stamp)}
        killed, ended = _torchrun(root, str(root / "killer.py"), *_train_args(tiny_lm, root / "killed", "--batch-size", "2"), env=env)
        shutil.copytree(root / "killed", root / "resumed")
        resumed, _ = _torchrun(root, "-m", "peftkit.cli", "train", "--resume", str(root / "resumed"), "--strategy", "fsdp", "--quiet")
        _, err = reference.communicate(timeout=LAUNCH_TIMEOUT)
        assert reference.returncode == 0, err[-3000:]
    finally:
        reference.kill()
        reference.wait()
    seconds = ended - float(stamp.read_text()) if stamp.exists() else None
    return Runs(root / "reference", root / "killed", killed, seconds, root / "resumed", resumed)


@pytest.mark.slow
def test_ddp_two_processes_train_the_same_adapter_as_one(runs):
    run, reference = runs.killed, runs.reference
    # steps 1-4 ran on both ranks under DDP; the step-4 checkpoint's adapter is what one process saved there
    for step in (2, 4):
        folder = Path("checkpoints") / f"step-{step:06d}"
        assert _max_difference(_adapter(run / folder / "adapter"), _adapter(reference / folder / "adapter")) <= TOLERANCE
        # parameters and AdamW moments too, so resuming from either continues identically
        assert _max_difference(_training_state(run, step), _training_state(reference, step)) <= TOLERANCE
    _same_metrics(run, reference, last_step=4)
    state = json.loads((run / "checkpoints" / "step-000004" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["step"] == 4
    rng = _training_state(run, 4)
    assert torch.equal(rng["rng.torch"], rng["rng.torch.rank0"]) and "rng.torch.rank1" in rng


@pytest.mark.slow
def test_a_killed_rank_fails_the_run_quickly_and_keeps_the_last_checkpoint(runs, tiny_lm):
    run, result, seconds_after_kill = runs.killed, runs.killed_result, runs.seconds_after_kill
    assert result.returncode != 0, result.stderr[-3000:]
    assert seconds_after_kill is not None, f"rank 1 was never killed: {result.stderr[-3000:]}"
    # torchrun names the dead rank; the survivor failed on its next collective (or was stopped by torchrun)
    assert re.search(r"rank\s*:\s*1 \(local_rank: 1\)\s*\n\s*exitcode\s*:\s*-9", result.stderr), result.stderr[-3000:]
    assert "Signal 9 (SIGKILL)" in result.stderr
    assert seconds_after_kill < 45  # well before --dist-timeout 60: a closed connection fails at once
    # the last good checkpoint is complete and loads; nothing half-written, no final adapter
    assert [p.name for p in T.list_checkpoints(run)] == ["step-000002", "step-000004"]
    assert not list((run / "checkpoints").glob(".*.peftkit-*")) and not (run / "adapter").exists()
    base, _ = peftkit.load_model(str(tiny_lm))
    model = peftkit.PeftModel.from_pretrained(base, run / "checkpoints" / "step-000004" / "adapter", is_trainable=True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    state = T.load_checkpoint(run / "checkpoints" / "step-000004", model, optimizer)
    assert state["step"] == 4 and len(optimizer.state) == len(state["parameter_names"]) > 0


@pytest.mark.slow
def test_fsdp_resumes_the_killed_run_and_ends_with_the_one_process_adapter(runs):
    run, reference = runs.resumed, runs.reference
    assert runs.resumed_result.returncode == 0, runs.resumed_result.stderr[-3000:]
    # steps 5-8 ran sharded (FSDP fully_shard); the adapter gathered from the shards is complete and the same
    adapter, expected = _adapter(run / "adapter"), _adapter(reference / "adapter")
    assert adapter.keys() == expected.keys() and len(adapter) == 8  # lora_A, lora_B of q_proj, v_proj in 2 layers
    assert _max_difference(adapter, expected) <= TOLERANCE
    assert _max_difference(_training_state(run, 6), _training_state(reference, 6)) <= TOLERANCE  # written by FSDP
    _same_metrics(run, reference)
    assert (run / "samples.md").read_text() == (reference / "samples.md").read_text()  # generated under FSDP
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == summary["total_steps"] == 8
    assert json.loads((run / "checkpoints" / "step-000006" / "trainer_state.json").read_text())["world_size"] == 2
