"""Choosing the next token per request, and turning tokens into text that respects stop sequences.

Sampling follows OpenAI's parameters. With temperature T and logits z, p_i = exp(z_i / T) / sum_j exp(z_j / T);
top-p (nucleus) sampling keeps the smallest set of most likely tokens whose mass reaches ``top_p`` and
renormalises. ``temperature = 0`` is greedy decoding (argmax), which is what makes outputs reproducible across
batch compositions. Each request samples from its own ``torch.Generator``, seeded from ``seed`` when given, so
one request's draws never depend on which other requests share its batch.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    """What one request asked for (already validated by the HTTP layer)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def make_generator(self) -> torch.Generator:
        """A private random stream: ``seed`` when given, otherwise fresh entropy."""
        return torch.Generator().manual_seed(self.seed if self.seed is not None else random.SystemRandom().getrandbits(63))


def sample_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """One token id from a row of logits (shape ``(vocab,)``, any float dtype)."""
    if params.greedy:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # keep a token while the mass before it is still short of top_p: the first token is always kept
        keep = (torch.cumsum(sorted_probs, dim=-1) - sorted_probs) < params.top_p
        sorted_probs = sorted_probs * keep
        choice = torch.multinomial(sorted_probs / sorted_probs.sum(), 1, generator=generator)
        return int(order[choice])
    return int(torch.multinomial(probs, 1, generator=generator))


class TextStream:
    """Incremental detokenization with stop sequences.

    Each :meth:`push` decodes the whole output so far (byte-level BPE can only be decoded reliably as a whole) and
    returns the text that is safe to send: it holds back a trailing partial UTF-8 character ("\\ufffd") and any tail
    that could still become a stop sequence. When a stop sequence appears, the text ends just before it.
    """

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.token_ids: list[int] = []
        self.sent = ""  # what has been handed out so far
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add one generated token; return the newly safe text ("" if none). Sets :attr:`stopped` on a stop sequence."""
        self.token_ids.append(token_id)
        text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        start = max(0, len(self.sent) - max((len(s) for s in self.stop), default=0))
        hits = [i for i in (text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            return self._advance(text[: min(hits)])
        safe = len(text)
        while safe > len(self.sent) and text[safe - 1] == "\ufffd":
            safe -= 1
        hold = 0  # the longest unsent tail that is a prefix of a stop sequence: it may still grow into one
        for s in self.stop:
            for k in range(min(len(s) - 1, safe - len(self.sent)), hold, -1):
                if text.endswith(s[:k], 0, safe):
                    hold = k
                    break
        return self._advance(text[: safe - hold])

    def finish(self) -> str:
        """The held-back tail when generation ends without a stop sequence."""
        if self.stopped:
            return ""
        return self._advance(self.tokenizer.decode(self.token_ids, skip_special_tokens=True))

    def _advance(self, text: str) -> str:
        if len(text) <= len(self.sent):
            return ""
        delta, self.sent = text[len(self.sent) :], text
        return delta
