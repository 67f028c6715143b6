"""Out-of-core safetensors I/O: read one tensor at a time, write one tensor at a time.

``safe_open`` memory-maps the file, and every page a merge touches stays in the process's resident
memory until the handle closes, so streaming N+1 models that way still peaks at N+1 models. Here a
tensor is read with one positioned read into its own buffer (freed when the tensor is), and the
output is written as it is produced, its header computed up front from the base's names, dtypes and
shapes. The format is the safetensors one: 8-byte little-endian header size, JSON header, data.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Iterable

import torch

from .errors import DemeError

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
MAX_HEADER_BYTES = 100 * 1024 * 1024


class SafetensorsReader:
    """Names, dtypes and shapes of a safetensors file, and its tensors one positioned read each."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._file = open(self.path, "rb")
        try:
            self.entries, self.metadata, self._data_start = self._read_header()
        except Exception:
            self._file.close()
            raise

    def _corrupt(self, why: str) -> DemeError:
        return DemeError(f"{self.path} is not a valid safetensors file ({why}): re-save or re-copy it")

    def _read_header(self):
        size = os.fstat(self._file.fileno()).st_size
        prefix = self._file.read(8)
        if len(prefix) < 8:
            raise self._corrupt("shorter than its 8-byte header size")
        (header_size,) = struct.unpack("<Q", prefix)
        if header_size > min(MAX_HEADER_BYTES, size - 8):
            raise self._corrupt("header size beyond the end of the file")
        try:
            header = json.loads(self._file.read(header_size))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise self._corrupt("header is not JSON") from None
        metadata = header.pop("__metadata__", None) or {}
        data_start = 8 + header_size
        entries = {}
        for name, info in header.items():
            try:
                dtype = DTYPES[info["dtype"]]
                shape = tuple(int(d) for d in info["shape"])
                begin, end = (int(o) for o in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise self._corrupt(f"bad header entry for tensor {name!r}") from None
            expected = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            if end - begin != expected or data_start + end > size:
                raise self._corrupt(f"tensor {name!r} lies outside the file (truncated?)")
            entries[name] = (dtype, shape, begin)
        return entries, metadata, data_start

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: shape for name, (_, shape, _) in self.entries.items()}

    def read(self, name: str) -> torch.Tensor:
        dtype, shape, begin = self.entries[name]
        tensor = torch.empty(shape, dtype=dtype)
        view = memoryview(tensor.view(-1).view(torch.uint8).numpy()) if tensor.numel() else memoryview(b"")
        got = os.preadv(self._file.fileno(), [view], self._data_start + begin) if len(view) else 0
        if got != len(view):
            raise self._corrupt(f"tensor {name!r} is cut short")
        return tensor

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "SafetensorsReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class SafetensorsWriter:
    """Writes tensors in the order of ``layout`` as they come; the header is written first."""

    def __init__(self, path: str | os.PathLike, layout: Iterable[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None):
        self.path = Path(path)
        header: dict = {"__metadata__": dict(metadata)} if metadata else {}
        self._order, offset = [], 0
        for name, dtype, shape in layout:
            nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self._order.append((name, dtype, tuple(shape)))
            offset += nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)
        self._file = open(self.path, "wb")
        self._file.write(struct.pack("<Q", len(encoded)) + encoded)
        self._next = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected = self._order[self._next]
        if (name, tensor.dtype, tuple(tensor.shape)) != expected:
            raise ValueError(f"expected {expected}, got {(name, tensor.dtype, tuple(tensor.shape))}")
        data = tensor.detach().contiguous().cpu().view(-1).view(torch.uint8).numpy()
        self._file.write(memoryview(data))
        self._next += 1

    def close(self) -> None:
        self._file.close()
        if self._next != len(self._order):
            raise ValueError(f"{self.path}: wrote {self._next} of {len(self._order)} tensors")

    def __enter__(self) -> "SafetensorsWriter":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
        else:
            self._file.close()
