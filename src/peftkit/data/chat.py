"""Conversation data: OpenAI ``messages`` and ShareGPT ``conversations`` records, rendered with the tokenizer's chat
template, with loss on every assistant turn and on nothing else.

A record is one conversation, in either shape (recognised by its key):

    {"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}          OpenAI
    {"conversations": [{"from": "system" | "human" | "gpt", "value": "..."}, ...]}           ShareGPT

How the loss positions are found (``assistant_spans``, used by ``tokenization.tokenize_conversation``): for each assistant turn k the template renders
``messages[:k]`` with the generation prompt (the text the model sees before it answers) and ``messages[:k+1]``
without it; the assistant's span is the difference, up to the end-of-turn token(s) (trailing whitespace such as
the newline after ``<|im_end|>`` carries no loss). The text is then tokenized piece by piece, cut at every span
boundary, so a span starts exactly where generation starts at inference (where the prompt's tokens end) whatever
the tokenizer would merge across it. ``return_assistant_tokens_mask`` would need ``{% generation %}`` markers in
the template; SmolLM2's (and most) templates have none, so this prefix method works for every template whose
renders of a conversation's prefixes are prefixes of each other (checked: an error says when they are not).

``render_chat`` is the one place a conversation becomes text: training, ``peftkit generate`` and the server's chat
endpoint all call it, so a model is served the way it was trained.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any


ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
CHAT_KEYS = ("messages", "conversations")

# Templates for tokenizers that have none (``--chat-template NAME``). ChatML as Qwen and SmolLM write it.
CHAT_TEMPLATES = {
    "chatml": (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>'"
        " + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
}
TEMPLATE_FLAG = "--chat-template FILE|NAME"


def is_conversation(record: dict[str, Any]) -> bool:
    """Whether a record is a conversation (it has a ``messages`` or ``conversations`` list)."""
    return any(isinstance(record.get(key), list) for key in CHAT_KEYS)


def conversation_messages(record: dict[str, Any]) -> list[dict[str, str]]:
    """The record's turns as OpenAI messages ``[{"role", "content"}]``; ValueError naming the problem when a turn
    has an unknown role, no text, or the conversation has no assistant turn."""
    if isinstance(record.get("messages"), list):
        turns, role_key, text_key, roles = record["messages"], "role", "content", {r: r for r in ROLES}
    elif isinstance(record.get("conversations"), list):
        turns, role_key, text_key, roles = record["conversations"], "from", "value", SHAREGPT_ROLES
    else:
        raise ValueError("not a conversation: expected a 'messages' (OpenAI) or 'conversations' (ShareGPT) list")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise ValueError(f"turn {i}: expected an object with {role_key!r} and {text_key!r}, got {type(turn).__name__}")
        role = turn.get(role_key)
        if role not in roles:
            raise ValueError(f"turn {i}: unknown role {role!r} (expected one of {', '.join(roles)})")
        content = turn.get(text_key)
        if not isinstance(content, str):
            raise ValueError(f"turn {i} ({role}): {text_key!r} must be text, got {type(content).__name__}")
        messages.append({"role": roles[role], "content": content})
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("no assistant turn: nothing to learn from (every conversation needs at least one answer)")
    return messages


def load_chat_template(spec: str) -> str:
    """A chat template from ``--chat-template``: a built-in name (``chatml``) or a Jinja file."""
    if spec in CHAT_TEMPLATES:
        return CHAT_TEMPLATES[spec]
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"--chat-template {spec}: neither a file nor a built-in name ({', '.join(CHAT_TEMPLATES)})")
    return path.read_text(encoding="utf-8")


def render_chat(tokenizer: Any, messages: Sequence[dict[str, str]], add_generation_prompt: bool) -> str:
    """The conversation as text through the tokenizer's chat template (the template writes its special tokens:
    tokenize the result with ``add_special_tokens=False``)."""
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "this model")
        raise ValueError(f"the tokenizer of {name} has no chat template: supply one with {TEMPLATE_FLAG}")
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_spans(tokenizer: Any, messages: Sequence[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """(the whole conversation's text, the character spans of the assistant's answers in it, in order)."""
    text = render_chat(tokenizer, messages, add_generation_prompt=False)
    spans = []
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render_chat(tokenizer, messages[:k], add_generation_prompt=True)
        through = render_chat(tokenizer, messages[: k + 1], add_generation_prompt=False)
        if not (text.startswith(through) and through.startswith(before)):
            raise ValueError(
                "the chat template renders a conversation's first turns differently on their own than inside the "
                f"whole conversation (turn {k}), so the assistant's tokens cannot be located; supply another "
                f"template with {TEMPLATE_FLAG}"
            )
        end = len(through.rstrip())
        if message["content"].strip() and message["content"].strip() not in through[len(before) : end]:
            raise ValueError(f"turn {k}: the chat template does not write the assistant's text where expected")
        spans.append((len(before), end))
    return text, spans


def chat_sample(tokenizer: Any, messages: Sequence[dict[str, str]]) -> dict[str, str]:
    """``{"rendered_prompt", "output"}`` for sample generations: everything before the last assistant answer (rendered, with
    the generation prompt) and that answer as the reference."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return {"rendered_prompt": render_chat(tokenizer, messages[:last], add_generation_prompt=True),
            "output": messages[last]["content"]}


def set_chat_template(tokenizer: Any, spec: str | os.PathLike | None) -> None:
    """Give ``tokenizer`` the template ``spec`` names (``--chat-template``), replacing its own; ``None``: keep it."""
    if spec is not None:
        tokenizer.chat_template = load_chat_template(str(spec))
