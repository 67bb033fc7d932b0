"""Task runners: the summed loss of a micro-batch and the evaluation scores, for causal LM (sft, text) and
sequence classification."""

from __future__ import annotations

import math
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..data import IGNORE_INDEX, ClassificationCollator, PackedCollator, PaddingCollator, group_by_length, pack_examples, ungroup
from ..losses import causal_lm_loss
from ..device import Precision, to_device
from .attention import (
    PACKED_ATTENTION, attention_implementation, packed_bounds, register_packed_attention, supports_packed_attention,
)
from .choice_task import MultipleChoiceTask, parse_losses
from .config import TrainConfig
from .generation import answer_matches
from .padded import PaddedTask

class LMTask:
    """Causal-LM loss for sft and text: packed batches, backbone hidden states, head only where labels count.

    Methods that rewrite the inputs (prompt and prefix tuning: their tuner overrides ``prepare_inputs``) cannot
    see packed rows as separate sequences, so they get right-padded batches through the PeftModel's own forward
    and the loss on its full logits (the last L positions: virtual tokens come first).
    """

    def __init__(self, model: nn.Module, tokenizer: Any, max_length: int, device: torch.device, precision: Precision) -> None:
        from ..peft_model import PeftModel
        from ..tuners.base import Tuner, tuner_for

        self.model = model  # a PeftModel, or a plain transformers model (evaluating the base)
        self.device, self.precision = device, precision
        self.tokenizer = tokenizer
        self.hf_model = model.base_model if isinstance(model, PeftModel) else model
        self.max_length = max_length
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.padding = PaddingCollator(pad)
        self.rewrites_inputs = isinstance(model, PeftModel) and any(
            type(tuner_for(model.peft_config[name])).prepare_inputs is not Tuner.prepare_inputs for name in model.active_adapters
        )
        self.varlen = not self.rewrites_inputs and supports_packed_attention(self.hf_model)
        dtype = next(p for p in self.hf_model.parameters() if p.is_floating_point()).dtype
        self.packing = PackedCollator(pad, mask_dtype=dtype)
        if self.varlen:
            register_packed_attention()
        self.mode = "padded" if self.rewrites_inputs else ("packed" if self.varlen else "packed-mask")

    def collate(self, examples: Sequence[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        if self.rewrites_inputs:
            return self.padding(examples)
        # one row per micro-batch when attention is per sequence (no padding at all); rows of max_length otherwise
        length = sum(len(e["input_ids"]) for e in examples) if self.varlen else self.max_length
        rows = pack_examples(examples, length)
        batch = self.packing(rows)
        if self.varlen:  # host-side offsets for packed_attention (no device sync per layer)
            batch["packed_bounds"] = packed_bounds([r["seq_lens"] for r in rows], batch["input_ids"].shape[1])
        return batch

    @staticmethod
    def count(batch: dict[str, torch.Tensor]) -> int:
        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())

    def attention(self) -> AbstractContextManager:
        """Packed attention in place (when this task packs): the training loop holds it through forward *and*
        backward, since activation checkpointing recomputes each block in backward and must attend as forward did."""
        return attention_implementation(self.hf_model, PACKED_ATTENTION) if self.varlen else nullcontext()

    def loss_sum(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        labels = batch["labels"]
        if self.rewrites_inputs:
            logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            return causal_lm_loss(logits[:, -labels.shape[1] :], nn.Identity(), labels, reduction="sum")
        backbone = self.hf_model.base_model  # transformers' backbone: LlamaModel inside LlamaForCausalLM, ...
        head = self.hf_model.get_output_embeddings()
        if self.varlen:
            with attention_implementation(self.hf_model, PACKED_ATTENTION):
                hidden = backbone(
                    input_ids=batch["input_ids"], position_ids=batch["position_ids"], packed_bounds=batch["packed_bounds"]
                ).last_hidden_state
        else:
            hidden = backbone(
                input_ids=batch["input_ids"], position_ids=batch["position_ids"], attention_mask=batch["attention_mask"]
            ).last_hidden_state
        return causal_lm_loss(hidden, head, labels, reduction="sum")

    @torch.no_grad()
    def evaluate_parts(self, examples: Sequence[dict[str, list[int]]], batch_size: int, batches: int = 0) -> dict[str, Any]:
        """Summed next-token loss and scored tokens over ``examples`` (one rank's share of an evaluation: the parts
        of all ranks add up, see :meth:`scores`). ``batches``: run forward passes up to this many (the extra ones on
        a stand-in example, discarded) so that every rank makes as many, as FSDP's gathers need."""
        total, count, runs = torch.zeros((), device=self.device, dtype=torch.float64), 0, 0
        for start in range(0, len(examples), batch_size):
            batch = self.collate(examples[start : start + batch_size])
            count += self.count(batch)  # on the host batch: no device sync
            with self.precision.autocast(self.device):
                total += self.loss_sum(to_device(batch, self.device)).double()
            runs += 1
        run_stand_ins(self, examples, batches - runs)
        parts = {"loss_sum": float(total), "tokens": count, "answers_correct": 0, "answers": 0, "free_text": 0}
        # generation's forward passes differ between ranks (early stops), which FSDP's gathers cannot allow: one process only
        if not (torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
            matches = answer_matches(self.model, self.tokenizer, examples, batch_size, self.precision)
            if matches is None:
                parts["free_text"] = 1
            else:
                parts["answers_correct"], parts["answers"] = matches
        return parts

    @staticmethod
    def scores(parts: dict[str, Any]) -> dict[str, float]:
        """Mean next-token loss from :meth:`evaluate_parts` (summed over ranks); when every answer is one word (a
        label phrased as text), also ``accuracy``: the greedy answer's first word matches it (:func:`answer_matches`)."""
        scores = {"loss": parts["loss_sum"] / max(parts["tokens"], 1), "tokens": parts["tokens"]}
        if parts.get("answers") and not parts.get("free_text"):
            scores["accuracy"] = parts["answers_correct"] / parts["answers"]
        return scores

    def evaluate(self, examples: Sequence[dict[str, list[int]]], batch_size: int) -> dict[str, float]:
        """Mean next-token loss over every scored token of ``examples`` (and ``accuracy``, see :meth:`scores`)."""
        return self.scores(self.evaluate_parts(examples, batch_size))


def run_stand_ins(task: "LMTask | ClassificationTask", examples: Sequence[Any], count: int) -> None:
    """``count`` forward passes on one stand-in example, results discarded (see ``evaluate_parts``)."""
    for _ in range(max(count, 0)):
        with task.precision.autocast(task.device):
            task.loss_sum(to_device(task.collate(list(examples[:1])), task.device))


class ClassificationTask(PaddedTask):
    """Sequence classification: cross-entropy on the classifier's logits; evaluation adds accuracy, F1, MCC."""

    def __init__(self, model: nn.Module, tokenizer: Any, max_length: int, device: torch.device, precision: Precision) -> None:
        self.model = model
        self.device, self.precision = device, precision
        self.tokenizer = tokenizer
        self.collator = ClassificationCollator(tokenizer, max_length)

    def logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k not in ("labels", "num_real_tokens")}
        return self.model(**inputs).logits

    def loss_sum(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(self.logits(batch), batch["labels"], reduction="sum")

    @torch.no_grad()
    def evaluate_parts(self, records: Sequence[dict[str, Any]], batch_size: int, batches: int = 0) -> dict[str, Any]:
        """Summed loss, predictions and labels over ``records`` in their order, batched by length (little padding);
        one rank's share of an evaluation (``batches``: as in :meth:`LMTask.evaluate_parts`)."""
        pairs = [r["text_pair"] for r in records] if records and "text_pair" in records[0] else None
        lengths = [len(ids) for ids in self.tokenizer([r["text"] for r in records], pairs, truncation=True, max_length=self.collator.max_length)["input_ids"]] if records else []
        groups = group_by_length(lengths, batch_size)
        total, predictions = torch.zeros((), device=self.device, dtype=torch.float64), []
        for indices in groups:
            batch = to_device(self.collate([records[i] for i in indices]), self.device)
            with self.precision.autocast(self.device):
                logits = self.logits(batch).float()
            total += F.cross_entropy(logits, batch["labels"], reduction="sum").double()
            predictions.append(logits.argmax(-1))
        run_stand_ins(self, records, batches - len(groups))
        flat = torch.cat(predictions).tolist() if predictions else []  # one device sync for the whole split
        sizes = [len(g) for g in groups]
        predicted = ungroup(groups, [flat[sum(sizes[:k]) : sum(sizes[: k + 1])] for k in range(len(groups))])
        return {"loss_sum": float(total), "predictions": predicted, "labels": [r["label"] for r in records]}

    @staticmethod
    def scores(parts: dict[str, Any]) -> dict[str, float]:
        """Mean loss, accuracy, F1 and MCC from :meth:`evaluate_parts` (predictions of all ranks, in order)."""
        scores = classification_metrics(parts["predictions"], parts["labels"])
        return {"loss": parts["loss_sum"] / max(len(parts["labels"]), 1), **scores}

    def evaluate(self, records: Sequence[dict[str, Any]], batch_size: int) -> dict[str, float]:
        """Loss and scores over ``records``."""
        return self.scores(self.evaluate_parts(records, batch_size))


def classification_metrics(predictions: Sequence[int], labels: Sequence[int]) -> dict[str, float]:
    """Accuracy, F1 and Matthews correlation of predicted vs true class ids.

    F1 is of class 1 for two classes (GLUE's MRPC score), the unweighted mean over classes otherwise.
    MCC = (c s - sum_k p_k t_k) / sqrt((s^2 - sum_k p_k^2)(s^2 - sum_k t_k^2)) with c correct, s total, p_k / t_k
    the predicted / true counts of class k (Gorodkin's multi-class form; the usual formula for two classes); 0 when
    a factor of the denominator is 0.
    """
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
    total = len(labels)
    if total == 0:
        return {"accuracy": 0.0, "f1": 0.0, "matthews_corrcoef": 0.0}
    classes = sorted(set(labels) | set(predictions) | {0, 1})
    correct = sum(p == t for p, t in zip(predictions, labels))
    predicted_count = {k: sum(p == k for p in predictions) for k in classes}
    true_count = {k: sum(t == k for t in labels) for k in classes}

    def f1(k: int) -> float:
        tp = sum(p == k and t == k for p, t in zip(predictions, labels))
        denominator = predicted_count[k] + true_count[k]
        return 2 * tp / denominator if denominator else 0.0

    f1_score = f1(1) if len(classes) == 2 else sum(f1(k) for k in classes) / len(classes)
    numerator = correct * total - sum(predicted_count[k] * true_count[k] for k in classes)
    denominator = math.sqrt(
        (total**2 - sum(v**2 for v in predicted_count.values())) * (total**2 - sum(v**2 for v in true_count.values()))
    )
    return {
        "accuracy": correct / total,
        "f1": f1_score,
        "matthews_corrcoef": numerator / denominator if denominator else 0.0,
    }


def make_task(
    model: nn.Module, tokenizer: Any, config: TrainConfig, device: torch.device, precision: Precision
) -> LMTask | ClassificationTask | MultipleChoiceTask:
    """The loss/evaluation runner for ``config.task``, with ``model`` on ``device`` computing in ``precision``."""
    if config.task == "multiple-choice":
        return MultipleChoiceTask(model, tokenizer, parse_losses(config.choice_losses), device, precision)
    if config.task == "seq-cls":
        return ClassificationTask(model, tokenizer, config.max_length, device, precision)
    return LMTask(model, tokenizer, config.max_length, device, precision)
