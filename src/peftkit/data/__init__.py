"""Data: readers, prompt templates, tokenization, packing and collators.

Records and examples are plain lists of dicts; collators turn a list of examples into a dict of tensors.
Labels follow the Hugging Face convention: ``labels`` is aligned with ``input_ids`` (not shifted) and
``IGNORE_INDEX`` (-100) marks positions without loss; the loss shifts by one (see ``peftkit.losses``).

Every collator also returns ``num_real_tokens`` (a 0-d tensor: tokens that are not padding), so that the trainer can
report useful tokens per second and ``padding_fraction(batch)``.

The modules, in the order data flows through them:

- ``readers``: JSON list, JSONL, CSV, TSV and plain-text files into records (``read_records``, ``read_utf8``,
  ``BadRows``, ``LINE``);
- ``classification``: classification data sets, their label set and GLUE tasks (``load_classification``,
  ``infer_labels``, ``load_glue``);
- ``chat``: conversations (OpenAI ``messages``, ShareGPT ``conversations``) and the chat template (``render_chat``,
  ``conversation_messages``, ``is_conversation``, ``assistant_spans``, ``chat_sample``, ``set_chat_template``);
- ``prompts``: prompt templates for instruction records (``render_prompt``);
- ``tokenization``: records and texts into examples (``tokenize_sft``, ``tokenize_conversations``, ``chunk_text``,
  ``IGNORE_INDEX``);
- ``packing``: several examples per row (``pack_examples``, ``PackedCollator``);
- ``batching``: padded batches and length grouping (``PaddingCollator``, ``ClassificationCollator``,
  ``padding_fraction``, ``group_by_length``, ``ungroup``);
- ``choices``: multiple-choice records for rank classification (``load_choices``, ``tokenize_choices``,
  ``ChoiceCollator``, ``PHRASINGS`` of GLUE tasks as questions).

Every public name is importable from ``peftkit.data`` itself.
"""

from .batching import ClassificationCollator, PaddingCollator, group_by_length, padding_fraction, ungroup
from .chat import CHAT_TEMPLATES, assistant_spans, chat_sample, conversation_messages, is_conversation, render_chat, set_chat_template
from .choices import PHRASINGS, ChoiceCollator, load_choices, tokenize_choices
from .classification import GLUE_TASKS, ClassificationData, GlueTask, infer_labels, load_classification, load_glue
from .packing import PackedCollator, pack_examples
from .prompts import ALPACA_PROMPT, ALPACA_PROMPT_NO_INPUT, Template, render_prompt
from .readers import LINE, BadRows, OnBadRow, read_records, read_utf8
from .tokenization import IGNORE_INDEX, chunk_text, tokenize_conversation, tokenize_conversations, tokenize_sft

__all__ = [
    "ALPACA_PROMPT",
    "ALPACA_PROMPT_NO_INPUT",
    "CHAT_TEMPLATES",
    "GLUE_TASKS",
    "IGNORE_INDEX",
    "LINE",
    "PHRASINGS",
    "BadRows",
    "ChoiceCollator",
    "ClassificationCollator",
    "ClassificationData",
    "GlueTask",
    "OnBadRow",
    "PackedCollator",
    "PaddingCollator",
    "Template",
    "assistant_spans",
    "chat_sample",
    "conversation_messages",
    "is_conversation",
    "render_chat",
    "set_chat_template",
    "chunk_text",
    "group_by_length",
    "infer_labels",
    "load_choices",
    "load_classification",
    "load_glue",
    "pack_examples",
    "padding_fraction",
    "read_records",
    "read_utf8",
    "render_prompt",
    "tokenize_choices",
    "tokenize_conversation",
    "tokenize_conversations",
    "tokenize_sft",
    "ungroup",
]
