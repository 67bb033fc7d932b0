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

from ..data import IGNORE_INDEX, ChoiceCollator, group_by_length, ungroup
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
        precision: Precision | None = None, share_prompt: bool = True,
    ) -> None:
        from ..peft_model import PeftModel
        from ..tuners.base import Tuner, tuner_for

        self.model = model
        self.device = device or torch.device("cpu")
        self.precision = precision or Precision(torch.float32, "default")
        self.hf_model = model.base_model if isinstance(model, PeftModel) else model
        self.losses = tuple(losses)
        self.share_prompt = share_prompt  # False: one row per choice (the reference layout, for tests and bench/)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.collator = ChoiceCollator(pad)
        # prompt and prefix tuning rewrite the inputs, so only the PeftModel's own forward applies them
        self.rewrites_inputs = isinstance(model, PeftModel) and any(
            type(tuner_for(model.peft_config[name])).prepare_inputs is not Tuner.prepare_inputs for name in model.active_adapters
        )

    def choice_logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, C, T, V): the next-token logits at the positions that score each choice token."""
        b, c, t = batch["choice_labels"].shape
        checkpointed = self.hf_model.training and any(getattr(m, "gradient_checkpointing", 0) is True for m in self.hf_model.modules())
        hidden = None if self.rewrites_inputs or checkpointed or not self.share_prompt else self._shared_prompt_hidden(batch)
        logits = self._full_rows_logits(batch) if hidden is None else self.hf_model.get_output_embeddings()(hidden)
        return logits.reshape(b, c, t, -1).float()

    def _shared_prompt_hidden(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """(B*C, T, H) hidden states that predict each choice token, reading each prompt once.

        The prompt's last position predicts every choice's first token; its keys and values, repeated per choice,
        are the cache that the choices' other tokens read (position ids continue after each prompt's real end, and
        the prompt's padding is masked). With one-token choices that is a single forward of the prompts: for two
        choices, half the work of one row per choice.
        """
        labels, lengths, mask = batch["choice_labels"], batch["prompt_lengths"], batch["prompt_mask"]
        b, c, t = labels.shape
        out = self.hf_model.base_model(input_ids=batch["prompt_ids"], attention_mask=mask, use_cache=t > 1)
        last = out.last_hidden_state[torch.arange(b, device=lengths.device), lengths - 1]
        first = last.repeat_interleave(c, 0).unsqueeze(1)
        if t == 1:
            return first
        cache = out.past_key_values
        if cache is None:  # a model without a key/value cache: one row per choice instead
            return None
        cache.batch_repeat_interleave(c)
        follow = labels[..., :-1].reshape(b * c, t - 1)
        real = follow != IGNORE_INDEX
        offsets = torch.arange(t - 1, device=lengths.device)
        rest = self.hf_model.base_model(
            input_ids=follow.clamp(min=0), attention_mask=torch.cat([mask.repeat_interleave(c, 0), real.long()], 1),
            position_ids=lengths.repeat_interleave(c).unsqueeze(1) + offsets, past_key_values=cache, use_cache=True,
        ).last_hidden_state
        return torch.cat([first, rest], 1)

    def _full_rows_logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B*C, T, V) logits from one row ``prompt + choice`` per choice: for prompt and prefix tuning, whose
        virtual tokens only the PeftModel's own forward adds, and under gradient checkpointing (which keeps no cache)."""
        labels, lengths = batch["choice_labels"], batch["prompt_lengths"]
        b, c, t = labels.shape
        rows = [torch.cat([batch["prompt_ids"][i, : lengths[i]], labels[i, j][labels[i, j] != IGNORE_INDEX]])
                for i in range(b) for j in range(c)]
        width = max(len(r) for r in rows)
        input_ids = labels.new_full((b * c, width), self.collator.pad_token_id)
        attention_mask = torch.zeros_like(input_ids)
        for i, row in enumerate(rows):
            input_ids[i, : len(row)], attention_mask[i, : len(row)] = row, 1
        index = (lengths.repeat_interleave(c) - 1).unsqueeze(1) + torch.arange(t, device=lengths.device)
        index = index.clamp(max=width - 1)  # past a short choice's end: any position, its label is -100
        if self.rewrites_inputs:
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
            logits = logits[:, -width:]  # virtual tokens come first
            return logits.gather(1, index.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))
        hidden = self.hf_model.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.hf_model.get_output_embeddings()(hidden.gather(1, index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])))

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
