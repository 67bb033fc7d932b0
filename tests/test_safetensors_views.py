"""safetensors files read as views into one buffer (peftkit.safetensors_views): the same tensors as the safetensors
library's own reader, and every malformed header refused with a line that names the file."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import load as library_load
from safetensors.torch import save as library_save

from peftkit import checkpoint, safetensors_views


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "w.f32": torch.randn(3, 5, generator=g), "w.f16": torch.randn(7, generator=g).half(),
        "w.bf16": torch.randn(2, 3, generator=g).bfloat16(), "w.f64": torch.randn(4, generator=g).double(),
        "w.f8": torch.randn(6, generator=g).to(torch.float8_e4m3fn), "i.i64": torch.arange(5),
        "i.i8": torch.tensor([-3, 4], dtype=torch.int8), "i.u8": torch.tensor([1, 250], dtype=torch.uint8),
        "b.bool": torch.tensor([True, False, True]), "empty": torch.zeros(0, 4), "scalar": torch.tensor(2.5),
    }


def _file(tmp_path, header: dict, data: bytes):
    text = json.dumps(header).encode()
    path = tmp_path / "damaged.safetensors"
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


def test_views_equal_the_library_reader_in_key_order_and_share_one_buffer(tmp_path):
    path = tmp_path / "t.safetensors"
    path.write_bytes(library_save(_tensors(), metadata={"format": "pt", "note": "x"}))
    tensors, metadata, data = safetensors_views.load(path)
    expected = library_load(path.read_bytes())
    assert list(tensors) == sorted(expected)
    for key, value in expected.items():
        assert tensors[key].dtype == value.dtype and tensors[key].shape == value.shape, key
        assert torch.equal(tensors[key].reshape(-1).view(torch.uint8), value.reshape(-1).view(torch.uint8)), key
    assert metadata == {"format": "pt", "note": "x"}
    assert len(data) == sum(t.numel() * t.element_size() for t in expected.values())
    # one buffer for all of them (no copy per tensor), and writing one leaves the others as they were
    pointers = {t.untyped_storage().data_ptr() for t in tensors.values() if t.numel()}
    assert len(pointers) == 1
    tensors["w.f32"].fill_(7.0)
    assert torch.equal(tensors["w.f16"], expected["w.f16"]) and torch.equal(tensors["i.i64"], torch.arange(5))


def test_misaligned_tensor_is_read_right(tmp_path):
    """A writer that does not align (the library does) puts a float32 at an odd offset: copied, then equal."""
    value = torch.tensor([1.5, -2.0, 3.25])
    header = {"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
              "b": {"dtype": "F32", "shape": [3], "data_offsets": [1, 13]}}
    path = _file(tmp_path, header, b"\x07" + value.numpy().tobytes())
    tensors, _, _ = safetensors_views.load(path)
    assert tensors["a"].tolist() == [7] and torch.equal(tensors["b"], value)


@pytest.mark.parametrize("header, data, message", [
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4, "do not hold its shape"),
    ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, "do not hold its shape"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
      "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]}}, b"\0" * 12, "a gap or an overlap"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8, "a gap or an overlap"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 9, "truncated, or bytes appended"),
    ({"a": {"dtype": "Q4", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, "not a safetensors dtype"),
    ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4, r"has shape \[-1\]"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": "0-4"}}, b"\0" * 4, "has data offsets '0-4'"),
    ({"a": [1, 2]}, b"", "is not an object"),
    ({"__metadata__": ["x"]}, b"", "__metadata__ is not an object"),
])
def test_malformed_headers_are_refused_naming_the_file(tmp_path, header, data, message):
    path = _file(tmp_path, header, data)
    with pytest.raises(ValueError, match=message) as err:
        safetensors_views.load(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ValueError, match=message):  # the same through the loader every adapter read goes through
        checkpoint.load_tensors(path)


def test_checksum_still_catches_changed_bytes(tmp_path):
    path = tmp_path / "adapter_model.safetensors"
    checkpoint.save_tensors(path, {"w": torch.ones(4)})
    assert torch.equal(checkpoint.load_tensors(path)["w"], torch.ones(4))
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0x01  # one bit of the data, header intact
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="does not match the SHA-256 recorded"):
        checkpoint.load_tensors(path)


def test_load_tensors_owns_its_tensors_unless_views_are_asked_for(tmp_path):
    """Views share the file's buffer; storage-level APIs need a tensor of its own (torch.set_rng_state crashed the
    process on a view when resuming a training run), so only adapter loads, which copy, take views."""
    path = tmp_path / "state.safetensors"
    checkpoint.save_tensors(path, {"a": torch.ones(3), "rng": torch.get_rng_state()})
    owned = checkpoint.load_tensors(path)
    assert all(t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.numel() * t.element_size()
               for t in owned.values())
    torch.set_rng_state(owned["rng"])
    views = checkpoint.load_tensors(path, views=True)
    assert views["a"].untyped_storage().data_ptr() == views["rng"].untyped_storage().data_ptr()
    assert torch.equal(views["rng"], owned["rng"])
