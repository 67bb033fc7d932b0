"""The training loop: :class:`TrainingRun` builds a run from its config, trains, evaluates, checkpoints and
resumes; :func:`train` and :func:`resume` are its entry points."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import signal
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from .. import checkpoint, strict_json
from ..data import render_prompt
from ..device import resolve_device, resolve_precision, to_device
from ..distributed import Distributed, cuda_rng_state
from ..errors import SettingsError
from ..kbit_training import make_optimizer
from .config import TrainConfig, learning_rate, read_settings_file, resume_conflicts
from .generation import generate_texts
from .model import build_peft_config, load_base_model
from .run_folder import (
    ADAPTER_DIR,
    CHECKPOINTS_DIR,
    check_output_folder,
    CONFIG_FILE,
    METRICS_FILE,
    TrainResult,
    default_run_dir,
    list_checkpoints,
    load_checkpoint,
    read_metrics,
    save_checkpoint,
    trainable_parameters,
    write_samples,
)
from .task_data import BatchOrder, example_length, load_task_data, resolve_config
from .tasks import make_task
from .trackers import Tracker

@contextmanager
def _isolated_rng(device: torch.device) -> Iterator[None]:
    """Python's and torch's CPU random state (and ``device``'s, a GPU) are restored on exit, whatever the block drew."""
    state = random.getstate()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        try:
            yield
        finally:
            random.setstate(state)


class NonFiniteLossError(RuntimeError):
    """The loss or gradient became NaN or infinite; the last good checkpoint is kept."""


class TrainingInterrupted(RuntimeError):
    """Ctrl-C: a checkpoint was saved, ``peftkit train --resume`` continues."""


class TrainingRun:
    """One run: build everything from a config, train, evaluate, checkpoint, write the run folder.

    ``TrainingRun(config).fit()`` trains; ``TrainingRun.resume(run_dir).fit()`` continues a run from its newest
    checkpoint (settings from its ``config.yaml``, updated by ``overrides``). Under torchrun every rank builds the
    same run (see :mod:`peftkit.distributed`): each trains on its share of every batch, rank 0 writes and prints.
    """

    def __init__(self, config: TrainConfig, run_dir: str | os.PathLike | None = None, progress: bool = True, _resuming: bool = False) -> None:
        self.run_dir = Path(run_dir or config.out or default_run_dir(config.method))
        check_output_folder(self.run_dir, "--out")  # before any model loads
        if not _resuming and (self.run_dir / CONFIG_FILE).exists():
            raise FileExistsError(f"{self.run_dir} already holds a run: continue it with --resume {self.run_dir}, or pick another --out")
        # Building the run draws random numbers (adapter init, a new classifier head) from a stream seeded here, but
        # leaves the process's own random state as it was; fit() starts training from the state kept in _start_rng.
        self.dist = Distributed.setup(config.strategy, config.dist_timeout)
        self.device = resolve_device(config.device)  # after joining torchrun's group: its LOCAL_RANK GPU
        self.precision = resolve_precision(config.dtype, self.device, training=True)
        with _isolated_rng(self.device):
            random.seed(config.seed)
            torch.manual_seed(config.seed)
            self._build(config, progress)
            self._start_rng: tuple | None = (torch.get_rng_state(), random.getstate(), cuda_rng_state(self.device))
        self.dist.barrier()  # no rank writes into the run folder before every rank has checked it

    def _build(self, config: TrainConfig, progress: bool) -> None:
        self.config = resolve_config(config)
        # only the process that writes the run folder reports; a missing extra fails here, before any work
        self.tracker = Tracker(self.config.report_to if self.dist.is_main else "none", self.run_dir)
        self.progress = progress and self.dist.is_main
        self.config.out = str(self.run_dir)
        peft_config = build_peft_config(self.config)  # checked before the model loads
        if self.config.task == "seq-cls":  # the label set decides the classifier's size; tokenizing waits for batches
            self.data = load_task_data(self.config, tokenizer=None)
            self.config.labels = self.data.file_labels  # recorded in config.yaml: eval and resume map labels alike
            model, self.tokenizer = load_base_model(self.config, num_labels=len(self.data.label_names), device=self.device)
        else:
            model, self.tokenizer = load_base_model(self.config, device=self.device)
            self.data = load_task_data(self.config, self.tokenizer)
        from ..peft_model import get_peft_model

        torch.manual_seed(self.config.seed)  # the adapter's initial values depend on the seed only
        self.model = get_peft_model(model, peft_config)
        if self.config.target_modules is None:  # record the default targets the method chose
            self.config.target_modules = getattr(self.model.peft_config["default"], "target_modules", None)
        self.model.train()
        if self.dist.rank:  # its own dropout masks; rank 0 keeps the single-process random stream
            torch.manual_seed(self.config.seed + self.dist.rank)
        # every use of the model in training goes through the runner, so DDP / FSDP hooks run around it
        self.runner = self.dist.wrap(self.model)
        self.task = make_task(self.model, self.tokenizer, self.config, self.device, self.precision)
        if not self.data.eval and self.config.eval_every != 0:
            raise ValueError(f"no evaluation examples ({'; '.join(self.data.notes + self.data.bad_row_reports())}): "
                             "fix --eval-data, or pass --eval-every 0")
        self.params = list(trainable_parameters(self.model).values())
        if not self.params:
            raise ValueError(f"method {self.config.method!r} left no trainable parameter in {self.config.model}")
        if self.dist.enabled and self.config.strategy == "fsdp" and self.config.optim != "adamw":
            raise ValueError(f"--optim {self.config.optim} under --strategy fsdp: bitsandbytes' optimizers do not take "
                             "FSDP's sharded parameters; use --strategy ddp, or --optim adamw")
        self.optimizer = make_optimizer(self.config.optim, self.params, lr=self.config.lr, weight_decay=self.config.weight_decay)
        lengths = None
        if self.task.mode == "padded" and self.config.group_by_length:
            lengths = [example_length(e) for e in self.data.train]
        # one global batch of world * batch_size examples per micro-batch, as one process would read it
        self.order = BatchOrder(len(self.data.train), self.config.batch_size * self.dist.world_size, self.config.seed, lengths)
        c = self.config
        self.total_steps = c.max_steps or max(1, math.ceil(c.epochs * self.order.per_epoch / c.grad_accum))
        self.warmup_steps = int(c.warmup * self.total_steps) if c.warmup < 1 else int(c.warmup)
        # 0 turns evaluation (or checkpointing) off; None picks 4 evaluations per run, a checkpoint every <= 50 steps
        self.eval_every = c.eval_every if c.eval_every is not None else max(1, math.ceil(self.total_steps / 4))
        self.save_every = c.save_every if c.save_every is not None else min(50, self.eval_every or 50)
        self.step = 0
        self.tokens = 0
        self.train_seconds = 0.0
        self.eval_initial: dict[str, float] = {}
        self.eval_last: dict[str, float] = {}
        self.last_loss: float | None = None
        self._stop_requested = False  # set by the signal handler, on this process
        self._stop_agreed = False  # set after each step from every process's request: all stop at the same step

    @classmethod
    def resume(cls, run_dir: str | os.PathLike, overrides: dict[str, Any] | None = None, progress: bool = True) -> "TrainingRun":
        run_dir = Path(run_dir)
        path = run_dir / CONFIG_FILE
        if not path.exists():
            raise FileNotFoundError(f"--resume {run_dir}: no {CONFIG_FILE} there; is it a peftkit run folder?")
        saved = read_settings_file(path, "--resume: the run's")
        if conflicts := resume_conflicts(saved, overrides or {}):
            raise SettingsError(f"--resume {run_dir}: {'; '.join(conflicts)}: a resumed run keeps its model, adapter "
                                "shape and data; drop these flags, or start a new run with --out")
        config = TrainConfig.from_dict({**saved, **(overrides or {}), "out": str(run_dir)}, source=str(path))
        run = cls(config, run_dir, progress=progress, _resuming=True)
        run._restore()
        run.dist.check_same("the step to resume from", run.step, f"every process must read the same run folder "
                            f"{run_dir}: on several machines, put it on a file system they all share")
        if run.step >= run.total_steps and (run_dir / "summary.json").exists():  # written last, at the very end
            raise ValueError(
                f"{run_dir} finished all {run.total_steps} steps; to train further pass a larger --max-steps "
                "(or --epochs) with --resume"
            )
        return run

    # ----------------------------------------------------------------------------------------------------- state

    def _restore(self) -> None:
        for directory in reversed(list_checkpoints(self.run_dir)):
            try:
                state = load_checkpoint(directory, self.model, self.optimizer, self.dist)
            except (ValueError, KeyError, FileNotFoundError, OSError) as err:
                self._say(f"skipping unreadable checkpoint {directory}: {err}")
                continue
            self._start_rng = None  # load_checkpoint set the random state the run had at that step
            self.step = state["step"]
            self.tokens = state["tokens"]
            self.train_seconds = state["train_seconds"]
            self.eval_initial = state.get("eval_initial", {})
            self.eval_last = state.get("eval_last", {})
            self.last_loss = state.get("last_loss")
            self._truncate_metrics(self.step)
            saved_world = state.get("world_size", 1)
            if saved_world != self.dist.world_size:
                self._say(f"note: this run was saved by {saved_world} process(es) and continues on {self.dist.world_size}: "
                          f"a step now reads {self.dist.world_size * self.config.batch_size} examples instead of "
                          f"{saved_world * self.config.batch_size}")
            self._say(f"resuming {self.run_dir} from {directory.name} (step {self.step} of {self.total_steps})")
            return
        self._say(f"no checkpoint in {self.run_dir}: starting it from the beginning")
        self._truncate_metrics(-1)

    def _truncate_metrics(self, step: int) -> None:
        """Drop metric lines a killed run wrote after its last checkpoint (they are written again)."""
        path = self.run_dir / METRICS_FILE
        if not self.dist.is_main or not path.exists():
            return
        kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
        checkpoint.atomic_write(path, lambda tmp: Path(tmp).write_text("".join(line + "\n" for line in kept)))

    def _state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "micro_batch": self.step * self.config.grad_accum,
            "lr_schedule": {"step": self.step, "total": self.total_steps, "warmup": self.warmup_steps, "kind": self.config.schedule},
            "tokens": self.tokens,
            "train_seconds": self.train_seconds,
            "eval_initial": self.eval_initial,
            "eval_last": self.eval_last,
            "last_loss": self.last_loss,
            "world_size": self.dist.world_size,
        }

    def save_checkpoint(self) -> Path:
        directory = self.run_dir / CHECKPOINTS_DIR / f"step-{self.step:06d}"
        save_checkpoint(directory, self.model, self.optimizer, self._state(), self.dist)
        if self.dist.is_main:
            for old in list_checkpoints(self.run_dir)[: -self.config.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        self.dist.barrier()  # the checkpoint is complete on disk before any rank goes on
        return directory

    # ------------------------------------------------------------------------------------------------------ output

    def _say(self, message: str) -> None:
        if self.progress:
            from tqdm import tqdm

            tqdm.write(message, file=sys.stderr)

    def _log(self, record: dict[str, Any]) -> None:
        if not self.dist.is_main:
            return
        with open(self.run_dir / METRICS_FILE, "a") as f:
            f.write(strict_json.dumps(record) + "\n")
        self.tracker.log(record)

    def _write_config(self) -> None:
        if not self.dist.is_main:
            return
        import yaml

        text = yaml.safe_dump(self.config.to_dict(), sort_keys=False)
        checkpoint.atomic_write(self.run_dir / CONFIG_FILE, lambda tmp: Path(tmp).write_text(text))

    def evaluate(self) -> dict[str, float]:
        """*Collective*: scores on the whole evaluation split. Each rank evaluates its contiguous share and the
        parts are combined (sums added, predictions concatenated in rank order), so every rank returns the scores
        one process would compute. Under FSDP every rank runs as many forward passes as the largest share needs."""
        examples = self.data.eval
        mine = self.dist.shard(range(len(examples)))
        size = self.config.eval_batch_size
        largest = math.ceil(len(examples) / self.dist.world_size)  # the first share (shard gives it the remainder)
        batches = 0
        if self.dist.enabled and self.dist.strategy == "fsdp":
            if len(examples) < self.dist.world_size:  # a rank with no example has nothing to run its stand-ins on
                raise ValueError(f"{len(examples)} evaluation example(s) for {self.dist.world_size} processes under FSDP: "
                                 "give --eval-data more examples, or pass --eval-every 0")
            batches = math.ceil(largest / size)
        self.model.eval()
        try:
            part = self._no_grad(self.task.evaluate_parts, [examples[i] for i in mine], size, batches)
        finally:
            self.model.train()
        return self.task.scores(self.dist.combine(part))

    def _no_grad(self, fn: Any, *args: Any) -> Any:
        """``fn(*args)`` without gradients, through the runner (FSDP gathers the sharded weights around it)."""
        with torch.no_grad():
            return self.runner(fn, *args)

    def _eval_and_log(self) -> dict[str, float]:
        start = time.perf_counter()
        scores = self.evaluate()
        self._log({"type": "eval", "step": self.step, **scores})
        shown = ", ".join(f"{k} {v:.4f}" for k, v in scores.items() if k != "tokens")
        self._say(f"eval step {self.step}: {shown} ({time.perf_counter() - start:.1f} s)")
        return scores

    # ------------------------------------------------------------------------------------------------ training

    def _micro_batches(self) -> list[tuple[dict[str, torch.Tensor], float]]:
        """This step's micro-batches on this rank, each with a weight: 1, or 0 for a stand-in example that keeps
        the ranks in step when a short last batch of an epoch leaves this rank nothing."""
        first = self.step * self.config.grad_accum
        batches = []
        for k in range(first, first + self.config.grad_accum):
            indices = self.order(k)
            mine = self.dist.shard(indices)
            batches.append((self.task.collate([self.data.train[i] for i in mine or indices[:1]]), 1.0 if mine else 0.0))
        return batches

    def train_step(self) -> tuple[float, float, int]:
        """One optimizer update; returns (loss, gradient norm, useful tokens), over all ranks."""
        lr = learning_rate(self.step, self.total_steps, self.config.lr, self.warmup_steps, self.config.schedule)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        batches = self._micro_batches()
        world = self.dist.world_size
        count, tokens = self.dist.sum([
            sum(self.task.count(b) * w for b, w in batches), sum(int(b["num_real_tokens"]) * w for b, w in batches)
        ])
        # DDP / FSDP average gradients over ranks: dividing by count / world makes the average (1/count) sum
        total = torch.zeros((), device=self.device)
        for i, (batch, weight) in enumerate(batches):
            batch = to_device(batch, self.device)  # counted above on the host copy: no device sync
            with self.dist.gradient_sync(self.runner, sync=i == len(batches) - 1), self.task.attention():
                with self.precision.autocast(self.device):
                    loss = self.runner(self.task.loss_sum, batch) * weight / (max(count, 1) / world)
                loss.backward()
            total += loss.detach().float() / world
        # checked after the sum over ranks, so that every rank stops at the same step (one device sync per step)
        total, stop = self.dist.sum([float(total), float(self._stop_requested)])
        self._stop_agreed = stop > 0  # a signal to any rank stops all of them after this step
        if not math.isfinite(total):
            raise NonFiniteLossError(f"the loss became {total} at step {self.step + 1}")
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm)
        norm = float(self.dist.full({"norm": norm})["norm"])
        if not math.isfinite(norm):
            raise NonFiniteLossError(f"the gradient norm became {norm} at step {self.step + 1}")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return total, norm, int(tokens)

    def fit(self) -> TrainResult:
        """Train to the last step; write the adapter, metrics, plot, samples and summary into the run folder."""
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self._write_config()
        self.tracker.start(self.config.to_dict(), self.step)
        trainable, total = self.model.get_nb_trainable_parameters()
        self._say(
            f"peftkit train: {self.config.method} on {self.config.model}, task {self.data.task}, "
            f"{len(self.data.train)} training / {len(self.data.eval)} eval examples, {self.total_steps} steps, "
            f"trainable {trainable:,} of {total:,} ({100 * trainable / total:.3f}%), run folder {self.run_dir}"
        )
        self._say(f"  device: {self.device}, {self.precision.describe()}, optimizer {self.config.optim}")
        for note in self.data.notes:
            self._say(f"  {note}")
        if self.dist.is_main:  # skipped rows change what is trained on: said even with --quiet
            for report in self.data.bad_row_reports():
                print(f"peftkit train: warning: {report}", file=sys.stderr, flush=True)
        if self._start_rng is not None:
            torch.set_rng_state(self._start_rng[0])
            random.setstate(self._start_rng[1])
            if self._start_rng[2] is not None:
                torch.cuda.set_rng_state(self._start_rng[2], self.device)
        threads = torch.get_num_threads()
        if self.config.threads:  # on a shared machine fewer threads than cores can be much faster
            torch.set_num_threads(self.config.threads)
        try:
            samples_before = self._samples_before()
            if self.step == 0 and self.eval_every:
                self.eval_initial = self.eval_last = self._eval_and_log()
            with self._stop_signals_save():
                self._loop()
            return self._finish(samples_before, trainable, total)
        finally:
            torch.set_num_threads(threads)

    def _loop(self) -> None:
        from tqdm import tqdm

        bar = tqdm(total=self.total_steps, initial=self.step, desc="train", unit="step", disable=not self.progress, dynamic_ncols=True)
        try:
            while self.step < self.total_steps:
                start = time.perf_counter()
                try:
                    loss, norm, tokens = self.train_step()
                except NonFiniteLossError as err:
                    kept = list_checkpoints(self.run_dir)
                    where = f"the last good checkpoint is {kept[-1]}" if kept else "no checkpoint was saved before it"
                    raise NonFiniteLossError(
                        f"{err}: stopping. {where}. Lower --lr (now {self.config.lr:g}) or check the data, then "
                        f"resume with: peftkit train --resume {self.run_dir} --lr <lower>"
                    ) from None
                elapsed = time.perf_counter() - start
                self.train_seconds += elapsed
                self.tokens += tokens
                self.last_loss = loss
                lr = self.optimizer.param_groups[0]["lr"]
                self._log({"type": "train", "step": self.step, "loss": loss, "lr": lr, "grad_norm": norm,
                           "tokens": tokens, "tokens_per_s": tokens / elapsed, "seconds": elapsed})
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{self.tokens / self.train_seconds:.0f}")
                if self.eval_every and (self.step % self.eval_every == 0 or self.step == self.total_steps):
                    self.eval_last = self._eval_and_log()
                if self._stop_agreed:
                    saved = self.save_checkpoint()
                    raise TrainingInterrupted(
                        f"interrupted at step {self.step}: checkpoint {saved} saved. "
                        f"Continue with: peftkit train --resume {self.run_dir}"
                    )
                if self.save_every and (self.step % self.save_every == 0 or self.step == self.total_steps):
                    self.save_checkpoint()  # the last step too: --resume with a larger --max-steps continues from it
        finally:
            bar.close()

    @contextmanager
    def _stop_signals_save(self) -> Iterator[None]:
        """First Ctrl-C (or SIGTERM, what job schedulers send before killing): finish the current step, save a
        checkpoint, stop. A second one stops at once, unsaved."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum: int, frame: Any) -> None:
            if self._stop_requested:
                raise KeyboardInterrupt
            self._stop_requested = True
            name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
            self._say(f"{name}: saving a checkpoint after this step (send it again to stop at once, unsaved)")

        previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)

    # ------------------------------------------------------------------------------------------------- samples

    def _samples_before(self) -> list[dict[str, str]]:
        """Generations of the base model for a few held-out prompts (saved, so a resumed run reuses them)."""
        if self.data.task != "sft" or not self.config.num_samples:
            return []
        path = self.run_dir / "samples_before.json"
        if path.exists():
            return json.loads(path.read_text())["samples"]
        with self.model.disable_adapter():
            samples = self._generate_samples()
        if self.dist.is_main:
            checkpoint.save_json(path, {"samples": samples})
        return samples

    def _generate_samples(self) -> list[dict[str, str]]:
        records = self.data.eval_records[: self.config.num_samples]
        # conversations come with their prompt rendered (peftkit.data.chat_sample); instruction records get the template
        prompts = [r["rendered_prompt"] if "rendered_prompt" in r else render_prompt(r, self.config.template, self.tokenizer) for r in records]
        outputs = self._no_grad(generate_texts, self.model, self.tokenizer, prompts, self.config.sample_tokens, None, self.precision)
        return [{"prompt": p, "reference": r["output"], "output": o} for p, r, o in zip(prompts, records, outputs)]

    # -------------------------------------------------------------------------------------------------- finish

    def _finish(self, samples_before: list[dict[str, str]], trainable: int, total: int) -> TrainResult:
        adapter_dir = self.run_dir / ADAPTER_DIR
        self.dist.save_pretrained(self.model, adapter_dir)
        after = self._generate_samples() if samples_before else []
        result = TrainResult(
            run_dir=self.run_dir,
            adapter_dir=adapter_dir,
            steps=self.step,
            total_steps=self.total_steps,
            train_loss=self.last_loss,
            eval_initial=self.eval_initial,
            eval_final=self.eval_last,
            tokens_per_second=self.tokens / self.train_seconds if self.train_seconds else 0.0,
            train_seconds=self.train_seconds,
            trainable_parameters=trainable,
            total_parameters=total,
            mode=self.task.mode,
            skipped_rows=self.data.skipped_rows(),
        )
        if self.dist.is_main:
            if after:
                write_samples(self.run_dir / "samples.md", samples_before, after)
            from ..plots import plot_metrics
            from ..report import REPORT_FILE, SAMPLES_FILE, write_report

            plot_metrics(read_metrics(self.run_dir / METRICS_FILE), self.run_dir / "metrics.png", self.data.metric)
            summary = {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(result).items()}
            checkpoint.save_json(self.run_dir / "summary.json", summary)
            checkpoint.save_json(self.run_dir / SAMPLES_FILE, {"samples": [
                {"prompt": b["prompt"], "reference": b["reference"], "before": b["output"], "after": a["output"]}
                for b, a in zip(samples_before, after)]})
            write_report([self.run_dir], self.run_dir / REPORT_FILE)
            self.tracker.finish(summary)
        self.dist.barrier()  # the run folder is complete when any rank returns
        return result


def train(config: TrainConfig, progress: bool = True) -> TrainResult:
    """Train a new run (Python entry point of ``peftkit train``)."""
    return TrainingRun(config, progress=progress).fit()


def resume(run_dir: str | os.PathLike, overrides: dict[str, Any] | None = None, progress: bool = True) -> TrainResult:
    """Continue a run from its newest checkpoint (``peftkit train --resume RUN_DIR``)."""
    return TrainingRun.resume(run_dir, overrides, progress).fit()
