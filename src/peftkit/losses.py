"""Losses: causal-LM cross-entropy over response tokens only, and the T-Few multiple-choice losses.

T-Few: Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context Learning",
section 3.2. The multiple-choice functions take ``logits`` (..., T, V) already aligned with ``choice_labels``
(..., T): ``logits[..., t, :]`` scores ``choice_labels[..., t]``, and -100 marks positions outside the choice. That
is the encoder-decoder layout T-Few uses; for a decoder-only model pass ``logits[:, :-1]`` and ``labels[:, 1:]``.
The usual shapes are (batch, choices, T, V) and (batch, choices, T).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F

from peftkit.data import IGNORE_INDEX


def causal_lm_loss(
    hidden_states: torch.Tensor,
    lm_head: Callable[[torch.Tensor], torch.Tensor],
    labels: torch.Tensor,
    *,
    reduction: Literal["mean", "sum"] = "mean",
) -> torch.Tensor:
    """Next-token cross-entropy that applies the vocabulary head only where the loss counts.

    With h_t the final hidden state (B, L, H) at position t and y = labels (B, L), unshifted:

        loss = (1/N) * sum_{t : y_{t+1} != -100} -log softmax(lm_head(h_t))[y_{t+1}],   N = #{t : y_{t+1} != -100}

    This is Hugging Face's shifted cross-entropy over full logits, but the hidden states are selected first and the
    head (H x V: 576 x 49,152 for SmolLM2) runs on the N selected rows only; in instruction tuning most positions are
    prompt or padding, and their logits would be computed only to be thrown away.
    ``reduction="sum"`` returns the sum instead (to divide by the token count of a whole accumulated batch).
    A batch without any label returns 0 rather than NaN, so one empty micro-batch cannot poison a step.
    """
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    logits = lm_head(hidden_states[:, :-1][keep])
    loss = F.cross_entropy(logits, targets[keep], reduction="sum")
    return loss if reduction == "sum" else loss / keep.sum().clamp(min=1)


def choice_log_likelihoods(logits: torch.Tensor, choice_labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-likelihood and token count of each answer choice: (..., T, V), (..., T) -> (...), (...).

        ll(y) = sum_{t : y_t != -100} log p(y_t | x, y_<t),    n(y) = #{t : y_t != -100}
    """
    keep = choice_labels != IGNORE_INDEX
    token_logp = logits.log_softmax(-1).gather(-1, choice_labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(keep, token_logp, 0.0).sum(-1), keep.sum(-1)


def rank_classification(log_likelihoods: torch.Tensor, num_tokens: torch.Tensor | None = None) -> torch.Tensor:
    """The index of the most likely choice (last dimension): argmax ll, or argmax ll / n when given token counts.

    Length normalisation keeps long choices from losing only because they have more tokens to pay for.
    """
    scores = log_likelihoods if num_tokens is None else log_likelihoods / num_tokens.clamp(min=1)
    return scores.argmax(-1)


def unlikelihood_loss(logits: torch.Tensor, choice_labels: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """T-Few's unlikelihood loss, pushing down every token of every wrong choice:

        L_UL = - sum_{n wrong} sum_t log(1 - p(y^n_t | x, y^n_<t)) / sum_{n wrong} T(n)

    ``logits`` (B, C, T, V), ``choice_labels`` (B, C, T), ``targets`` (B,) the correct choice.
    log(1 - p_y) is computed as logsumexp_{v != y} z_v - logsumexp_v z_v: exact and finite even where p_y rounds to
    1 in floating point (T-Few's code adds 0.01 inside the log instead, which caps and biases the loss).
    """
    num_choices = choice_labels.shape[-2]
    wrong = torch.arange(num_choices, device=targets.device) != targets.unsqueeze(-1)  # (B, C)
    keep = (choice_labels != IGNORE_INDEX) & wrong.unsqueeze(-1)
    label = choice_labels.clamp(min=0).unsqueeze(-1)
    log_rest = logits.scatter(-1, label, float("-inf")).logsumexp(-1)
    token_loss = logits.logsumexp(-1) - log_rest  # -log(1 - p_y)
    return torch.where(keep, token_loss, 0.0).sum() / keep.sum().clamp(min=1)


def length_normalized_softmax_loss(
    log_likelihoods: torch.Tensor, num_tokens: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """T-Few's length-normalised loss: cross-entropy of a softmax over the choices' mean token log-likelihoods.

        beta(x, y) = (1/T(y)) * sum_t log p(y_t | x, y_<t)
        L_LN = -log( exp(beta(x, y_correct)) / sum_n exp(beta(x, y_n)) ),   averaged over the batch

    ``log_likelihoods`` and ``num_tokens`` (B, C) from ``choice_log_likelihoods``, ``targets`` (B,).
    """
    return F.cross_entropy(log_likelihoods / num_tokens.clamp(min=1), targets)
