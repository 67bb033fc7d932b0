"""Adapters out of peftkit, for other runtimes: llama.cpp / Ollama GGUF (a LoRA adapter file, or a whole merged
model) and a portability report for HF PEFT, vLLM, llama.cpp and a merged GGUF.

- :func:`export_lora_gguf` (``peftkit export --to gguf``), :mod:`.gguf_lora`
- :func:`write_merged_gguf` (``peftkit merge --to gguf``), :mod:`.gguf_merged`
- :func:`portability` (``peftkit inspect --portable``), :mod:`.portable`
- :mod:`.gguf_base`: the Hugging Face -> GGUF name table and llama.cpp's layout conventions; :mod:`.rules`: which
  runtime takes which method.
"""

from .gguf_base import GgufBase, read_gguf_base
from .gguf_lora import export_lora_gguf, resolve_base
from .gguf_merged import OUTTYPES, check_merge_base, write_merged_gguf

__all__ = ["GgufBase", "OUTTYPES", "check_merge_base", "export_lora_gguf", "read_gguf_base", "resolve_base", "write_merged_gguf"]
