"""Prompt templates: the text that precedes the response of an instruction record (Alpaca's template or the
tokenizer's chat template)."""

from __future__ import annotations

from typing import Any, Literal

from .chat import render_chat

Template = Literal["alpaca", "chat"]

# Stanford Alpaca's prompt templates, verbatim (github.com/tatsu-lab/stanford_alpaca, train.py).
ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def render_prompt(record: dict[str, Any], template: Template = "alpaca", tokenizer: Any = None) -> str:
    """The text that precedes the response of an Alpaca record ``{instruction, input (optional), output}``.

    ``"alpaca"``: the Alpaca template, with or without the Input section. ``"chat"``: the tokenizer's chat template
    for one user turn (instruction, then a blank line and the input if any), ending with the assistant header.
    """
    instruction, context = record["instruction"], record.get("input") or ""
    if template == "alpaca":
        if context.strip():
            return ALPACA_PROMPT.format(instruction=instruction, input=context)
        return ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)
    if template == "chat":
        if tokenizer is None:
            raise ValueError("template='chat' needs a tokenizer that has a chat template")
        user = f"{instruction}\n\n{context}" if context.strip() else instruction
        return render_chat(tokenizer, [{"role": "user", "content": user}], add_generation_prompt=True)
    raise ValueError(f"unknown template {template!r}: expected 'alpaca' or 'chat'")
