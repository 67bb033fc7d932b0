"""Choosing the next token per request, and turning tokens into text that respects stop sequences.

Sampling follows OpenAI's parameters, in this order:

1. penalties, over the tokens generated so far (the prompt does not count), as OpenAI documents them:
   z_t <- z_t - c_t * frequency_penalty - [c_t > 0] * presence_penalty, with c_t how often token t was generated;
2. temperature T: p_i = exp(z_i / T) / sum_j exp(z_j / T); ``temperature = 0`` is greedy decoding (the argmax of
   the penalised logits), which is what makes outputs reproducible across batch compositions;
3. top-p (nucleus): keep the smallest set of most likely tokens whose mass reaches ``top_p`` and renormalise.

Logprobs report log p after steps 1 and 2 (T = 1 when greedy), before top-p's truncation: the distribution the
token was drawn from, with every token's probability defined (top-p would give the others -inf).

Each request samples from its own ``torch.Generator``, seeded from ``seed`` when given, so one request's draws never
depend on which other requests share its batch; choice i of ``n`` seeds with :func:`choice_seed`.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import NamedTuple

import torch


@dataclass(frozen=True)
class SamplingParams:
    """What one request asked for (already validated by the HTTP layer)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None  # None: no logprobs; k >= 0: the sampled token's and the k most likely tokens'

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalized(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    def make_generator(self, device: torch.device | str = "cpu") -> torch.Generator:
        """A private random stream on ``device`` (where the logits are: a CUDA generator cannot draw for CPU
        tensors, nor the reverse): ``seed`` when given, otherwise fresh entropy."""
        return torch.Generator(device=device).manual_seed(self.seed if self.seed is not None else random.SystemRandom().getrandbits(63))


def choice_seed(seed: int | None, index: int) -> int | None:
    """The seed of choice ``index`` of a request with ``n`` choices: ``seed`` itself for the first (so n = 1 and the
    first of n agree), a hash of (seed, index) for the others, so every choice is distinct yet reproducible."""
    if seed is None or index == 0:
        return seed
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")  # in [0, 2**64): what torch.Generator.manual_seed accepts


class TokenLogprob(NamedTuple):
    """A sampled token, its log-probability, and the ``k`` most likely tokens with theirs (most likely first)."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


def apply_penalties(logits: torch.Tensor, rows: list[int], counts: list[torch.Tensor], params: list[SamplingParams]) -> None:
    """OpenAI's penalties on ``rows`` of ``logits`` (batch, vocab), in place, in one batched update:
    ``logits[row] -= counts * frequency_penalty + (counts > 0) * presence_penalty`` with ``counts`` (vocab,) the
    row's generated-token counts."""
    column = lambda values: torch.tensor(values, dtype=logits.dtype, device=logits.device)[:, None]  # noqa: E731
    index = torch.tensor(rows, device=logits.device)
    stacked = torch.stack(counts).to(logits.dtype)
    penalty = stacked * column([p.frequency_penalty for p in params]) + (stacked > 0) * column([p.presence_penalty for p in params])
    logits.index_copy_(0, index, logits.index_select(0, index) - penalty)


def token_logprobs(logits: torch.Tensor, temperatures: list[float], tokens: list[int], k: int) -> list[TokenLogprob]:
    """Per row of ``logits`` (rows, vocab; already penalised): log p of ``tokens[row]`` under
    ``softmax(logits / T)`` (T = 1 for a greedy row) and the ``k`` most likely tokens. One host transfer."""
    scale = torch.tensor([t if t > 0 else 1.0 for t in temperatures], device=logits.device)[:, None]
    logp = torch.log_softmax(logits.float() / scale, dim=-1)
    chosen = logp.gather(1, torch.tensor(tokens, device=logits.device)[:, None])[:, 0]
    top_lp, top_ids = logp.topk(k, dim=-1) if k else (logp[:, :0], logp[:, :0].long())
    chosen, top_lp, top_ids = chosen.tolist(), top_lp.tolist(), top_ids.tolist()
    return [TokenLogprob(t, c, list(zip(i, v))) for t, c, i, v in zip(tokens, chosen, top_ids, top_lp)]


def greedy_and_unusable(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``(batch, vocab)`` logits: the greedy token, and True where no token can be chosen soundly (any
    NaN or +Inf, or no finite value at all; -Inf alone is fine: it marks an impossible token). One pass over the
    logits: a row's maximum is NaN if any entry is, +Inf if any is, and -Inf only if none is finite (three
    separate checks and an argmax cost a 16-row server step 1.5 ms, this 0.2)."""
    best, greedy = logits.max(dim=-1)
    return greedy, ~best.isfinite()


def sample_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """One token id from a row of logits (shape ``(vocab,)``, any float dtype, on ``generator``'s device)."""
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

    Tokens are decoded in a sliding window (the last complete piece plus the new tokens, as TGI and vLLM do), so
    each step costs the same however long the output is, and tokenizers that drop a leading space at the start of a
    decode still join pieces correctly. A trailing partial UTF-8 character ("\ufffd") waits for the next token;
    text that could still become a stop sequence is held back; when a stop sequence appears, the text ends just
    before it.
    """

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.token_ids: list[int] = []
        self.text = ""  # decoded so far (complete characters only)
        self.sent = 0  # how much of ``text`` has been handed out
        self.stopped = False
        self._prefix = 0  # token window [prefix, read) decodes to text already in ``self.text``
        self._read = 0

    def push(self, token_id: int) -> str:
        """Add one generated token; return the newly safe text ("" if none). Sets :attr:`stopped` on a stop sequence."""
        self.token_ids.append(token_id)
        self.text += self._decode_new(final=False)
        start = max(0, self.sent - max((len(s) for s in self.stop), default=0))
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            self.text = self.text[: min(hits)]
            return self._advance(len(self.text))
        hold = 0  # the longest unsent tail that is a prefix of a stop sequence: it may still grow into one
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text) - self.sent), hold, -1):
                if self.text.endswith(s[:k]):
                    hold = k
                    break
        return self._advance(len(self.text) - hold)

    def finish(self) -> str:
        """Everything held back, when generation ends without a stop sequence."""
        if self.stopped:
            return ""
        self.text += self._decode_new(final=True)
        return self._advance(len(self.text))

    def _decode_new(self, final: bool) -> str:
        decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
        before = decode(self.token_ids[self._prefix : self._read])
        after = decode(self.token_ids[self._prefix :])
        if len(after) <= len(before) or (after.endswith("\ufffd") and not final):
            return ""  # nothing new, or a multi-byte character still incomplete
        self._prefix, self._read = self._read, len(self.token_ids)
        return after[len(before) :]

    def _advance(self, end: int) -> str:
        if end <= self.sent:
            return ""
        delta, self.sent = self.text[self.sent : end], end
        return delta
