"""Multiple choice by rank classification, with the T-Few losses (Liu et al. 2022, section 3.2).

The model scores every choice y_n of a prompt x by its log-likelihood ll(y_n) = sum_t log p(y_n,t | x, y_n,<t) and
picks the best: argmax ll (``accuracy``) or argmax ll / T(y_n) (``accuracy_norm``, length-normalised). Training
sums, per batch, the losses named in ``losses``:

- ``lm``: cross-entropy of the right choice's tokens, the mean over those tokens (L_LM);
- ``ul``: unlikelihood of every wrong choice's tokens, -log(1 - p), the mean over those tokens (L_UL);
- ``ln``: softmax cross-entropy over the choices' length-normalised log-likelihoods (L_LN).

T-Few's recipe is (IA)^3 with all three at weight 1. The vocabulary head runs only at the positions that score a
choice token (a few per row), not over the whole prompt.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from ..data import ChoiceCollator, group_by_length, ungroup
from ..device import Precision, to_device
from ..losses import choice_log_likelihoods, length_normalized_softmax_loss, rank_classification, unlikelihood_loss
from .padded import PaddedTask

CHOICE_LOSSES = ("lm", "ul", "ln")


def parse_losses(text: str) -> tuple[str, ...]:
    """``"lm,ul,ln"`` -> ("lm", "ul", "ln"), refusing unknown names and an empty set."""
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in CHOICE_LOSSES]
    if unknown or not names:
        raise ValueError(f"choice_losses must be a comma-separated subset of {', '.join(CHOICE_LOSSES)}, got {text!r}")
    return names


class MultipleChoiceTask(PaddedTask):
    """Loss and rank-classification scores of a causal LM (a PeftModel or a plain transformers model) on choices."""

    def __init__(
        self, model: nn.Module, tokenizer: Any, losses: Sequence[str] = ("lm",), device: torch.device | None = None,
        precision: Precision | None = None,
    ) -> None:
        from ..peft_model import PeftModel
        from ..tuners.base import Tuner, tuner_for

        self.model = model
        self.device = device or torch.device("cpu")
        self.precision = precision or Precision(torch.float32, "default")
        self.hf_model = model.base_model if isinstance(model, PeftModel) else model
        self.losses = tuple(losses)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.collator = ChoiceCollator(pad)
        # prompt and prefix tuning rewrite the inputs, so only the PeftModel's own forward applies them
        self.rewrites_inputs = isinstance(model, PeftModel) and any(
            type(tuner_for(model.peft_config[name])).prepare_inputs is not Tuner.prepare_inputs for name in model.active_adapters
        )

    def choice_logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, C, T, V): the next-token logits at the positions that score each choice token."""
        b, c, t = batch["positions"].shape
        index = batch["positions"].reshape(b * c, t)
        if self.rewrites_inputs:
            logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            logits = logits[:, -batch["input_ids"].shape[1] :]  # virtual tokens come first
            picked = logits.gather(1, index.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))
        else:
            hidden = self.hf_model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
            picked = self.hf_model.get_output_embeddings()(hidden.gather(1, index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])))
        return picked.reshape(b, c, t, -1).float()

    def losses_of(self, batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """Each loss in ``CHOICE_LOSSES`` (batch means), and the (B, C) log-likelihoods and token counts."""
        logits, labels, targets = self.choice_logits(batch), batch["choice_labels"], batch["labels"]
        ll, n = choice_log_likelihoods(logits, labels)
        right = targets.unsqueeze(-1)
        losses = {
            "lm": -ll.gather(1, right).sum() / n.gather(1, right).sum().clamp(min=1),
            "ul": unlikelihood_loss(logits, labels, targets),
            "ln": length_normalized_softmax_loss(ll, n, targets),
        }
        return losses, ll, n

    def loss_sum(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The batch's summed losses times its size (the trainer divides by the examples of the whole step)."""
        losses, _, _ = self.losses_of(batch)
        return sum(losses[name] for name in self.losses) * self.count(batch)

    @torch.no_grad()
    def evaluate_parts(self, examples: Sequence[dict[str, Any]], batch_size: int, batches: int = 0) -> dict[str, Any]:
        """Summed L_LM of the right choices and both rank predictions, in the examples' order (one rank's share;
        ``batches`` as in ``LMTask.evaluate_parts``: forward passes on a stand-in up to that many, for FSDP)."""
        lengths = [len(e["prompt_ids"]) + max(len(c) for c in e["choice_ids"]) for e in examples]
        groups = group_by_length(lengths, batch_size)
        lm_total, raw, normed = torch.zeros((), device=self.device, dtype=torch.float64), [], []
        for indices in groups:
            batch = to_device(self.collate([examples[i] for i in indices]), self.device)
            with self.precision.autocast(self.device):
                losses, ll, n = self.losses_of(batch)
            lm_total += losses["lm"].double() * len(indices)
            raw.append(rank_classification(ll).tolist())
            normed.append(rank_classification(ll, n).tolist())
        for _ in range(batches - len(groups)):
            with self.precision.autocast(self.device):
                self.losses_of(to_device(self.collate(list(examples[:1])), self.device))
        return {"loss_sum": float(lm_total), "predictions": ungroup(groups, raw), "predictions_norm": ungroup(groups, normed),
                "labels": [e["label"] for e in examples]}

    @staticmethod
    def scores(parts: dict[str, Any]) -> dict[str, float]:
        """L_LM of the right choices, and rank-classification accuracy with and without length normalisation."""
        gold, total = parts["labels"], max(len(parts["labels"]), 1)
        return {
            "loss": parts["loss_sum"] / total,
            "accuracy": sum(p == g for p, g in zip(parts["predictions"], gold)) / total,
            "accuracy_norm": sum(p == g for p, g in zip(parts["predictions_norm"], gold)) / total,
        }

    def evaluate(self, examples: Sequence[dict[str, Any]], batch_size: int) -> dict[str, float]:
        return self.scores(self.evaluate_parts(examples, batch_size))
