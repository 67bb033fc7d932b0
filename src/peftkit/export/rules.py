"""Which runtimes take which adapter methods, and what to do instead: one table, read by ``export`` (to refuse with
the reason) and by ``inspect --portable`` (to report it).

Sources of the rules:
- llama.cpp (``src/llama-adapter.cpp``): an adapter GGUF may hold only ``*.lora_a`` / ``*.lora_b`` pairs (and norm
  vectors it ignores); anything else is "unexpected suffix". So LoRA only, no DoRA, no biases, no full modules.
- vLLM (``vllm/lora/peft_helper.py``, ``_validate_features`` / ``validate_legal``): LoRA only; "vLLM only
  supports modules_to_save being None" (newest versions also allow ["classifier", "score"] for classification
  models); no DoRA; rank above ``--max-lora-rank`` (default 16) refused; "Adapter bias is not supported"; targets
  must be modules its LoRA layers wrap ("expected target modules in [...] but received [...]").
- A merged model needs the update to fold into existing weights: LoRA and (IA)^3 do; layers or tokens that are
  added (bottleneck adapters, prompt/prefix tuning) cannot.
"""

from __future__ import annotations

MERGEABLE = ("LORA", "IA3")  # methods `peftkit merge --to gguf` writes (proven against llama.cpp for LoRA and (IA)^3)

# peft_type -> why llama.cpp cannot load it as an adapter, and what to do instead.
LLAMA_CPP_REFUSALS = {
    "IA3": "(IA)^3 rescales activations and llama.cpp loads LoRA adapters only: merge it first "
           "(peftkit merge --adapter A --to gguf --out model.gguf)",
    "BOTTLENECK": "bottleneck adapters: llama.cpp has no such layer and they cannot be merged; serve them with peftkit",
    "PROMPT_TUNING": "prompt tuning adds virtual tokens, which llama.cpp adapters cannot hold and which cannot be merged; "
                     "serve it with peftkit",
    "PREFIX_TUNING": "prefix tuning adds key/value prefixes, which llama.cpp adapters cannot hold and which cannot be "
                     "merged; serve it with peftkit",
    "BITFIT": "BitFit trains the base model's own biases, which a llama.cpp adapter cannot hold: merge it into a "
              "Hugging Face folder (peftkit merge) and convert that with llama.cpp's convert_hf_to_gguf.py",
    "SELECTIVE": "selective fine-tuning trains the base model's own weights, which a llama.cpp adapter cannot hold: "
                 "merge it into a Hugging Face folder (peftkit merge) and convert that with convert_hf_to_gguf.py",
}

VLLM_REFUSALS = {
    "IA3": "vLLM serves LoRA adapters only: merge the (IA)^3 adapter (peftkit merge) and serve the merged model",
    "BOTTLENECK": "vLLM serves LoRA adapters only, and bottleneck adapters cannot be merged; serve them with peftkit",
    "PROMPT_TUNING": "vLLM serves LoRA adapters only (it has no prompt-tuning adapters); serve it with peftkit",
    "PREFIX_TUNING": "vLLM serves LoRA adapters only (it has no prefix-tuning adapters); serve it with peftkit",
    "BITFIT": "vLLM serves LoRA adapters only: merge BitFit (peftkit merge) and serve the merged model",
    "SELECTIVE": "vLLM serves LoRA adapters only: merge the selected weights (peftkit merge) and serve the merged model",
}

# vLLM's default --max-lora-rank and the largest value it accepts (vllm/config/lora.py: 1 ... 512).
VLLM_DEFAULT_MAX_RANK, VLLM_MAX_RANK = 16, 512
# Module names vLLM's LoRA layers wrap in Llama-family models (packed qkv / gate_up keep the HF names in files).
VLLM_LLAMA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                      "embed_tokens", "lm_head")
