"""Prompt tuning and prefix tuning: what they feed the model, generate and the KV cache, adapter management, files
that move both ways with HF PEFT, LoRA and prefix tuning together (learning on real models: test_prompt_prefix_real.py)."""

import copy
import json

import peft
import pytest
import torch
import transformers
from packaging.version import Version
from conftest import tiny_bert_classifier, tiny_llama
from safetensors.torch import load_file

import peftkit as pk
from peftkit.hf_compat import cache_arg, find_cache
from peftkit.tuners.prefix import PrefixTuningConfig
from peftkit.tuners.prompt import PromptTuningConfig

GEN = torch.Generator().manual_seed(1)
IDS = torch.randint(1, 128, (2, 6), generator=GEN)
MASK = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])  # left padding, as for generation


def logits(model, **inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def greedy_by_forward(pm, ids: torch.Tensor, mask: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy decoding with full forwards and no cache: the reference for generate's cached loop (positions count
    real tokens only, as generate numbers them under left padding)."""
    for _ in range(steps):
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        nxt = logits(pm, input_ids=ids, attention_mask=mask, position_ids=positions)[:, -1].argmax(-1, keepdim=True)
        ids, mask = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
    return ids


class WordTokenizer:
    """A stand-in tokenizer object: one id per word."""

    name_or_path = "word-tokenizer"

    def __call__(self, text: str) -> dict:
        return {"input_ids": [len(w) * 7 % 128 for w in text.split()]}


# ----------------------------------------------------------------------------------------------------------------
# Configs


def test_configs_use_hf_names_aliases_and_refuse_module_targeting():
    for alias, canonical in (("random", "RANDOM"), ("vocab", "SAMPLE_VOCAB"), ("SAMPLE_VOCAB", "SAMPLE_VOCAB")):
        assert PromptTuningConfig(num_virtual_tokens=3, prompt_tuning_init=alias).prompt_tuning_init == canonical
    text = PromptTuningConfig(num_virtual_tokens=3, prompt_tuning_init="text", prompt_tuning_init_text="a b", tokenizer=WordTokenizer())
    assert text.prompt_tuning_init == "TEXT" and text.tokenizer_name_or_path == "word-tokenizer"
    data = text.to_dict()
    assert "tokenizer" not in data and "target_modules" not in data
    assert data["peft_type"] == "PROMPT_TUNING" and data["tokenizer_name_or_path"] == "word-tokenizer"
    with pytest.raises(ValueError, match="needs prompt_tuning_init_text"):
        PromptTuningConfig(num_virtual_tokens=3, prompt_tuning_init="TEXT", tokenizer=WordTokenizer())
    with pytest.raises(ValueError, match="needs a tokenizer"):
        PromptTuningConfig(num_virtual_tokens=3, prompt_tuning_init="text", prompt_tuning_init_text="hi")
    with pytest.raises(ValueError, match="must be RANDOM, TEXT or SAMPLE_VOCAB"):
        PromptTuningConfig(num_virtual_tokens=3, prompt_tuning_init="zeros")
    with pytest.raises(ValueError, match="num_virtual_tokens must be a positive integer"):
        PrefixTuningConfig()
    with pytest.raises(ValueError, match="remove target_modules"):
        PrefixTuningConfig(num_virtual_tokens=3, target_modules=["q_proj"])


def test_sizes_are_read_from_the_model_as_hf_peft_does():
    prompt = pk.get_peft_model(tiny_llama(), PromptTuningConfig(num_virtual_tokens=5)).peft_config["default"]
    assert (prompt.token_dim, prompt.num_layers, prompt.num_attention_heads, prompt.num_transformer_submodules) == (64, 2, 4, 1)
    # grouped-query attention: the prefix has the cache's shape, head_dim (16) x num_key_value_heads (2)
    pm = pk.get_peft_model(tiny_llama(), PrefixTuningConfig(num_virtual_tokens=5))
    prefix = pm.peft_config["default"]
    assert (prefix.token_dim, prefix.num_attention_heads, prefix.encoder_hidden_size) == (32, 2, 32)
    assert pm.get_nb_trainable_parameters()[0] == 5 * 2 * 2 * 32
    projected = pk.get_peft_model(tiny_llama(), PrefixTuningConfig(num_virtual_tokens=5, prefix_projection=True, encoder_hidden_size=16))
    assert projected.get_nb_trainable_parameters()[0] == 5 * 32 + (32 * 16 + 16) + (16 * 128 + 128)


# ----------------------------------------------------------------------------------------------------------------
# Prompt tuning: what the model sees


def test_prompt_tuning_prepends_the_embeddings_and_extends_mask_and_labels():
    base = tiny_llama()
    pm = pk.get_peft_model(copy.deepcopy(base), PromptTuningConfig(num_virtual_tokens=4))
    prompts = pm.base_model.prompt_encoder["default"].embedding.weight.detach()
    embeds = torch.cat([prompts.expand(2, -1, -1), base.get_input_embeddings()(IDS)], 1)
    mask = torch.cat([torch.ones(2, 4, dtype=torch.long), MASK], 1)
    labels = torch.cat([torch.full((2, 4), -100), IDS], 1)
    with torch.no_grad():
        ours = pm(input_ids=IDS, attention_mask=MASK, labels=IDS)
        manual = base(inputs_embeds=embeds, attention_mask=mask, labels=labels)
    assert ours.logits.shape == (2, 10, 128)
    assert torch.equal(ours.logits, manual.logits) and torch.equal(ours.loss, manual.loss)
    # explicit positions number the real tokens after the virtual ones, as the default does
    positions = torch.arange(6).expand(2, -1)
    assert torch.equal(logits(pm, input_ids=IDS, position_ids=positions), logits(pm, input_ids=IDS))
    with pytest.raises(TypeError, match="pass input_ids=... .* by keyword"):
        pm(IDS)


def test_prompt_tuning_keeps_sequence_classification_labels():
    pm = pk.get_peft_model(tiny_bert_classifier(), PromptTuningConfig(num_virtual_tokens=3, task_type="SEQ_CLS")).eval()
    labels = torch.tensor([1, 0])
    with torch.no_grad():
        out = pm(input_ids=IDS, attention_mask=MASK, labels=labels)
    assert torch.equal(out.loss, torch.nn.functional.cross_entropy(out.logits, labels))


def test_prompt_init_from_text_vocab_and_tokenizer_name():
    base = tiny_llama()
    embed = base.get_input_embeddings().weight.detach()
    text = PromptTuningConfig(num_virtual_tokens=5, prompt_tuning_init="text", prompt_tuning_init_text="to be or", tokenizer=WordTokenizer())
    pm = pk.get_peft_model(copy.deepcopy(base), text)
    ids = torch.tensor(WordTokenizer()("to be or")["input_ids"] * 2)[:5]  # repeated, then cut, as HF PEFT does
    assert torch.equal(pm.base_model.prompt_encoder["default"].embedding.weight.detach(), embed[ids])
    vocab = pk.get_peft_model(copy.deepcopy(base), PromptTuningConfig(num_virtual_tokens=6, prompt_tuning_init="vocab"))
    rows = vocab.base_model.prompt_encoder["default"].embedding.weight.detach()
    assert all((embed == row).all(-1).any() for row in rows)
    # by name: the MiniLM tokenizer, on a BERT with its vocabulary size
    from transformers import BertConfig, BertForSequenceClassification

    bert = BertForSequenceClassification(BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2))
    named = PromptTuningConfig(num_virtual_tokens=4, prompt_tuning_init="TEXT", prompt_tuning_init_text="great movie", tokenizer_name_or_path="minilm-l6")
    pm = pk.get_peft_model(bert, named)
    wanted = pk.load_tokenizer("minilm-l6")("great movie")["input_ids"]  # [CLS] great movie [SEP]
    expected = bert.bert.embeddings.word_embeddings.weight.detach()[torch.tensor(wanted)]
    assert torch.equal(pm.base_model.prompt_encoder["default"].embedding.weight.detach(), expected)


def test_prompt_generate_returns_prompt_plus_new_tokens():
    pm = pk.get_peft_model(tiny_llama(), PromptTuningConfig(num_virtual_tokens=4)).eval()
    with torch.no_grad():
        out = pm.generate(input_ids=IDS, attention_mask=MASK, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 12) and torch.equal(out[:, :6], IDS)
    assert torch.equal(out, greedy_by_forward(pm, IDS, MASK, 6))


# ----------------------------------------------------------------------------------------------------------------
# Prefix tuning: what the model sees


def test_prefix_goes_through_the_cache_and_incremental_decoding_matches():
    base = tiny_llama()
    pm = pk.get_peft_model(copy.deepcopy(base), PrefixTuningConfig(num_virtual_tokens=3)).eval()
    full = logits(pm, input_ids=IDS, attention_mask=MASK)
    assert full.shape == (2, 6, 128) and (full - logits(base, input_ids=IDS, attention_mask=MASK)).abs().max() > 1e-3
    # a prefix of zeros keys/values still takes attention weight: it changes the output, as in HF PEFT
    # the cache goes back in under either name: ``cache`` (transformers >= 5.24) or ``past_key_values`` (before)
    for name in ("cache", "past_key_values"):
        with torch.no_grad():
            first = pm(input_ids=IDS[:, :4], attention_mask=MASK[:, :4], use_cache=True)
            cache = find_cache(first)
            assert cache.get_seq_length() == 3 + 4
            step = pm(input_ids=IDS[:, 4:], attention_mask=MASK, **{name: cache})
        assert (first.logits - full[:, :4]).abs().max() <= 1e-5
        assert (step.logits - full[:, 4:]).abs().max() <= 1e-5
    positions = torch.arange(6).expand(2, -1)
    assert (logits(pm, input_ids=IDS, position_ids=positions) - logits(pm, input_ids=IDS)).abs().max() <= 1e-6


def test_prefix_on_an_encoder_masks_padding():
    pm = pk.get_peft_model(tiny_bert_classifier(), PrefixTuningConfig(num_virtual_tokens=4, task_type="SEQ_CLS")).eval()
    alone = logits(pm, input_ids=IDS[1:, 2:])
    padded_ids = torch.cat([IDS[1:, 2:], torch.tensor([[5, 9]])], 1)
    padded = logits(pm, input_ids=padded_ids, attention_mask=torch.tensor([[1, 1, 1, 1, 0, 0]]))
    assert (alone - padded).abs().max() <= 1e-5
    with pm.disable_adapter():
        assert (logits(pm, input_ids=IDS[1:, 2:]) - alone).abs().max() > 1e-4


@pytest.mark.parametrize("projection", [False, True])
def test_prefix_generate_uses_the_kv_cache_after_the_prefix(projection):
    pm = pk.get_peft_model(tiny_llama(), PrefixTuningConfig(num_virtual_tokens=3, prefix_projection=projection)).eval()
    with torch.no_grad():
        out = pm.generate(input_ids=IDS, attention_mask=MASK, max_new_tokens=6, do_sample=False, pad_token_id=0)
        beams = pm.generate(input_ids=IDS, attention_mask=MASK, max_new_tokens=4, num_beams=3, num_return_sequences=2, pad_token_id=0)
        embeds = pm.generate(inputs_embeds=pm.get_input_embeddings()(IDS), attention_mask=MASK, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 12) and torch.equal(out[:, :6], IDS)
    assert torch.equal(out, greedy_by_forward(pm, IDS, MASK, 6))
    assert beams.shape == (4, 10)
    assert torch.equal(embeds, out[:, 6:])  # from embeddings, generate returns the new tokens only


# ----------------------------------------------------------------------------------------------------------------
# Adapter management


def test_not_mergeable_and_positional_inputs_refused():
    # (mixing per row is tested in test_mixed_methods.py)
    for config in (PromptTuningConfig(num_virtual_tokens=2), PrefixTuningConfig(num_virtual_tokens=2)):
        pm = pk.get_peft_model(tiny_llama(), config).eval()
        with pytest.raises(TypeError, match=f"is {config.peft_type}, which adds computation"):
            pm.merge_adapter()
        with pytest.raises(TypeError, match="by keyword"):
            pm(IDS, adapter_names=["default", "__base__"])


def test_switching_disabling_deleting_and_unloading():
    base = tiny_llama()
    pm = pk.get_peft_model(copy.deepcopy(base), PromptTuningConfig(num_virtual_tokens=3))
    pm.add_adapter("other", PromptTuningConfig(num_virtual_tokens=2))
    weights = {n: pm.base_model.prompt_encoder[n].embedding.weight for n in ("default", "other")}
    assert weights["default"].requires_grad and not weights["other"].requires_grad
    pm.set_adapter("other")
    assert weights["other"].requires_grad and not weights["default"].requires_grad
    assert pm.get_nb_trainable_parameters()[0] == 2 * 64
    pm.eval()
    assert logits(pm, input_ids=IDS).shape == (2, 8, 128)
    pm.set_adapter(["default", "other"])  # both: their tokens are prepended in this order, 3 + 2
    assert logits(pm, input_ids=IDS).shape == (2, 11, 128)
    with pm.disable_adapter():
        assert torch.equal(logits(pm, input_ids=IDS), logits(base, input_ids=IDS))
    pm.delete_adapter("other")
    assert list(pm.base_model.prompt_encoder) == ["default"] and pm.active_adapters == ["default"]
    plain = pm.unload()
    assert not hasattr(plain, "prompt_encoder")
    assert torch.equal(logits(plain, input_ids=IDS), logits(base, input_ids=IDS))


def test_projection_files_load_for_inference_only(tmp_path):
    pm = pk.get_peft_model(tiny_llama(), PrefixTuningConfig(num_virtual_tokens=3, prefix_projection=True)).eval()
    pm.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    encoder = pm.base_model.prefix_encoder["default"]
    with torch.no_grad():
        assert torch.equal(saved["prompt_embeddings"], encoder.transform(encoder.embedding.weight))
    loaded = pk.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert torch.equal(logits(loaded, input_ids=IDS), logits(pm, input_ids=IDS))
    with pytest.raises(ValueError, match="loads for inference only.*\"prefix_projection\": false"):
        pk.PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    data["prefix_projection"] = False
    (tmp_path / "adapter_config.json").write_text(json.dumps(data))
    resumed = pk.PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    assert resumed.get_nb_trainable_parameters()[0] == 3 * 2 * 2 * 32
    assert torch.equal(logits(resumed.eval(), input_ids=IDS), logits(pm, input_ids=IDS))


def test_a_file_for_another_model_is_refused(tmp_path):
    pk.get_peft_model(tiny_llama(layers=3), PrefixTuningConfig(num_virtual_tokens=3)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="num_layers=3 but the model has 2 layers"):
        pk.PeftModel.from_pretrained(tiny_llama(), tmp_path)


# ----------------------------------------------------------------------------------------------------------------
# Files both ways with HF PEFT


def randomise_heads(model: torch.nn.Module) -> None:
    """Move classifier copies (modules_to_save) off the base values, so the file must carry them."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "modules_to_save.default" in name:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)) * 0.5)


def compat_case(case: str, minilm):
    """(base model, config kwargs, forward inputs) for one interop case."""
    if case == "minilm-prefix":
        enc = minilm[1](["a gripping, funny film", "dull"], padding=True, return_tensors="pt")
        return minilm[0], dict(peft_type="prefix", num_virtual_tokens=5, task_type="SEQ_CLS"), dict(enc)
    if case == "bert-prompt":
        inputs = dict(input_ids=IDS, attention_mask=MASK.flip(1), token_type_ids=torch.zeros_like(IDS))
        return tiny_bert_classifier(), dict(peft_type="prompt", num_virtual_tokens=4, task_type="SEQ_CLS"), inputs
    method, _, projection = case.partition("-")
    kwargs = dict(peft_type=method, num_virtual_tokens=4, task_type="CAUSAL_LM")
    if projection:
        kwargs["prefix_projection"] = True
    return tiny_llama(), kwargs, dict(input_ids=IDS, attention_mask=MASK)


def make_config(library, kwargs: dict):
    kwargs = dict(kwargs)
    kind = kwargs.pop("peft_type")
    if library is pk:
        return (PromptTuningConfig if kind == "prompt" else PrefixTuningConfig)(**kwargs)
    return (peft.PromptTuningConfig if kind == "prompt" else peft.PrefixTuningConfig)(**kwargs)


def saved_and_loaded(tmp_path, base, kwargs: dict, writer, reader) -> tuple[torch.nn.Module, torch.nn.Module]:
    """An adapter made by ``writer`` (peftkit or peft) on a copy of ``base``, its heads randomised, saved, and loaded
    by ``reader`` into another copy: (written model, read model), both in eval mode."""
    written = writer.get_peft_model(copy.deepcopy(base), make_config(writer, kwargs))
    randomise_heads(written)
    written.eval()
    written.save_pretrained(tmp_path)
    return written, reader.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()


CASES = ["prompt", "prefix", "prefix-projection", "bert-prompt", "minilm-prefix"]

# Upstream breaks, checked against references computed by hand from the base model (see reference_forward):
# - transformers 5.24.0 renamed every model's ``past_key_values`` argument to ``cache``. HF PEFT 0.21.2 looks for the
#   old name in BERT's forward and refuses prefix tuning on it ("Model does not support past key values"), so on
#   5.24 the minilm-prefix case checks peftkit against the reference instead of against HF PEFT.
# - With transformers 5.24.0, HF PEFT 0.21.2's ``generate`` for prompt and prefix tuning returns other tokens than the
#   reference, greedy and beam alike, from the first or second new token on, while its logits still agree with ours
#   and the reference. peftkit equals the reference on 5.23.0 and 5.24.0. So generation is compared with the
#   reference, and with HF PEFT only on transformers < 5.24, where HF PEFT equals the reference too.
HF_PEFT_GENERATE_OK = Version(transformers.__version__) < Version("5.24")
HF_PEFT_PREFIX_ON_BERT = Version(transformers.__version__) < Version("5.24")


def adapter_values(pm) -> torch.Tensor:
    """The virtual tokens (prompt tuning) or the prefix P (prefix tuning) of a peftkit model's active adapter, as the
    file stores them."""
    model = pm.base_model
    encoder = model.prompt_encoder["default"] if hasattr(model, "prompt_encoder") else model.prefix_encoder["default"]
    return encoder.saved_embeddings()


def hand_prefix_cache(prefix: torch.Tensor, layers: int, heads: int, batch: int):
    """HF PEFT's layout, written out: row block 2l of P holds layer l's keys, block 2l+1 its values, each split
    into ``heads`` heads; every batch row gets the same prefix."""
    from transformers import DynamicCache

    count, width = prefix.shape[0], prefix.shape[1] // (2 * layers)
    pairs = []
    for layer in range(layers):
        key, value = (prefix[:, (2 * layer + i) * width : (2 * layer + i + 1) * width] for i in (0, 1))
        key, value = (t.reshape(count, heads, width // heads).transpose(0, 1).expand(batch, -1, -1, -1) for t in (key, value))
        pairs.append((key, value))
    return DynamicCache(pairs)


def reference_forward(base, kind: str, values: torch.Tensor, positions_from_mask: bool = False, **inputs) -> torch.Tensor:
    """The adapted model's logits computed from the base model alone: prompt tuning feeds [P ; E(x)] as
    ``inputs_embeds``, prefix tuning hands the prefix over as a filled key/value cache; the mask gets ones in front.
    ``positions_from_mask``: number the real tokens after the prefix, skipping padding, as ``generate`` does (else the
    model's default, as a plain forward without ``position_ids``)."""
    inputs = dict(inputs)
    ids, mask = inputs.pop("input_ids"), inputs.pop("attention_mask")
    count, batch = values.shape[0], ids.shape[0]
    mask = torch.cat([torch.ones(batch, count, dtype=mask.dtype), mask], 1)
    with torch.no_grad():
        if kind == "prompt":
            embeds = torch.cat([values.expand(batch, -1, -1), base.get_input_embeddings()(ids)], 1)
            if "token_type_ids" in inputs:
                inputs["token_type_ids"] = torch.cat([torch.zeros(batch, count, dtype=torch.long), inputs["token_type_ids"]], 1)
            return base(inputs_embeds=embeds, attention_mask=mask, **inputs).logits  # virtual positions included
        cfg = base.config
        heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        cache = hand_prefix_cache(values, cfg.num_hidden_layers, heads, batch)
        if positions_from_mask:
            inputs["position_ids"] = (mask[:, count:].cumsum(-1) - 1).clamp(min=0) + count
        return base(input_ids=ids, attention_mask=mask, **{cache_arg(base): cache}, **inputs).logits


def reference_beam_search(base, kind: str, values: torch.Tensor, steps: int, beams: int) -> torch.Tensor:
    """Beam search by full forwards, written out: per input row, keep the ``beams`` continuations with the highest
    summed log-probability, each extended by its ``2 x beams`` best tokens per step (greedy when ``beams`` is 1).
    With no end-of-sequence token among them, this is what ``generate`` returns (all beams have one length)."""
    eos = base.generation_config.eos_token_id
    rows = []
    for b in range(IDS.shape[0]):
        beam = [(0.0, [])]
        for _ in range(steps):
            grown = []
            for score, tokens in beam:
                extra = torch.tensor([tokens], dtype=torch.long)
                ids = torch.cat([IDS[b : b + 1], extra], 1)
                mask = torch.cat([MASK[b : b + 1], torch.ones_like(extra)], 1)
                logp = reference_forward(base, kind, values, True, input_ids=ids, attention_mask=mask)[0, -1].log_softmax(-1)
                top = logp.topk(2 * beams)
                grown += [(score + v, tokens + [i]) for v, i in zip(top.values.tolist(), top.indices.tolist())]
            beam = sorted(grown, key=lambda t: -t[0])[:beams]
        assert eos not in beam[0][1], "the reference stops at end-of-sequence only when none is generated"
        rows.append(beam[0][1])
    return torch.tensor(rows)


def check_generate_against_reference(base, kind: str, model, hf_model) -> None:
    """Greedy and beam ``generate`` of peftkit (and HF PEFT, where it works) equal the hand-written reference."""
    values = adapter_values(model)
    for beams, steps in ((1, 6), (2, 5)):
        expected = reference_beam_search(base, kind, values, steps, beams)
        with torch.no_grad():
            ours = model.generate(input_ids=IDS, attention_mask=MASK, max_new_tokens=steps, num_beams=beams, do_sample=False, pad_token_id=0)
            theirs = hf_model.generate(input_ids=IDS, attention_mask=MASK, max_new_tokens=steps, num_beams=beams, do_sample=False, pad_token_id=0)
        assert torch.equal(ours[:, IDS.shape[1]:], expected), (beams, ours, expected)
        if HF_PEFT_GENERATE_OK:
            assert torch.equal(theirs[:, IDS.shape[1]:], expected), (beams, theirs, expected)
    if kind == "prompt":  # and the base model's own generate on [P ; E(x)], for greedy and beams
        embeds = torch.cat([values.expand(2, -1, -1), base.get_input_embeddings()(IDS)], 1)
        mask = torch.cat([torch.ones(2, values.shape[0], dtype=torch.long), MASK], 1)
        for beams in (1, 3):
            with torch.no_grad():
                own = base.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=5, num_beams=beams, do_sample=False, pad_token_id=0)
                ours = model.generate(input_ids=IDS, attention_mask=MASK, max_new_tokens=5, num_beams=beams, do_sample=False, pad_token_id=0)
            assert torch.equal(ours[:, IDS.shape[1]:], own)


@pytest.mark.parametrize("case", CASES)
def test_peftkit_file_loads_in_hf(tmp_path, case, minilm):
    base, kwargs, inputs = compat_case(case, minilm)
    kind = kwargs["peft_type"]
    if case == "minilm-prefix" and not HF_PEFT_PREFIX_ON_BERT:  # see the note above CASES
        pm = pk.get_peft_model(copy.deepcopy(base), make_config(pk, kwargs)).eval()
        assert (logits(pm, **inputs) - reference_forward(base, kind, adapter_values(pm), **inputs)).abs().max() <= 1e-5
        return
    pm, hf = saved_and_loaded(tmp_path, base, kwargs, writer=pk, reader=peft)
    ours = logits(pm, **inputs)
    assert (logits(hf, **inputs) - ours).abs().max().item() <= 1e-5
    if kwargs["task_type"] == "CAUSAL_LM":  # (classifiers: the randomised heads live in the adapter, not in base)
        assert (reference_forward(base, kind, adapter_values(pm), **inputs) - ours).abs().max().item() <= 1e-5
    assert (logits(base, **inputs).shape != ours.shape) or ((logits(base, **inputs) - ours).abs().max().item() > 1e-4)


@pytest.mark.parametrize("case", CASES)
def test_hf_file_loads_in_peftkit(tmp_path, case, minilm):
    base, kwargs, inputs = compat_case(case, minilm)
    if case == "minilm-prefix" and not HF_PEFT_PREFIX_ON_BERT:
        pytest.skip(f"HF PEFT {peft.__version__} cannot build prefix tuning on BERT under transformers "
                    f"{transformers.__version__}, so it writes no file to read; test_peftkit_file_loads_in_hf checks "
                    "peftkit against the reference here")
    hf, pm = saved_and_loaded(tmp_path, base, kwargs, writer=peft, reader=pk)
    assert (logits(pm, **inputs) - logits(hf, **inputs)).abs().max().item() <= 1e-5
    if kwargs["task_type"] == "CAUSAL_LM":
        check_generate_against_reference(base, kwargs["peft_type"], pm, hf)


# ----------------------------------------------------------------------------------------------------------------
# LoRA and prefix tuning together


def test_lora_and_prefix_active_together_save_and_reload(tmp_path):
    base = tiny_llama()
    lora = pk.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    pm = pk.get_peft_model(copy.deepcopy(base), lora, adapter_name="lora")
    pm.add_adapter("prefix", PrefixTuningConfig(num_virtual_tokens=3))
    pm.set_adapter(["lora", "prefix"])
    trains = [n for n, p in pm.named_parameters() if p.requires_grad]
    assert any("lora_A.lora" in n for n in trains) and any("prefix_encoder.prefix" in n for n in trains)
    pm.eval()
    both = logits(pm, input_ids=IDS, attention_mask=MASK)
    for alone in ("lora", "prefix"):
        pm.set_adapter(alone)
        assert (logits(pm, input_ids=IDS, attention_mask=MASK) - both).abs().max() > 1e-3
    pm.set_adapter(["lora", "prefix"])
    with torch.no_grad():
        generated = pm.generate(input_ids=IDS, attention_mask=MASK, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(generated, greedy_by_forward(pm, IDS, MASK, 5))
    pm.save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"lora", "prefix"}
    fresh = pk.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "lora", adapter_name="lora")
    fresh.load_adapter(tmp_path / "prefix", "prefix")
    fresh.set_adapter(["lora", "prefix"])
    assert torch.equal(logits(fresh, input_ids=IDS, attention_mask=MASK), both)
    with torch.no_grad():
        assert torch.equal(fresh.generate(input_ids=IDS, attention_mask=MASK, max_new_tokens=5, do_sample=False, pad_token_id=0), generated)
    with pytest.raises(TypeError, match="PREFIX_TUNING"):
        fresh.merge_and_unload()
    plain = fresh.merge_and_unload(["lora"])  # LoRA merges; the prefix encoder goes with unload
    assert not hasattr(plain, "prefix_encoder")


def test_prompt_and_prefix_together_generate_in_prompt_first_order():
    pm = pk.get_peft_model(tiny_llama(), PromptTuningConfig(num_virtual_tokens=2), adapter_name="prompt")
    pm.add_adapter("prefix", PrefixTuningConfig(num_virtual_tokens=3))
    pm.set_adapter(["prompt", "prefix"])
    pm.eval()
    with torch.no_grad():
        out = pm.generate(input_ids=IDS, attention_mask=MASK, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(out, greedy_by_forward(pm, IDS, MASK, 4))
    pm.set_adapter(["prefix", "prompt"])
    with pytest.raises(ValueError, match="put the prompt-tuning adapter first"):
        pm.generate(input_ids=IDS, attention_mask=MASK, max_new_tokens=2)
