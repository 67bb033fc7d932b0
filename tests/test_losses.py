import math

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from peftkit.losses import (
    causal_lm_loss,
    choice_log_likelihoods,
    length_normalized_softmax_loss,
    rank_classification,
    unlikelihood_loss,
)


def test_causal_lm_loss_equals_full_logits_loss_on_tiny_llama():
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=1000,
    )
    model = LlamaForCausalLM(config)
    input_ids = torch.randint(0, 1000, (3, 16))
    labels = input_ids.clone()
    labels[0, :10] = -100  # prompt
    labels[1, :4] = -100
    labels[1, 12:] = -100  # padding
    labels[2, :15] = -100  # a single scored token (position 15, predicted from 14)

    reference = model(input_ids=input_ids, labels=labels).loss  # transformers: full logits, shifted CE
    reference.backward()
    reference_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    hidden = model.model(input_ids=input_ids).last_hidden_state
    loss = causal_lm_loss(hidden, model.lm_head, labels)
    loss.backward()
    assert abs(loss.item() - reference.item()) < 1e-6
    assert max((p.grad - g).abs().max().item() for p, g in zip(model.parameters(), reference_grads)) < 1e-6

    n_scored = (labels[:, 1:] != -100).sum()
    summed = causal_lm_loss(hidden.detach(), model.lm_head, labels, reduction="sum")
    assert n_scored == 6 + 8 + 1
    assert summed.item() == pytest.approx(reference.item() * 15, rel=1e-6)


def test_causal_lm_loss_without_labels_is_zero_not_nan():
    head = torch.nn.Linear(8, 5)
    hidden = torch.randn(2, 4, 8, requires_grad=True)
    loss = causal_lm_loss(hidden, head, torch.full((2, 4), -100))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(hidden.grad, torch.zeros_like(hidden))


# Two answer choices of up to T=2 tokens over a 3-word vocabulary. Logits are log-probabilities, so p is exact:
#   choice 0: p(y_0) = 0.5, p(y_1) = 0.7
#   choice 1: p(y_0) = 0.4, then padding
PROBS = torch.tensor(
    [
        [[0.5, 0.25, 0.25], [0.1, 0.2, 0.7]],
        [[0.4, 0.4, 0.2], [1 / 3, 1 / 3, 1 / 3]],
    ]
)
LOGITS = PROBS.log().unsqueeze(0)  # (B=1, C=2, T=2, V=3)
CHOICE_LABELS = torch.tensor([[[0, 2], [1, -100]]])


def test_choice_log_likelihoods():
    ll, n = choice_log_likelihoods(LOGITS, CHOICE_LABELS)
    expected = torch.tensor([[math.log(0.5) + math.log(0.7), math.log(0.4)]])
    assert torch.allclose(ll, expected, atol=1e-6)
    assert n.tolist() == [[2, 1]]
    # any constant shift of the logits leaves the log-likelihoods unchanged (they go through log-softmax)
    assert torch.allclose(choice_log_likelihoods(LOGITS + 3.0, CHOICE_LABELS)[0], expected, atol=1e-6)


def test_rank_classification_with_and_without_length_normalisation():
    ll, n = choice_log_likelihoods(LOGITS, CHOICE_LABELS)
    # summed: log 0.35 = -1.050 < log 0.4 = -0.916, so the shorter choice 1 wins
    assert rank_classification(ll).tolist() == [1]
    # per token: (log 0.5 + log 0.7) / 2 = -0.525 > -0.916, so choice 0 wins
    assert rank_classification(ll, n).tolist() == [0]


def test_unlikelihood_loss_hand_computed():
    # correct = 0: the wrong choice 1 has one token with p = 0.4
    assert unlikelihood_loss(LOGITS, CHOICE_LABELS, torch.tensor([0])).item() == pytest.approx(-math.log(0.6), abs=1e-6)
    # correct = 1: the wrong choice 0 has two tokens, p = 0.5 and 0.7, mean over them
    expected = -(math.log(0.5) + math.log(0.3)) / 2
    assert unlikelihood_loss(LOGITS, CHOICE_LABELS, torch.tensor([1])).item() == pytest.approx(expected, abs=1e-6)
    # a batch of both: normalised by all 3 wrong-choice tokens, not averaged per example
    both = unlikelihood_loss(LOGITS.expand(2, -1, -1, -1), CHOICE_LABELS.expand(2, -1, -1), torch.tensor([0, 1]))
    expected = -(math.log(0.6) + math.log(0.5) + math.log(0.3)) / 3
    assert both.item() == pytest.approx(expected, abs=1e-6)


def test_unlikelihood_loss_stays_finite_when_the_wrong_token_is_certain():
    # p = e^30 / (e^30 + 2) is 1.0 in float32, so log(1 - p) computed naively is -inf
    logits = torch.tensor([[[[30.0, 0.0, 0.0]], [[0.0, 0.0, 0.0]]]], requires_grad=True)
    labels = torch.tensor([[[0], [0]]])
    p = torch.softmax(logits[0, 0, 0], -1)[0]
    assert torch.log1p(-p).isinf()
    loss = unlikelihood_loss(logits, labels, torch.tensor([1]))
    loss.backward()
    assert loss.item() == pytest.approx(30 - math.log(2) + math.log1p(2 * math.exp(-30)), abs=1e-5)
    assert torch.isfinite(logits.grad).all()
    assert logits.grad[0, 0, 0].tolist() == pytest.approx([1.0, -0.5, -0.5], abs=1e-6)  # d/dz of lse(z) - lse(z_1, z_2)


def test_length_normalized_softmax_loss_hand_computed():
    ll, n = choice_log_likelihoods(LOGITS, CHOICE_LABELS)
    beta0, beta1 = (math.log(0.5) + math.log(0.7)) / 2, math.log(0.4)
    for target, beta in [(0, beta0), (1, beta1)]:
        expected = -(beta - math.log(math.exp(beta0) + math.exp(beta1)))
        loss = length_normalized_softmax_loss(ll, n, torch.tensor([target]))
        assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert length_normalized_softmax_loss(ll, n, torch.tensor([0])).item() == pytest.approx(0.516484, abs=1e-6)


@pytest.mark.slow
def test_causal_lm_loss_runs_the_head_on_counted_rows_only_at_smollm2_size():
    """Forward + backward to the hidden states, frozen head, hidden 576, vocab 49,152, batch 4 x 512, half masked.

    Counted, not timed (a timing would depend on how busy the machine is): the head's matmuls cost
    2 x rows x 576 x 49,152 FLOPs forward and as much backward (the input gradient; the frozen head gets none), with
    rows = 4 x 512 for full logits and only the 4 x 256 positions whose next label counts for ``causal_lm_loss``."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    batch, length, hidden_size, vocab = 4, 512, 576, 49_152
    head = torch.nn.Linear(hidden_size, vocab, bias=False).requires_grad_(False)
    hidden = torch.randn(batch, length, hidden_size)
    labels = torch.randint(0, vocab, (batch, length))
    labels[:, : length // 2] = -100  # the prompt half

    def full(h):
        logits = head(h)
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)

    def selected(h):
        return causal_lm_loss(h, head, labels)

    def flops(fn):
        h = hidden.clone().requires_grad_()
        with FlopCounterMode(display=False) as counter:
            loss = fn(h)
            loss.backward()
        return loss, counter.get_total_flops()

    (loss_full, flops_full), (loss_selected, flops_selected) = flops(full), flops(selected)
    assert loss_selected.item() == pytest.approx(loss_full.item(), rel=1e-6)
    per_row = 2 * 2 * hidden_size * vocab  # forward + input gradient
    assert flops_full == batch * length * per_row
    assert flops_selected == batch * (length // 2) * per_row
