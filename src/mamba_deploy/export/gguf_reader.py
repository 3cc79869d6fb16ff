"""A lean GGUF reader: the header, metadata and tensor infos of a GGUF file, and each tensor's bytes
as a read-only numpy view of the memory-mapped file.

Why not gguf-py's GGUFReader: it keeps a numpy view per part of every field (four per vocabulary
entry), about 2.5 KB per token, before any check can run: opening a 50k-token GGUF took 3.0 s and
132 MB against 0.045 s and 5 MB here, a 262k-token one 9.5 s and 648 MB against 0.13 s and 31 MB
(`benchmarks/gguf_open.py`), and a command opens the file up to four times. Here a string array is one Python list of str, numeric arrays one
numpy view each, and every count is checked against the bytes left before anything is allocated
for it, so an edited count is a CheckpointError instead of a multi-gigabyte read.

Tensor data keeps gguf-py's layout (what `gguf.quants.dequantize` takes): plain types as their
numpy dtype in numpy order (outermost first), block-quantized types as uint8 rows of
(..., bytes per row). The format's value types are the table VALUE_TYPES.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType
from gguf.constants import GGML_QUANT_SIZES

from ..errors import CheckpointError, ModelNotFoundError
from .gguf_tables import ALIGNMENT_KEY, DEFAULT_ALIGNMENT

MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)  # version 1 (32-bit counts) predates every Mamba GGUF
MAX_DIMS = 4  # GGML_MAX_DIMS: llama.cpp refuses a tensor with more
MAX_NESTING = 8  # arrays of arrays: llama.cpp writes none; a file nesting thousands deep recursed until a RecursionError

# GGUFValueType code -> (struct letter, numpy dtype) of a fixed-size value; STRING and ARRAY are read apart
VALUE_TYPES = {0: ("B", np.uint8), 1: ("b", np.int8), 2: ("H", np.uint16), 3: ("h", np.int16),
               4: ("I", np.uint32), 5: ("i", np.int32), 6: ("f", np.float32), 7: ("?", np.bool_),
               10: ("Q", np.uint64), 11: ("q", np.int64), 12: ("d", np.float64)}
STRING, ARRAY = 8, 9
# GGMLQuantizationType names whose tensors are read as their own numpy dtype, not as bytes
PLAIN_TENSOR_TYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I8": np.int8, "I16": np.int16,
                      "I32": np.int32, "I64": np.int64}


@dataclass
class Field:
    """One metadata key: `type` and, for arrays, `item_type` (gguf.GGUFValueType); `count` items."""
    name: str
    type: object
    item_type: object
    count: int
    _value: object
    _bad_utf8: int | None = None  # the index of a string that is not UTF-8, reported when read

    def contents(self):
        """The value as Python objects: str, int, float, bool, or a list of them."""
        if self._bad_utf8 is not None:
            raise CheckpointError(f"GGUF metadata {self.name!r} holds bytes that are not UTF-8 (item "
                                  f"{self._bad_utf8}); the file is corrupt: re-export or re-download it")
        v = self._value
        return v.tolist() if isinstance(v, np.ndarray) else v


@dataclass
class Tensor:
    """One tensor info: `shape` in GGUF order (innermost first, as ne[] in ggml), `data_offset`
    from the start of the file, `data` a read-only view of its bytes (module docstring)."""
    name: str
    tensor_type: object
    shape: tuple
    n_elements: int
    n_bytes: int
    data_offset: int
    data: np.ndarray


class GGUFFile:
    """A GGUF file opened for reading: `fields` (key -> Field, in file order), `tensors` (in file
    order), `alignment`, `data_offset` (where tensor data starts). CheckpointError when the bytes
    do not parse; ModelNotFoundError when there is no such file."""

    def __init__(self, path):
        path = Path(path)
        if not path.is_file():
            raise ModelNotFoundError(f"no such GGUF file: {str(path)!r}")
        self.path = path
        try:
            self._map = np.memmap(path, dtype=np.uint8, mode="r")
        except (OSError, ValueError) as e:  # ValueError: an empty file cannot be mapped
            raise self._corrupt(f"cannot map it ({e})") from e
        self._buf, self._pos = memoryview(self._map), 0
        try:
            self._parse()
        except CheckpointError:
            raise
        except (struct.error, ValueError, IndexError, OverflowError, RecursionError) as e:  # what the checks missed
            raise self._corrupt(f"{type(e).__name__}: {e}") from e

    def _parse(self) -> None:
        if bytes(self._buf[:4]) != MAGIC:
            raise self._corrupt(f"it starts with {bytes(self._buf[:4])!r}, not {MAGIC!r}: not a GGUF file")
        self._order, self._pos = "<", len(MAGIC)
        version = self._scalar(4)
        if version & 0xFFFF == 0 and version:  # written on a big-endian machine: every number swapped
            self._order, self._pos = ">", len(MAGIC)
            version = self._scalar(4)
        if version not in SUPPORTED_VERSIONS:
            raise self._corrupt(f"GGUF version {version} is not supported (versions {SUPPORTED_VERSIONS})",
                                "convert the model again with a current llama.cpp")
        self.version = version
        n_tensors, n_fields = self._scalar(10), self._scalar(10)
        self._check_count(n_fields, 12, "metadata keys")  # a key: its length, >= 1 byte, a type
        self._check_count(n_tensors, 24, "tensor infos")
        self.fields: dict[str, Field] = {}
        for _ in range(n_fields):
            self._read_field()
        infos = [self._read_tensor_info() for _ in range(n_tensors)]
        seen = set()
        for name, *_ in infos:
            if name in seen:
                raise self._corrupt(f"tensor {name!r} appears twice")
            seen.add(name)
        self.alignment = self._alignment()
        self.data_offset = -(-self._pos // self.alignment) * self.alignment
        self.tensors = [self._tensor(*info) for info in infos]

    def get_field(self, key: str) -> Field | None:
        return self.fields.get(key)

    def _corrupt(self, problem: str, fix: str = "") -> CheckpointError:
        fix = fix or ("it is truncated, corrupt or not a GGUF file: re-export it (mamba-deploy export gguf) or "
                      "re-download it")
        return CheckpointError(f"cannot read GGUF file {self.path}: {problem}; {fix}")

    def _take(self, n: int) -> memoryview:
        if n > len(self._buf) - self._pos:
            raise self._corrupt(f"it ends at byte {len(self._buf)}, inside data that needs {n} bytes from byte "
                                f"{self._pos}")
        out = self._buf[self._pos:self._pos + n]
        self._pos += n
        return out

    def _scalar(self, code: int):
        letter = VALUE_TYPES[code][0]
        return struct.unpack(self._order + letter, self._take(struct.calcsize(letter)))[0]

    def _check_count(self, count: int, min_bytes: int, what: str) -> None:
        """A count the rest of the file could hold: an edited count must not allocate what it claims."""
        if count * min_bytes > len(self._buf) - self._pos:
            raise self._corrupt(f"it claims {count} {what}, more than its remaining {len(self._buf) - self._pos} "
                                "bytes can hold")

    def _string(self) -> str:
        raw = self._take(self._scalar(10))
        try:
            return str(raw, "utf-8")
        except UnicodeDecodeError as e:
            raise self._corrupt(f"a name at byte {self._pos - len(raw)} is not UTF-8 ({e.reason})") from e

    def _strings(self, count: int, name: str) -> tuple[list[str], int | None]:
        """`count` GGUF strings of the key `name` -> (their text, the index of the first that is not
        UTF-8, or None)."""
        buf, pos, end, size = self._buf, self._pos, len(self._buf), struct.Struct(self._order + "Q")
        out, bad = [], None
        for i in range(count):
            if pos + 8 > end:
                break
            n = size.unpack_from(buf, pos)[0]
            if n > end - pos - 8:
                break
            raw = buf[pos + 8:pos + 8 + n]
            try:
                out.append(str(raw, "utf-8"))
            except UnicodeDecodeError:
                bad = i if bad is None else bad
                out.append(str(raw, "utf-8", "surrogateescape"))
            pos += 8 + n
        self._pos = pos
        if len(out) < count:
            at = f" at string {len(out)} of {count}" if count > 1 else ""
            raise self._corrupt(f"metadata {name!r} runs past the file's end at byte {end}{at}")
        return out, bad

    def _value(self, code: int, name: str, depth: int = 0):
        """-> (value, item type code or None, count, index of a non-UTF-8 string or None)."""
        if code in VALUE_TYPES:
            return self._scalar(code), None, 1, None
        if code == STRING:
            out, bad = self._strings(1, name)
            return out[0], None, 1, bad
        if code != ARRAY:
            raise self._corrupt(f"metadata {name!r} has value type {code}, which GGUF does not define")
        item, count = self._scalar(4), self._scalar(10)
        if item not in VALUE_TYPES and item not in (STRING, ARRAY):
            raise self._corrupt(f"metadata {name!r} is an array of value type {item}, which GGUF does not define")
        if item == ARRAY and depth >= MAX_NESTING:
            raise self._corrupt(f"metadata {name!r} nests arrays more than {MAX_NESTING} deep")
        if item in VALUE_TYPES:
            letter, dtype = VALUE_TYPES[item]
            self._check_count(count, struct.calcsize(letter), f"items in {name!r}")
            raw = self._take(count * struct.calcsize(letter))
            return np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder(self._order)), item, count, None
        self._check_count(count, 8 if item == STRING else 12, f"items in {name!r}")
        if item == STRING:
            values, bad = self._strings(count, name)
            return values, item, count, bad
        values, bad = [], None
        for i in range(count):  # nested arrays: rare (llama.cpp writes none), read for what they hold
            v, _, _, b = self._value(item, f"{name}[{i}]", depth + 1)
            values.append(v.tolist() if isinstance(v, np.ndarray) else v)
            bad = i if bad is None and b is not None else bad
        return values, item, count, bad

    def _read_field(self) -> None:
        name = self._string()
        code = self._scalar(4)
        value, item, count, bad = self._value(code, name)
        if name in self.fields:
            raise self._corrupt(f"metadata key {name!r} appears twice")
        self.fields[name] = Field(name, GGUFValueType(code), None if item is None else GGUFValueType(item), count,
                                  value, bad)

    def _read_tensor_info(self) -> tuple:
        name = self._string()
        n_dims = self._scalar(4)
        if n_dims > MAX_DIMS:  # 0: a scalar, which gguf-py writes for a 0-d array
            raise self._corrupt(f"tensor {name!r} has {n_dims} dimensions (GGUF allows at most {MAX_DIMS})")
        dims = tuple(self._scalar(10) for _ in range(n_dims))
        return name, dims, self._scalar(4), self._scalar(10)

    def _alignment(self) -> int:
        f = self.fields.get(ALIGNMENT_KEY)
        if f is None:
            return DEFAULT_ALIGNMENT
        value = f._value
        if f.type != GGUFValueType.UINT32 or not value or value & (value - 1):
            raise self._corrupt(f"{ALIGNMENT_KEY} is {value!r} ({f.type.name}); GGUF needs a uint32 power of two")
        return int(value)

    def _tensor(self, name: str, dims: tuple, code: int, offset: int) -> Tensor:
        try:
            kind = GGMLQuantizationType(code)
            block, type_size = GGML_QUANT_SIZES[kind]
        except (ValueError, KeyError) as e:
            raise self._corrupt(f"tensor {name!r} has type code {code}, which this gguf package does not know",
                                "a newer llama.cpp type needs a newer package (pip install -U gguf); otherwise "
                                "the file is corrupt") from e
        row = dims[0] if dims else 1
        if row % block:
            raise self._corrupt(f"tensor {name!r} is {kind.name} with rows of {row} values, not a multiple "
                                f"of its block of {block}")
        n_elements = int(np.prod(dims, dtype=object))
        n_bytes = n_elements // block * type_size
        start = self.data_offset + offset
        if start + n_bytes > len(self._buf):
            raise self._corrupt(f"tensor {name!r} ({kind.name}, shape {list(dims)}) needs bytes {start}.."
                                f"{start + n_bytes}, past the file's end at {len(self._buf)}")
        numpy_dims = tuple(reversed(dims))
        plain = PLAIN_TENSOR_TYPES.get(kind.name)
        if plain is not None:
            dtype = np.dtype(plain).newbyteorder(self._order)
        else:  # block-quantized (and BF16): bytes per row, as gguf.quants.dequantize takes them
            dtype, numpy_dims = np.dtype(np.uint8), (*numpy_dims[:-1], row // block * type_size)
        data = self._map[start:start + n_bytes].view(dtype).reshape(numpy_dims)
        return Tensor(name, kind, dims, n_elements, n_bytes, start, data)

