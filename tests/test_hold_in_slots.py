"""A server's LoRA adapters live only in the mixed-batch stacks (PeftModel.hold_in_slots): each frozen adapter's
factors become views of its slot, so its weights exist once, and every output stays what it was."""

from __future__ import annotations

import torch
from conftest import tiny_gpt2, tiny_llama
from test_lora import X, assert_mixed_equals_solo, logits, randomize_b

import peftkit as pk
from peftkit.tuners.lora import LoraEmbedding, LoraLayer

SHAPES = {  # three layouts: the stacks pad each layer to its largest rank
    "qv": dict(r=4, target_modules=["q_proj", "v_proj"]),
    "all": dict(r=8, lora_alpha=4, target_modules="all-linear"),
    "emb": dict(r=2, target_modules=["embed_tokens", "k_proj"]),
}


def _model(names: list[str], hold: bool, factory=tiny_llama) -> pk.PeftModel:
    pm = None
    for k, name in enumerate(names):
        config = pk.LoraConfig(**SHAPES[name], inference_mode=True)
        if pm is None:
            pm = pk.get_peft_model(factory(), config, name)
        else:
            pm.add_adapter(name, config)
        randomize_b(pm, name, seed=k + 1)
    assert pm is not None
    pm.eval()
    pm.hold_in_slots = hold
    return pm


def _held(pm: pk.PeftModel) -> list[tuple[str, bool]]:
    """(adapter, whether both its factors share storage with the layer's stacks), for every LoRA layer."""
    out = []
    for _, layer in pm.adapter_layers():
        if isinstance(layer, (LoraLayer, LoraEmbedding)) and layer._stacks.value:
            storage = {t.untyped_storage().data_ptr() for t in layer._stacks.value}
            for name in layer.adapter_names:
                out.append((name, all(t.untyped_storage().data_ptr() in storage for t in layer.factor_tensors(name))))
    return out


def _mixed(pm: pk.PeftModel, names: list[str]) -> torch.Tensor:
    with torch.inference_mode():
        return pm(input_ids=X, adapter_names=names).logits


def test_held_adapters_give_the_same_outputs_and_share_the_stacks_storage():
    rows = ["qv", "all", "emb"]
    plain, held = _model(rows, hold=False), _model(rows, hold=True)
    assert torch.allclose(_mixed(plain, rows), _mixed(held, rows), atol=1e-6)
    assert all(shared for _, shared in _held(held)) and not any(shared for _, shared in _held(plain))
    assert_mixed_equals_solo(held, rows)  # each adapter alone (through its viewed factors) still equals its row
    twice = _mixed(held, list(reversed(rows)))  # steady: the slots are not rewritten, nothing drifts
    assert torch.allclose(twice, _mixed(plain, list(reversed(rows))), atol=1e-6)


def test_a_load_into_held_layers_writes_the_slot_and_a_rebuild_moves_them():
    held = _model(["qv", "all"], hold=True)
    _mixed(held, ["qv", "all", "qv"])
    donor = _model(["qv"], hold=False)
    randomize_b(donor, "qv", seed=9)
    tensors = {k: v.clone() for k, v in donor.adapter_tensors("qv").items()}
    assert held.replace_adapter("qv", "new", donor.peft_config["qv"], tensors)  # its layers, reused: a slot write
    got = _mixed(held, ["new", "all", "new"])
    donor.set_adapter("qv")
    assert (got[0] - logits(donor, X[:1])[0]).abs().max().item() < 1e-5
    # enough adapters that every layer builds its stacks again: the held factors move to the new stacks
    for k in range(12):
        held.add_adapter(f"more{k}", pk.LoraConfig(**SHAPES["all"], inference_mode=True))
        randomize_b(held, f"more{k}", seed=20 + k)
    rows = ["new", "all", "more11"]
    plain = _mixed(held, rows)
    assert all(shared for _, shared in _held(held))
    assert_mixed_equals_solo(held, rows)
    assert torch.allclose(_mixed(held, rows), plain, atol=0)


def test_a_refill_in_place_changes_values_only(monkeypatch):
    """replace_adapter(x, x, ...) (how a server reuses a slot under its own fixed key): the new values are served,
    and nothing is renamed, re-assembled or rebuilt: the slot order, every layer's stacks and their keys stay as
    they were. A new alpha is served too (its scale is part of the slot's key, so those layers look it up again)."""
    held = _model(["qv", "all"], hold=True)
    _mixed(held, ["qv", "all", "qv"])
    layers = [layer for _, layer in held.adapter_layers() if isinstance(layer, LoraLayer)]
    stacks = [layer._stacks.value for layer in layers]
    assembled = []
    assemble = type(layers[0]._stacks)._assemble
    monkeypatch.setattr(type(layers[0]._stacks), "_assemble", lambda self, *a: assembled.append(a) or assemble(self, *a))
    for seed, alpha in ((9, 8), (10, 32)):
        donor = pk.get_peft_model(tiny_llama(), pk.LoraConfig(**SHAPES["qv"], lora_alpha=alpha, inference_mode=True), "x")
        randomize_b(donor, "x", seed=seed)
        tensors = {k: v.clone() for k, v in donor.adapter_tensors("x").items()}
        assert held.replace_adapter("qv", "qv", donor.peft_config["x"], tensors)
        got = _mixed(held, ["qv", "all", "qv"])
        assert held._slots.names == ["qv", "all"] and held.peft_config["qv"].lora_alpha == alpha
        assert all(layer._stacks.value is s for layer, s in zip(layers, stacks))  # no stack was built again
        assert not assembled if alpha == 8 else 0 < len(assembled) <= sum("qv" in layer.r for layer in layers)
        assert all(layer.scaling["qv"] == alpha / 4 for layer in layers if "qv" in layer.r)
        donor.eval()
        assert (got[::2] - logits(donor, X[::2])).abs().max().item() < 1e-5
    assert_mixed_equals_solo(held, ["qv", "all", "qv"])


def test_a_load_leaves_the_layers_it_does_not_touch_as_they_were(monkeypatch):
    """An eviction and a load of another layout in the same slot (a server's detach + attach): the layers that hold
    neither adapter see a new slot order but do not even work out their slots' state again (let alone update or
    rebuild anything); the others do, and every row still equals its adapter alone."""
    held = _model(["qv", "all"], hold=True)
    held.add_adapter("up", pk.LoraConfig(r=4, target_modules=["up_proj"], inference_mode=True))
    randomize_b(held, "up", seed=5)
    _mixed(held, ["qv", "all", "up"])
    cache, updated, checked = type(next(layer for _, layer in held.adapter_layers())._stacks), [], []
    update, built = cache._update, cache._built
    monkeypatch.setattr(cache, "_update", lambda self, layer, *a: updated.append(layer) or update(self, layer, *a))
    monkeypatch.setattr(cache, "_built", lambda self, *a: checked.append(id(self)) or built(self, *a))
    touched = {id(layer) for _, layer in held.adapter_layers() if "qv" in getattr(layer, "r", {})}
    held.delete_adapter("qv")
    held.add_adapter("emb", pk.LoraConfig(**SHAPES["emb"], inference_mode=True))  # into qv's slot, another layout
    randomize_b(held, "emb", seed=6)
    assert held._slots.names == ["emb", "all", "up"]
    _mixed(held, ["emb", "all", "up"])
    touched |= {id(layer) for _, layer in held.adapter_layers() if "emb" in getattr(layer, "r", {})}
    lora = [layer for _, layer in held.adapter_layers() if isinstance(layer, (LoraLayer, LoraEmbedding))]
    assert updated and {id(layer) for layer in updated} <= touched < {id(layer) for layer in lora}
    assert set(checked) == {id(layer._stacks) for layer in lora if id(layer) in touched}
    monkeypatch.undo()
    assert_mixed_equals_solo(held, ["emb", "all", "up"])


def test_held_layers_check_nothing_until_the_model_changes_an_adapter(monkeypatch):
    """With every adapter of a layer held in its slot, a forward reads no slot's state (those reads cost a server's
    decode step 6%): an in-place write to a held factor is a write to its slot, served at once. Adding, refilling or
    deleting an adapter moves the model's epoch: the next forward checks every layer once, then none again. A model
    that does not hold its adapters checks on every forward, as before."""
    rows = ["qv", "all", "qv"]
    held, plain = _model(["qv", "all"], hold=True), _model(["qv", "all"], hold=False)
    before = _mixed(held, rows)
    _mixed(plain, rows)
    cache, reads = type(next(layer for _, layer in held.adapter_layers())._stacks), []
    state = cache._state
    monkeypatch.setattr(cache, "_state", lambda self: reads.append(self) or state(self))
    _mixed(plain, rows)
    assert reads
    reads.clear()
    assert torch.equal(_mixed(held, rows), before) and not reads
    layer = next(layer for _, layer in held.adapter_layers() if isinstance(layer, LoraLayer) and "qv" in layer.r)
    with torch.no_grad():
        layer.lora_B["qv"].weight.mul_(3)  # (a view of the slot: the stacks change with it)
    got = _mixed(held, rows)
    assert not reads and (got[0] - before[0]).abs().max().item() > 1e-3
    held.set_adapter("qv")
    assert (got[0] - logits(held, X[:1])[0]).abs().max().item() < 1e-5
    held.add_adapter("up", pk.LoraConfig(r=4, target_modules=["up_proj"], inference_mode=True))
    randomize_b(held, "up", seed=5)
    rows = ["up", "all", "qv"]
    _mixed(held, rows)
    lora = {id(layer._stacks) for _, layer in held.adapter_layers() if isinstance(layer, (LoraLayer, LoraEmbedding))}
    assert {id(c) for c in reads} == lora  # every layer once, not only those of the slots this forward read
    reads.clear()
    _mixed(held, rows)
    assert not reads
    monkeypatch.undo()
    assert_mixed_equals_solo(held, rows)


def test_trainable_adapters_and_other_bases_keep_their_own_parameters():
    pm = pk.get_peft_model(tiny_llama(), pk.LoraConfig(r=4, target_modules=["q_proj"]), "trained")
    pm.add_adapter("frozen", pk.LoraConfig(r=4, target_modules=["q_proj"], inference_mode=True))
    randomize_b(pm, "trained", 1)
    randomize_b(pm, "frozen", 2)
    pm.eval()
    pm.hold_in_slots = True
    _mixed(pm, ["trained", "frozen", "trained"])
    assert dict(_held(pm)) == {"trained": False, "frozen": True}
    # GPT-2's fused qkv Conv1D (fan-in-fan-out): held the same way, same outputs
    rows = ["a", "b", "a"]
    gpt = []
    for hold in (False, True):  # (each built whole: tiny_gpt2 seeds the draws of its adapters' A)
        model = pk.get_peft_model(tiny_gpt2(), pk.LoraConfig(r=4, target_modules=["c_attn"], inference_mode=True), "a")
        model.add_adapter("b", pk.LoraConfig(r=2, target_modules=["c_attn", "c_proj"], inference_mode=True))
        randomize_b(model, "a", 1)
        randomize_b(model, "b", 2)
        model.eval()
        model.hold_in_slots = hold
        gpt.append(model)
    assert torch.allclose(_mixed(gpt[0], rows), _mixed(gpt[1], rows), atol=1e-6)
    assert all(shared for _, shared in _held(gpt[1]))


def test_a_reserved_capacity_builds_the_stacks_once_for_the_whole_budget():
    """A server's --max-adapters (PeftModel.slot_capacity): the stacks get the base's slot and one per adapter of the
    budget at their first build, and adapters arriving up to the budget fill slots in place."""
    pm = _model(["qv"], hold=True)
    pm.slot_capacity = 6
    layer = next(layer for _, layer in pm.adapter_layers() if isinstance(layer, LoraLayer))
    _mixed(pm, ["qv", "qv", "qv"])
    first = layer._stacks.value
    assert first[0].shape[0] == 7  # base + 6
    for k in range(5):
        pm.add_adapter(f"n{k}", pk.LoraConfig(**SHAPES["qv"], inference_mode=True))
        randomize_b(pm, f"n{k}", seed=30 + k)
        rows = ["qv", f"n{k}", "qv"]
        _mixed(pm, rows)
        assert all(a is b for a, b in zip(layer._stacks.value, first))  # never built again
    assert_mixed_equals_solo(pm, ["n4", "n0", "qv"])


def test_a_held_adapter_saves_the_same_file(tmp_path):
    """Held factors are views of their slots (B's not even contiguous): saving copies them out as they are."""
    from safetensors.torch import load_file

    plain, held = _model(["qv", "all"], hold=False), _model(["qv", "all"], hold=True)
    _mixed(held, ["qv", "all", "qv"])
    assert all(shared for _, shared in _held(held))
    for model, folder in ((plain, tmp_path / "plain"), (held, tmp_path / "held")):
        model.save_pretrained(folder, selected_adapters=["all"])
    mine, theirs = load_file(tmp_path / "held" / "all" / "adapter_model.safetensors"), load_file(tmp_path / "plain" / "all" / "adapter_model.safetensors")
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
