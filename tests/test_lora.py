"""LoRA mechanics: identity at init, the formula, targeting, named adapters, merging, mixed batches, weighting."""

import math

import pytest
import torch
from conftest import tiny_bert_classifier, tiny_gpt2, tiny_llama
from torch import nn

import peftkit as pk
from peftkit.tuners.lora import LoraEmbedding, LoraLayer
from peftkit.tuners.mixed_batch import MixedBatch, Scratch, gather_rows


def randomize_b(pm: pk.PeftModel, adapter: str, seed: int = 1) -> None:
    """Give an adapter a non-zero update (B = 0 at init makes every output trivially equal)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in pm.adapter_layers():
            if isinstance(layer, (LoraLayer, LoraEmbedding)) and adapter in layer.adapter_names:
                _, B = layer.factor_tensors(adapter)
                B.copy_(torch.randn(B.shape, generator=g) * 0.1)


def logits(model, x, **kw):
    with torch.no_grad():
        return model(input_ids=x, **kw).logits


X = torch.randint(0, 128, (3, 12), generator=torch.Generator().manual_seed(0))


def assert_mixed_equals_solo(pm, names: list[str], x: torch.Tensor = X) -> None:
    """Row i of a mixed batch over ``x`` equals adapter names[i] run alone on row i (the base model for
    ``"__base__"``), within 1e-5."""
    mixed = logits(pm, x, adapter_names=names)
    for row, name in enumerate(names):
        if name == "__base__":
            with pm.disable_adapter():
                solo = logits(pm, x[row : row + 1])
        else:
            pm.set_adapter(name)
            solo = logits(pm, x[row : row + 1])
        assert (mixed[row] - solo[0]).abs().max().item() < 1e-5, (names, name)


@pytest.mark.parametrize("factory,targets", [(tiny_llama, ["q_proj", "v_proj"]), (tiny_gpt2, ["c_attn"]), (tiny_llama, ["embed_tokens"])])
def test_identity_at_init(factory, targets):
    model = factory()
    ref = logits(model, X)
    pm = pk.get_peft_model(model, pk.LoraConfig(r=4, target_modules=targets))
    assert torch.equal(logits(pm, X), ref)


def test_formula_linear():
    layer = nn.Linear(16, 8)
    model = nn.Sequential(layer)
    pm = pk.get_peft_model(model, pk.LoraConfig(r=4, lora_alpha=8, target_modules=["0"], init_lora_weights=False))
    wrapped = model[0]
    x = torch.randn(5, 16)
    A, B = wrapped.factor_tensors("default")
    expected = x @ layer.weight.T + layer.bias + (8 / 4) * x @ A.T @ B.T
    assert torch.allclose(pm(x), expected, atol=1e-6)
    assert wrapped.scaling["default"] == 2.0


def test_rslora_and_patterns():
    model = tiny_llama()
    config = pk.LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj"],
                           rank_pattern={"v_proj": 2}, alpha_pattern={"layers.1.self_attn.q_proj": 32})
    pm = pk.get_peft_model(model, config)
    q0 = pm.base_model.model.layers[0].self_attn.q_proj
    q1 = pm.base_model.model.layers[1].self_attn.q_proj
    v0 = pm.base_model.model.layers[0].self_attn.v_proj
    assert q0.scaling["default"] == pytest.approx(8 / math.sqrt(4))
    assert q1.scaling["default"] == pytest.approx(32 / math.sqrt(4))
    assert v0.r["default"] == 2 and v0.lora_A["default"].weight.shape == (2, 64)


def test_gaussian_init_std():
    model = nn.Sequential(nn.Linear(512, 512))
    pk.get_peft_model(model, pk.LoraConfig(r=16, target_modules=["0"], init_lora_weights="gaussian"))
    A, B = model[0].factor_tensors("default")
    assert A.std().item() == pytest.approx(1 / 16, rel=0.05)
    assert torch.count_nonzero(B) == 0


def test_targeting_forms_and_errors():
    assert len(pk.tuners.base.find_targets(tiny_llama(), pk.LoraConfig(target_modules="all-linear"))) == 2 * 7
    names = pk.tuners.base.find_targets(tiny_llama(), pk.LoraConfig(target_modules=r".*\.(q|k)_proj"))
    assert len(names) == 4 and all(n.endswith(("q_proj", "k_proj")) for n in names)
    names = pk.tuners.base.find_targets(
        tiny_llama(), pk.LoraConfig(target_modules="all-linear", exclude_modules=["mlp.down_proj"], layers_to_transform=1)
    )
    assert len(names) == 6 and all(".layers.1." in n for n in names)
    assert "lm_head" not in str(pk.tuners.base.find_targets(tiny_llama(), pk.LoraConfig(target_modules="all-linear")))
    with pytest.raises(ValueError) as err:
        pk.get_peft_model(tiny_llama(), pk.LoraConfig(target_modules=["query"]))
    assert "q_proj (Linear) x2" in str(err.value) and "matched no module" in str(err.value)


def test_only_adapter_params_train():
    model = tiny_llama()
    pm = pk.get_peft_model(model, pk.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n and ".default." in n for n in trainable)
    # per layer: q_proj 64 -> 64 (4*64 + 64*4) and v_proj 64 -> 32 (4*64 + 32*4); two layers
    assert pm.get_nb_trainable_parameters()[0] == 2 * ((4 * 64 + 64 * 4) + (4 * 64 + 32 * 4)) == 1792
    pm.train()
    loss = pm(input_ids=X, labels=X).loss
    loss.backward()
    assert all(p.grad is None for n, p in pm.named_parameters() if "lora_" not in n)
    # B = 0 at init, so only B receives a non-zero gradient on the first step
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in pm.named_parameters() if "lora_B" in n)


def test_bias_options():
    pm = pk.get_peft_model(tiny_gpt2(), pk.LoraConfig(r=2, target_modules=["c_attn"], bias="lora_only"))
    trainable = [n for n, p in pm.named_parameters() if p.requires_grad and "lora_" not in n]
    assert trainable and all(n.endswith("c_attn.base_layer.bias") for n in trainable)
    keys = pm.adapter_tensors("default")
    assert "base_model.model.transformer.h.0.attn.c_attn.bias" in keys
    pm_all = pk.get_peft_model(tiny_gpt2(), pk.LoraConfig(r=2, target_modules=["c_attn"], bias="all"))
    n_bias = sum(1 for n, p in pm_all.named_parameters() if p.requires_grad and n.endswith("bias"))
    assert n_bias == sum(1 for n, _ in tiny_gpt2().named_parameters() if n.endswith("bias"))


def test_named_adapters_set_delete_disable():
    model = tiny_llama()
    base = logits(model, X)
    pm = pk.get_peft_model(model, pk.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    pm.add_adapter("other", pk.LoraConfig(r=2, target_modules=["k_proj"]))
    randomize_b(pm, "default", 1)
    randomize_b(pm, "other", 2)
    assert pm.active_adapters == ["default"]
    out_default = logits(pm, X)
    pm.set_adapter("other")
    out_other = logits(pm, X)
    assert not torch.allclose(out_default, out_other)
    assert {n for n, p in pm.named_parameters() if p.requires_grad} == {
        n for n, _ in pm.named_parameters() if ".other." in n
    }
    pm.set_adapter(["default", "other"])
    both = logits(pm, X)
    assert not torch.allclose(both, out_default) and not torch.allclose(both, out_other)
    with pm.disable_adapter():
        assert torch.equal(logits(pm, X), base)
    pm.delete_adapter("other")
    assert pm.active_adapters == ["default"] and list(pm.peft_config) == ["default"]
    assert torch.allclose(logits(pm, X), out_default)
    with pytest.raises(ValueError, match="unknown adapter"):
        pm.set_adapter("nope")
    with pytest.raises(ValueError, match="exists already"):
        pm.add_adapter("default", pk.LoraConfig(target_modules=["q_proj"]))
    # deleting the active adapter activates the next one, which then trains (only its flags change)
    pm.add_adapter("third", pk.LoraConfig(r=2, target_modules=["k_proj"]))
    pm.add_adapter("frozen", pk.LoraConfig(r=2, target_modules=["v_proj"], inference_mode=True))
    assert {n for n, p in pm.named_parameters() if p.requires_grad} == {n for n, _ in pm.named_parameters() if ".default." in n}
    pm.delete_adapter("default")
    assert pm.active_adapters == ["third"]
    assert {n for n, p in pm.named_parameters() if p.requires_grad} == {n for n, _ in pm.named_parameters() if ".third." in n}
    pm.delete_adapter("third")  # an inference-mode adapter becomes active: nothing trains
    assert pm.active_adapters == ["frozen"] and not any(p.requires_grad for p in pm.parameters())


@pytest.mark.parametrize("factory,targets", [(tiny_llama, "all-linear"), (tiny_gpt2, ["c_attn", "c_fc"]), (tiny_llama, ["embed_tokens", "q_proj"])])
def test_merge_unmerge_unload(factory, targets):
    model = factory()
    base = logits(model, X)
    pm = pk.get_peft_model(model, pk.LoraConfig(r=4, lora_alpha=16, target_modules=targets))
    randomize_b(pm, "default")
    unmerged = logits(pm, X)
    pm.merge_adapter()
    merged = logits(pm, X)
    assert ((merged - unmerged).abs().max() / unmerged.abs().max()).item() <= 1e-4
    pm.unmerge_adapter()
    assert torch.allclose(logits(pm, X), unmerged, atol=1e-5)
    plain = pm.merge_and_unload()
    assert not any(isinstance(m, (LoraLayer, LoraEmbedding)) for m in plain.modules())
    assert torch.allclose(logits(plain, X), merged, atol=1e-6)
    pm2 = pk.get_peft_model(factory(), pk.LoraConfig(r=4, target_modules=targets))
    randomize_b(pm2, "default")
    assert torch.equal(logits(pm2.unload(), X), base)


def test_mixed_batch_equals_solo_runs():
    model = tiny_llama()
    pm = pk.get_peft_model(model, pk.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "embed_tokens"]))
    pm.add_adapter("b", pk.LoraConfig(r=8, lora_alpha=4, target_modules="all-linear"))
    pm.add_adapter("c", pk.LoraConfig(r=2, target_modules=["k_proj"], use_rslora=True))
    for i, name in enumerate(pm.peft_config):
        randomize_b(pm, name, seed=i + 1)
    pm.eval()
    assert_mixed_equals_solo(pm, ["c", "__base__", "default", "b", "default"], torch.randint(0, 128, (5, 9)))


def test_a_layer_gathers_only_the_rows_whose_adapter_it_holds():
    """Rows whose adapter does not target a layer (and the base's rows) are left out of its per-row gather: the
    members of a set of slots, per segment, worked out once per forward; a layer no row's adapter targets adds
    nothing. The outputs stay each row's solo run, for per-row and per-token (fused) batches."""
    mixed = MixedBatch.build(("__base__", "a", "b", "c"), [0, 2, 1, 2, 3, 3], torch.device("cpu"), per_token=True)
    rows, slots = mixed.members(frozenset({2, 3}))
    assert rows.tolist() == [1, 3, 4, 5] and slots.tolist() == [2, 2, 3, 3]
    rows, slots = mixed.members(frozenset({2, 3}), 2, 4)  # positions counted from the segment's start
    assert rows.tolist() == [1] and slots.tolist() == [2]
    assert mixed.members(frozenset({1, 2, 3}), 1, 6) is True and mixed.members(frozenset({1}), 3, 6) is None
    assert mixed.members(frozenset({2, 3}))[0] is mixed.members(frozenset({2, 3}))[0]  # (asked again: kept)

    pm = pk.get_peft_model(tiny_llama(), pk.LoraConfig(r=4, target_modules=["q_proj"]), "q")
    pm.add_adapter("mlp", pk.LoraConfig(r=8, target_modules=["up_proj", "down_proj"]))
    pm.add_adapter("all", pk.LoraConfig(r=2, target_modules="all-linear"))
    for i, name in enumerate(pm.peft_config):
        randomize_b(pm, name, seed=i + 1)
    pm.eval()
    for names in (["q", "mlp", "__base__"], ["mlp", "q", "mlp"], ["all", "q", "__base__"]):
        assert_mixed_equals_solo(pm, names)
    embeds = pm.get_input_embeddings()(X).detach().requires_grad_(True)  # autograd on: added out of place
    out = pm(inputs_embeds=embeds, adapter_names=["mlp", "q", "__base__"]).logits
    out.square().sum().backward()
    with torch.no_grad():
        again = pm(inputs_embeds=embeds.detach(), adapter_names=["mlp", "q", "__base__"]).logits
    assert (out.detach() - again).abs().max().item() < 1e-6 and torch.isfinite(embeds.grad).all()


def test_mixed_batch_with_an_adapter_added_under_inference_mode():
    """An adapter added inside torch.inference_mode (its tensors then keep no version counter) serves in a mixed
    batch like the others, each row equal to its solo run, and is seen when its weights' storage is replaced."""
    pm = pk.get_peft_model(tiny_llama(), pk.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False), "a")
    pm.eval()
    with torch.inference_mode():
        pm.add_adapter("b", pk.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
        assert_mixed_equals_solo(pm, ["b", "a", "__base__"])
        layer = pm.base_model.model.layers[0].self_attn.q_proj
        layer.lora_B["b"].weight.data = torch.randn_like(layer.lora_B["b"].weight)
        assert_mixed_equals_solo(pm, ["a", "b", "b"])


def test_a_forward_checks_only_its_own_slots_and_a_later_one_sees_the_others_change():
    """A mixed forward brings up to date only the slots its rows use (a server's step then checks its own adapters,
    not every resident one's); an adapter changed meanwhile, in place or by new storage, is served with its new
    values by the first forward that uses it, and the stacks' record of each slot stays true."""
    pm = pk.get_peft_model(tiny_llama(), pk.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False), "a")
    pm.add_adapter("b", pk.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    pm.add_adapter("c", pk.LoraConfig(r=4, target_modules=["v_proj"], init_lora_weights=False))
    for name in ("d", "e", "f"):  # (resident adapters the forwards below mostly do not use)
        pm.add_adapter(name, pk.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    pm.eval()
    assert_mixed_equals_solo(pm, ["a", "b", "c"])
    q = pm.base_model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        q.lora_B["b"].weight.mul_(3.0)  # in place, while no forward reads b
    assert_mixed_equals_solo(pm, ["a", "c", "__base__"])  # b's slot is not read here (nor brought up to date)
    assert not q._stacks._current([pm._slots.names.index("b") + 1])
    assert_mixed_equals_solo(pm, ["b", "a", "b"])  # the first forward that reads b serves its new values
    assert q._stacks._current(range(len(q._stacks.keys)))
    q.lora_A["b"].weight.data = torch.randn_like(q.lora_A["b"].weight)  # new storage, the same parameter object
    assert_mixed_equals_solo(pm, ["c", "c", "a"])
    assert_mixed_equals_solo(pm, ["c", "b", "__base__"])
    with torch.inference_mode():  # the same in a server's inference mode
        assert_mixed_equals_solo(pm, ["b", "a", "c"])


def test_mixed_batch_sees_replaced_weights_and_modules():
    """Replacing an adapter's parameter or module object (not its values in place) is seen by the next mixed batch,
    as are weights loaded with load_state_dict(assign=True); a new adapter's modules are not replacements."""
    from peftkit.tuners.layer import Replacements

    pm = pk.get_peft_model(tiny_llama(), pk.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False), "a")
    pm.add_adapter("b", pk.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    pm.eval()
    assert_mixed_equals_solo(pm, ["b", "a", "__base__"])
    layer = pm.base_model.model.layers[0].self_attn.q_proj
    layer.lora_B["b"].weight = nn.Parameter(torch.randn_like(layer.lora_B["b"].weight))
    assert_mixed_equals_solo(pm, ["a", "b", "b"])
    fresh = nn.Linear(2, layer.lora_B["b"].out_features, bias=False)
    layer.lora_B["b"] = fresh
    assert_mixed_equals_solo(pm, ["b", "a", "b"])
    state = {k: torch.randn_like(v) for k, v in pm.state_dict().items() if "lora_A.a" in k}
    pm.load_state_dict(state, strict=False, assign=True)
    assert_mixed_equals_solo(pm, ["a", "__base__", "b"])
    before = Replacements.count
    pm.add_adapter("c", pk.LoraConfig(r=2, target_modules=["v_proj"], init_lora_weights=False))
    assert Replacements.count == before


def test_mixed_batch_gathers_reuse_one_buffer_only_without_autograd():
    """Per-row gathers go into the mixed batch's scratch buffers when autograd is off (the values of a fresh gather)
    and are fresh tensors while it records, so a backward pass through a mixed batch still works and agrees."""
    stack, index, scratch = torch.randn(4, 3, 5), torch.tensor([2, 0, 2]), Scratch()
    with torch.no_grad():
        a = gather_rows(stack, index, 3, scratch, "k")
        assert torch.equal(a, stack[index]) and a.data_ptr() == scratch.buffers["k"].data_ptr()
        b = gather_rows(stack[:, :2], index[:2], 2, scratch, "k")  # a smaller gather: the same buffer
        assert b.data_ptr() == a.data_ptr() and torch.equal(b, stack[:, :2][index[:2]])
    assert gather_rows(stack, index, 3, scratch, "k").data_ptr() != scratch.buffers["k"].data_ptr()

    pm = pk.get_peft_model(tiny_llama(), pk.LoraConfig(r=4, target_modules="all-linear"))
    pm.add_adapter("b", pk.LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    for i, name in enumerate(pm.peft_config):
        randomize_b(pm, name, seed=i + 1)
    pm.eval()
    names = ["b", "default", "b"]
    embeds = pm.get_input_embeddings()(X).detach().requires_grad_(True)
    out = pm(inputs_embeds=embeds, adapter_names=names).logits
    out.square().sum().backward()
    assert embeds.grad is not None and embeds.grad.abs().sum() > 0 and torch.isfinite(embeds.grad).all()
    with torch.inference_mode():
        again = pm(inputs_embeds=embeds.detach(), adapter_names=names).logits
    assert (out.detach() - again).abs().max().item() < 1e-6


def test_mixed_batch_of_one_adapter_equals_solo_without_the_per_row_gather():
    """Every row on one adapter (a server with one adapter, or a batch of one): the layers use that slot's factors
    directly instead of gathering a copy per row, and layers the adapter does not target stay the base's."""
    pm = pk.get_peft_model(tiny_llama(), pk.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), "a")
    pm.add_adapter("b", pk.LoraConfig(r=8, lora_alpha=4, target_modules="all-linear"))
    pm.add_adapter("c", pk.LoraConfig(r=2, target_modules=["k_proj"]))
    for i, name in enumerate(pm.peft_config):
        randomize_b(pm, name, seed=i + 1)
    pm.eval()
    assert MixedBatch.build(("__base__", "a", "b"), [2, 2], torch.device("cpu")).single == 2
    assert MixedBatch.build(("__base__", "a", "b"), [2, 1], torch.device("cpu")).single is None
    x = torch.randint(0, 128, (3, 7))
    for name in ("a", "b", "c"):
        pm.set_adapter(name)
        assert (logits(pm, x, adapter_names=[name] * 3) - logits(pm, x)).abs().max().item() < 1e-5, name
    with pm.disable_adapter():
        base = logits(pm, x)
    assert torch.equal(logits(pm, x, adapter_names=["__base__"] * 3), base)


def test_mixed_batch_sees_weights_changed_in_place_and_new_adapters():
    """The per-layer stacks are cached between forwards: in-place updates and added adapters must reach them."""
    pm = pk.get_peft_model(tiny_llama(), pk.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    pm.add_adapter("b", pk.LoraConfig(r=2, target_modules=["v_proj"]))
    randomize_b(pm, "default", seed=1)
    pm.eval()

    assert_mixed_equals_solo(pm, ["default", "b", "default"])
    randomize_b(pm, "b", seed=2)  # in place, like an optimizer step or a reload
    assert_mixed_equals_solo(pm, ["b", "default", "b"])
    pm.add_adapter("c", pk.LoraConfig(r=4, target_modules=["q_proj"]))
    randomize_b(pm, "c", seed=3)
    assert_mixed_equals_solo(pm, ["c", "b", "default"])


def test_mixed_batch_slots_are_updated_in_place_and_never_stale():
    """Adapters keep their slot in the layers' stacks: a load rewrites one slot in place (no rebuild of all), a
    deleted adapter's slot is reused, a name deleted and loaded again with other weights (between two forwards)
    is never served the old ones, and a larger rank than the stacks hold rebuilds them."""
    pm = pk.get_peft_model(tiny_llama(), pk.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), "a")
    for name, seed in (("b", 2), ("c", 3)):
        pm.add_adapter(name, pk.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
        randomize_b(pm, name, seed=seed)
    randomize_b(pm, "a", seed=1)
    pm.eval()
    layer = next(m for m in pm.modules() if isinstance(m, LoraLayer))

    assert_mixed_equals_solo(pm, ["a", "b", "c"])
    stacks = layer._stacks.value
    pm.delete_adapter("b")
    pm.add_adapter("b", pk.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))  # same name, new weights, same slot
    randomize_b(pm, "b", seed=7)
    assert pm._slots.names == ["a", "b", "c"]
    assert_mixed_equals_solo(pm, ["c", "b", "a"])
    assert layer._stacks.value[0] is stacks[0]  # rewritten in place
    pm.delete_adapter("c")
    assert pm._slots.names == ["a", "b"]
    assert_mixed_equals_solo(pm, ["b", "a", "b"])
    pm.add_adapter("d", pk.LoraConfig(r=16, target_modules=["q_proj"]))  # larger than the stacks' rank: rebuilt
    randomize_b(pm, "d", seed=8)
    assert_mixed_equals_solo(pm, ["d", "a", "b"])
    assert layer._stacks.value[0].shape[1] == 16


def test_mixed_batch_after_deleting_the_only_adapter_of_some_layers():
    pm = pk.get_peft_model(tiny_llama(), pk.LoraConfig(r=4, target_modules=["q_proj"]), "gone")
    pm.add_adapter("kept", pk.LoraConfig(r=4, target_modules=["v_proj"]))
    randomize_b(pm, "kept", seed=5)
    pm.delete_adapter("gone")  # the q_proj layers keep their wrapper but hold no adapter
    pm.eval()
    mixed = logits(pm, X, adapter_names=["kept", "__base__", "kept"])
    solo = logits(pm, X)
    with pm.disable_adapter():
        base = logits(pm, X)
    assert (mixed[[0, 2]] - solo[[0, 2]]).abs().max().item() < 1e-5
    assert (mixed[1] - base[1]).abs().max().item() < 1e-6
    assert (solo - base).abs().max().item() > 1e-3  # the kept adapter does change the output


def test_mixed_batch_generate_matches_solo():
    pm = pk.get_peft_model(tiny_llama(), pk.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    pm.add_adapter("b", pk.LoraConfig(r=4, target_modules=["o_proj"]))
    randomize_b(pm, "default", 3)
    randomize_b(pm, "b", 4)
    pm.eval()
    x = torch.randint(1, 128, (3, 6))
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    names = ["b", "default", "__base__"]
    with torch.no_grad():
        mixed = pm.generate(input_ids=x, adapter_names=names, **kw)
        for row, name in enumerate(names):
            if name == "__base__":
                with pm.disable_adapter():
                    solo = pm.generate(input_ids=x[row : row + 1], **kw)
            else:
                pm.set_adapter(name)
                solo = pm.generate(input_ids=x[row : row + 1], **kw)
            assert torch.equal(mixed[row], solo[0]), name


def test_mixed_batch_errors():
    pm = pk.get_peft_model(tiny_llama(), pk.LoraConfig(r=4, target_modules=["q_proj"]))
    pm.train()
    with pytest.raises(RuntimeError, match="model.eval"):
        pm(input_ids=X, adapter_names=["default"] * 3)
    pm.eval()
    with pytest.raises(ValueError, match="3 rows"):
        pm(input_ids=X, adapter_names=["default"] * 2)
    with pytest.raises(ValueError, match="unknown adapter"):
        pm(input_ids=X, adapter_names=["default", "x", "default"])
    pm.merge_adapter()
    with pytest.raises(RuntimeError, match="merged"):
        pm(input_ids=X, adapter_names=["default"] * 3)


def test_modules_to_save_seq_cls():
    model = tiny_bert_classifier()
    pm = pk.get_peft_model(model, pk.LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS"))
    assert pm.peft_config["default"].modules_to_save == ["classifier"]
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert "base_model.classifier.modules_to_save.default.weight" in trainable
    assert "base_model.model.classifier.weight" in pm.adapter_tensors("default")


@pytest.mark.parametrize("combination", ["linear", "cat", "svd"])
def test_add_weighted_adapter(combination):
    pm = pk.get_peft_model(tiny_llama(), pk.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    pm.add_adapter("b", pk.LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    randomize_b(pm, "default", 1)
    randomize_b(pm, "b", 2)
    pm.add_weighted_adapter(["default", "b"], [0.7, 0.3], "mix", combination_type=combination)
    q = pm.base_model.model.layers[0].self_attn.q_proj
    expected = 0.7 * q.delta_weight("default") + 0.3 * q.delta_weight("b")
    got = q.delta_weight("mix")
    if combination == "linear":  # HF's rule mixes the factors: (sum a_i B_i)(sum b_i A_i), cross terms included
        A = [q.factor_tensors(n)[0] for n in ("default", "b")]
        B = [q.factor_tensors(n)[1] for n in ("default", "b")]
        w = [math.sqrt(0.7 * q.scaling["default"]), math.sqrt(0.3 * q.scaling["b"])]
        assert torch.allclose(got, (w[0] * B[0] + w[1] * B[1]) @ (w[0] * A[0] + w[1] * A[1]), atol=1e-5)
    elif combination == "cat":  # exact
        assert torch.allclose(got, expected, atol=1e-5)
    else:  # best rank-4 approximation: the error is the norm of the dropped singular values
        dropped = torch.linalg.svdvals(expected)[4:].norm()
        assert (got - expected).norm().item() == pytest.approx(dropped.item(), rel=1e-3, abs=1e-6)
    assert q.r["mix"] == {"linear": 4, "cat": 8, "svd": 4}[combination]


def test_an_adapter_added_in_eval_mode_runs_no_dropout():
    """New adapter modules take the model's mode: added to a model in eval mode, dropout stays off (twice the same
    logits), and training mode still turns it on."""
    pm = pk.get_peft_model(tiny_llama(), pk.LoraConfig(r=4, target_modules=["q_proj"]))
    pm.eval()
    pm.add_adapter("late", pk.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.5))
    randomize_b(pm, "late", seed=3)
    pm.set_adapter("late")
    assert not any(m.training for m in pm.modules())
    assert torch.equal(logits(pm, X), logits(pm, X))
    pm.train()
    assert pm.base_model.model.layers[0].self_attn.v_proj.lora_dropout["late"].training


def test_replace_adapter_reuses_the_layers_of_one_layout():
    """replace_adapter puts a new adapter in an old one's layers and slot when both have one layout: its outputs
    (alone and in a mixed batch) equal the new adapter loaded on its own, the other adapters are untouched, a
    different alpha gives the new scale; another layout is refused with nothing changed, bad values raise with
    the old adapter intact."""
    config = lambda r=4, alpha=8, targets=("q_proj", "v_proj"): pk.LoraConfig(  # noqa: E731
        r=r, lora_alpha=alpha, target_modules=list(targets), inference_mode=True)

    def files(seed: int, **kw) -> tuple[pk.LoraConfig, dict[str, torch.Tensor]]:  # an adapter as a file holds it
        donor = pk.get_peft_model(tiny_llama(), config(**kw), "x")
        randomize_b(donor, "x", seed=seed)
        return donor.peft_config["x"], {k: v.clone() for k, v in donor.adapter_tensors("x").items()}

    def alone(cfg, tensors) -> torch.Tensor:
        ref = pk.PeftModel.from_tensors(tiny_llama(), "x", cfg, tensors).eval()
        return logits(ref, X)

    pm = pk.get_peft_model(tiny_llama(), config(), "a")
    for name, seed in (("b", 2), ("c", 3)):
        pm.add_adapter(name, config())
        randomize_b(pm, name, seed=seed)
    randomize_b(pm, "a", seed=1)
    pm.eval()
    pm.set_adapter("b")
    before_b = logits(pm, X)
    layer = next(m for m in pm.modules() if isinstance(m, LoraLayer))
    assert_mixed_equals_solo(pm, ["a", "b", "c"])
    A_of_a = layer.lora_A["a"]

    new_config, new_tensors = files(seed=5, alpha=32)  # same shapes, another scale
    assert pm.replace_adapter("a", "n", new_config, new_tensors)
    assert list(pm.peft_config) == ["n", "b", "c"] and pm._slots.names == ["n", "b", "c"]
    assert layer.lora_A["n"] is A_of_a and "a" not in layer.r and layer.scaling["n"] == 32 / 4  # its modules, reused
    pm.set_adapter("n")
    assert (logits(pm, X) - alone(new_config, new_tensors)).abs().max().item() < 1e-6
    pm.set_adapter("b")
    assert torch.equal(logits(pm, X), before_b)
    assert_mixed_equals_solo(pm, ["n", "b", "c"])

    other_config, other_tensors = files(seed=6, r=2)  # another layout: refused, nothing changed
    assert not pm.replace_adapter("c", "o", other_config, other_tensors)
    assert not pm.replace_adapter("c", "a.b", new_config, new_tensors)  # a name add_adapter refuses (and explains)
    assert list(pm.peft_config) == ["n", "b", "c"]
    broken = {k: v.clone() for k, v in new_tensors.items()}
    next(v for k, v in broken.items() if "lora_B" in k)[0, 0] = float("nan")
    pm.set_adapter("c")
    before_c = logits(pm, X)
    with pytest.raises(ValueError, match="NaN"):
        pm.replace_adapter("c", "o", new_config, broken)
    assert list(pm.peft_config) == ["n", "b", "c"] and layer.scaling["c"] == 8 / 4
    assert torch.equal(logits(pm, X), before_c)
    assert_mixed_equals_solo(pm, ["c", "n", "b"])

    # the active adapter replaced: the new one is active in every layer, its parameters train as its config says
    trained = pk.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], inference_mode=False)
    for cfg, grad in ((trained, True), (new_config, False), (new_config, False)):
        old = pm.active_adapter
        assert pm.replace_adapter(old, f"{old}2", cfg, new_tensors)
        assert pm.active_adapters == [f"{old}2"] and layer.active_adapters == [f"{old}2"]
        assert all(p.requires_grad is grad for p in layer.adapter_parameters(f"{old}2"))
