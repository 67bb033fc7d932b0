"""Rank analysis of LoRA adapters: phi(i, j) of the LoRA paper (section 7.2) and the spectrum of B @ A, against
hand computation, the random-subspace baseline, and through the command line."""

import json

import pytest
import torch
from conftest import tiny_llama

import peftkit as pk
from peftkit import analyze, cli


def test_phi_by_hand():
    # A1's rows span e1 (larger singular value) then e2; A2's span e1 then e3 (d = 4).
    a1 = torch.tensor([[2.0, 0, 0, 0], [0, 1.0, 0, 0]], dtype=torch.float64)
    a2 = torch.tensor([[0, 0, 1.0, 0], [3.0, 0, 0, 0]], dtype=torch.float64)
    phi = analyze.subspace_similarity(a1, a2, "A")
    # phi(1,1) = (e1.e1)^2 / 1; phi(1,2) = 1 / 1; phi(2,1) = 1 / 1; phi(2,2) = (1 + 0 + 0 + 0) / 2
    assert torch.allclose(phi, torch.tensor([[1.0, 1.0], [1.0, 0.5]], dtype=torch.float64))
    # B: left-singular vectors (columns), the same numbers for the transposed matrices
    assert torch.allclose(analyze.subspace_similarity(a1.T, a2.T, "B"), phi)


def test_phi_of_an_adapter_with_itself_is_one_on_the_diagonal_and_random_subspaces_give_j_over_d():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(8, 256, generator=gen, dtype=torch.float64)
    assert torch.allclose(torch.diagonal(analyze.subspace_similarity(a, a)), torch.ones(8, dtype=torch.float64))
    draws = [analyze.subspace_similarity(torch.randn(8, 256, generator=gen, dtype=torch.float64),
                                         torch.randn(64, 256, generator=gen, dtype=torch.float64))[0, -1] for _ in range(40)]
    assert abs(torch.stack(draws).mean().item() - 64 / 256) < 0.03  # E ||u^T U_64||^2 = 64 / d


def test_spectrum_without_forming_the_product():
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randn(6, 40, generator=gen, dtype=torch.float64), torch.randn(30, 6, generator=gen, dtype=torch.float64)
    full = torch.linalg.svdvals(b @ a)  # 30 values, all but 6 zero
    assert torch.allclose(analyze.update_singular_values(a, b), full[:6]) and full[6:].abs().max() < 1e-10
    # energies 100, 1, 1: the top direction holds 100/102 = 98.0%, two hold 99.0%
    s = torch.tensor([10.0, 1.0, 1.0], dtype=torch.float64)
    assert (analyze.rank_keeping(s, 0.90), analyze.rank_keeping(s, 0.99)) == (1, 2)
    assert analyze.rank_keeping(torch.zeros(3, dtype=torch.float64), 0.9) == 0


def _saved_lora(folder, r, seed):
    """A LoRA adapter whose B @ A has a known rank: only the first `rank` directions are non-zero."""
    torch.manual_seed(seed)
    model = pk.get_peft_model(tiny_llama(), pk.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.zero_()
                p[:, :2].normal_()  # rank-2 updates
    model.save_pretrained(folder)
    return folder


def test_command_line_spectrum_and_comparison(tmp_path, capsys):
    small = _saved_lora(tmp_path / "r4", 4, seed=0)
    big = _saved_lora(tmp_path / "r16", 16, seed=1)
    assert cli.main(["analyze", str(small), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["modules"]) == 4 and all(m["rank"] == 4 and m["rank_99"] <= 2 for m in out["modules"])
    assert all(len([s for s in m["singular_values"] if s > 1e-9]) == 2 for m in out["modules"])

    assert cli.main(["analyze", str(small), str(big), "--plot", str(tmp_path / "fig.png")]) == 0
    text = capsys.readouterr().out
    assert "subspace similarity of the A matrices" in text and (tmp_path / "fig.png").stat().st_size > 5000
    phis = analyze.compare(small, big)
    assert set(phis) == {f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qv"}
    assert all(p.shape == (4, 16) for p in phis.values())
    assert cli.main(["analyze", str(small), str(big), "--which", "B", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["modules"]
    phis_b = analyze.compare(small, big, "B")
    assert [r["phi_1_jmax"] for r in rows] == pytest.approx([p[0, -1].item() for p in phis_b.values()])


def test_refuses_what_it_cannot_analyse(tmp_path, capsys):
    ia3 = pk.get_peft_model(tiny_llama(), pk.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]))
    ia3.save_pretrained(tmp_path / "ia3")
    assert cli.main(["analyze", str(tmp_path / "ia3")]) == 1
    assert "is a IA3 adapter: rank analysis needs a LoRA adapter" in capsys.readouterr().err
    lora = _saved_lora(tmp_path / "lora", 4, seed=0)
    assert cli.main(["analyze", str(lora), str(lora), str(lora)]) == 1
    assert "one or two adapters" in capsys.readouterr().err
    from safetensors.torch import load_file, save_file

    weights = lora / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = next(k for k in tensors if "lora_A" in k)
    tensors[key][0, 0] = float("nan")
    save_file(tensors, weights)
    assert cli.main(["analyze", str(lora)]) != 0
    assert key in capsys.readouterr().err
    with pytest.raises(ValueError, match="which must be"):
        analyze.subspace_basis(torch.eye(2), "C")
