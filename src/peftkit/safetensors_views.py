"""Reading a safetensors file as views into one buffer: the file is read once, and each tensor is a view of its bytes.

Why not ``safetensors.torch.load``: it copies every tensor into a Python ``bytes`` object and then into a tensor of
its own, holding the GIL throughout. A server reads adapter files on a worker thread while its scheduler thread
decodes, and the scheduler gives the GIL up and takes it back around every torch op. Here the read itself
(``readinto``) runs without the GIL, and the Python work is one JSON header and one view per tensor. Measured by
``bench/adapter_reads.py`` (SmolLM2-135M's 1.9-9.8 MB LoRA files, 2-core AMD EPYC): a read takes 15-20% less time
and holds the GIL for at most about 1.5 ms at a stretch instead of 3.7; the decoding a read costs a 16-row mixed
batch beside it did not change measurably (10.4 / 8.4 / 11.2 ms per read against 7.5 / 8.8 / 10.7 in three runs):
that is mostly the read's CPU work, the checksum first, on two busy cores.

The format (https://huggingface.co/docs/safetensors): 8 bytes (little-endian u64) of header size N, N bytes of JSON
mapping each name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets into the data after the header)
plus an optional ``"__metadata__"`` of strings, then the data. Checked as strictly as the library checks it: every
dtype known, every size matching its shape, and the tensors tiling the data exactly (no gap, no overlap, nothing
left over), else a ValueError that names the file and the problem.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8, "BOOL": torch.bool,
}
METADATA = "__metadata__"


def read_file(path: str | os.PathLike) -> bytearray:
    """A file's bytes in a writable buffer (tensors viewing it can then be written to), read without the GIL."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        buffer = bytearray(size)
        got = f.readinto(buffer)
    if got != size:
        raise OSError(f"{path} changed size while being read ({got} of {size} bytes)")
    return buffer


def split(raw: bytes | bytearray | memoryview, source: str | os.PathLike) -> tuple[dict[str, Any], int]:
    """(header, where the data starts) of safetensors bytes; a ValueError naming ``source`` if they are not one."""
    view = memoryview(raw)
    size = int.from_bytes(view[:8], "little") if len(view) >= 8 else -1
    if size < 2 or 8 + size > len(view):
        raise ValueError(f"{source} is not a readable safetensors file (truncated or corrupted?)")
    try:
        header = json.loads(bytes(view[8 : 8 + size]))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError(f"{source} is not a readable safetensors file (its header is damaged)") from None
    if not isinstance(header, dict):
        raise ValueError(f"{source} is not a readable safetensors file (its header is not a JSON object)")
    return header, 8 + size


def tensor_views(raw: bytearray, header: dict[str, Any], start: int, source: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor ``header`` describes, as a view of ``raw`` (data from ``start``), in key order."""
    whole = torch.frombuffer(raw, dtype=torch.uint8)  # (never empty: split found a header in it)
    length = len(raw) - start
    spans, out = [], {}
    for key in sorted(k for k in header if k != METADATA):
        dtype, shape, begin, end = _entry(header[key], key, source)
        count = math.prod(shape)
        if not 0 <= begin <= end <= length or end - begin != count * dtype.itemsize:
            raise ValueError(f"{source} is not a readable safetensors file: tensor {key!r} has data offsets "
                             f"[{begin}, {end}] that do not hold its shape {shape} of {dtype} within {length} bytes")
        spans.append((begin, end, key))
        flat = whole[start + begin : start + end]
        if (start + begin) % dtype.itemsize:  # (views need aligned offsets; files the library writes are aligned)
            flat = flat.clone()
        out[key] = flat.view(dtype).view(shape)
    at = 0
    for begin, end, key in sorted(spans):
        if begin != at:
            raise ValueError(f"{source} is not a readable safetensors file: tensor {key!r} starts at byte {begin} of "
                             f"the data, not at {at} where the tensor before it ends (a gap or an overlap)")
        at = end
    if at != length:
        raise ValueError(f"{source} is not a readable safetensors file: its tensors take {at} bytes of data but the "
                         f"file has {length} (truncated, or bytes appended)")
    return out


def _entry(entry: Any, key: str, source: str | os.PathLike) -> tuple[torch.dtype, list[int], int, int]:
    """(dtype, shape, begin, end) of one header entry, each checked for its type."""
    if not isinstance(entry, dict):
        raise ValueError(f"{source} is not a readable safetensors file: the header entry of {key!r} is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in DTYPES:
        raise ValueError(f"{source}: tensor {key!r} has dtype {dtype!r}, which is not a safetensors dtype "
                         f"({', '.join(DTYPES)})")
    if not isinstance(shape, list) or not all(type(n) is int and n >= 0 for n in shape):
        raise ValueError(f"{source} is not a readable safetensors file: tensor {key!r} has shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(n) is int for n in offsets)):
        raise ValueError(f"{source} is not a readable safetensors file: tensor {key!r} has data offsets {offsets!r}")
    return DTYPES[dtype], shape, offsets[0], offsets[1]


def load(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any], memoryview]:
    """(tensors in key order, the header's metadata, the data bytes) of a safetensors file (see the module doc)."""
    raw = read_file(path)
    header, start = split(raw, Path(path))
    metadata = header.get(METADATA) or {}
    if not isinstance(metadata, dict):
        raise ValueError(f"{path} is not a readable safetensors file (its {METADATA} is not an object)")
    return tensor_views(raw, header, start, path), metadata, memoryview(raw)[start:]
