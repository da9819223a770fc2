"""A bounded store of per-step attention data: RAM up to a budget, the rest on disk.

FateZero (Sec. 3.2, Eq. 4) keeps what DDIM inversion saw at every step so the editing
pass can fuse it back. The reference implementation keeps every map of every step in
fp32 Python lists (~100 GB of CPU RAM for 8 frames at 50 steps). This store holds only
the entries its caller puts (the fusion schedule decides which), converts them to a
compact dtype (fp16 by default), keeps them in RAM until `budget_bytes` is reached and
appends everything beyond to one memory-mapped spill file (numpy memmap), so resident
memory stays bounded whatever the clip length or step count. Reading an entry back
gives the same values wherever it lives.

`save` writes the store to a folder (`index.json` + `entries.bin`) and `load` maps it
back without reading it into RAM: an inversion is computed once and reused by any
number of edits (`--save-inversion` / `--load-inversion`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from diffstream.errors import ConfigError, InputError, OutputError

StoreKey = tuple  # (kind: str, layer: str, step: int), e.g. ("self", "up_blocks.1...attn1", 3)

_DTYPES = {torch.float16: "float16", torch.float32: "float32"}
_NP = {"float16": np.float16, "float32": np.float32}
_TORCH = {"float16": torch.float16, "float32": torch.float32}
FORMAT_VERSION = 1
_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 2**10, "kib": 2**10, "m": 2**20, "mb": 2**20, "mib": 2**20,
          "g": 2**30, "gb": 2**30, "gib": 2**30, "t": 2**40, "tb": 2**40, "tib": 2**40}


def parse_size(text: str) -> int | None:
    """"4GB" -> 4 * 2**30 bytes (binary units: K, M, G, T, with or without B); "0" keeps
    nothing in RAM; "inf" / "none" / "unlimited" means no budget (returns None).

    Raises:
        ConfigError: on anything else.
    """
    value = str(text).strip().lower().replace(" ", "")
    if value in ("inf", "none", "unlimited"):
        return None
    match = re.fullmatch(r"(\d+(?:\.\d*)?|\.\d+)([a-z]*)", value)
    if not match or match.group(2) not in _UNITS:
        raise ConfigError(f"--store-budget must be a size like 4GB, 512MB or 0 (or 'inf'), got {text!r}")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def format_bytes(n: int) -> str:
    """Human-readable binary size, e.g. 6.25 GiB."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


@dataclass
class _OnDisk:
    """Where a spilled or loaded entry lives: `shape` values of `dtype` at byte `offset` of `path`."""

    path: str
    offset: int
    shape: tuple
    dtype: str

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(_NP[self.dtype]).itemsize


class AttentionStore:
    """Keyed tensors, each stored in a compact dtype, RAM-bounded, spilling to a memmap.

    Args:
        budget_bytes: RAM the entries may occupy; entries beyond it are appended to the
            spill file. None: no limit. 0: everything goes to disk.
        dtype: storage dtype of entries (torch.float16 or torch.float32); `put` may
            override it per entry (latents are kept in fp32).
        spill_dir: folder for the spill file (default: the system temp folder). The
            file is deleted by `close()`.
    """

    def __init__(self, budget_bytes: int | None = 4 * 2**30, dtype: torch.dtype = torch.float16, spill_dir=None):
        if dtype not in _DTYPES:
            raise ConfigError(f"the attention store keeps fp16 or fp32 entries, not {dtype}")
        if budget_bytes is not None and budget_bytes < 0:
            raise ConfigError(f"--store-budget must not be negative, got {budget_bytes}")
        self.budget_bytes = budget_bytes
        self.dtype = dtype
        self.spill_dir = spill_dir
        self.meta: dict = {}
        self._ram: dict[StoreKey, torch.Tensor] = {}
        self._disk: dict[StoreKey, _OnDisk] = {}
        self._ram_bytes = 0
        self._spill_path: str | None = None
        self._spill_tmpdir: str | None = None
        self._spill_file = None
        self._spill_size = 0
        self._read_only = False

    # --- writing ----------------------------------------------------------------------
    def put(self, key: StoreKey, tensor: torch.Tensor, dtype: torch.dtype | None = None) -> None:
        """Store a copy of `tensor` (any device) under `key`, in `dtype` (default: the store's)."""
        if self._read_only:
            raise RuntimeError("a loaded store is read-only")
        dtype = dtype or self.dtype
        if dtype not in _DTYPES:
            raise ValueError(f"unsupported store dtype {dtype}")
        self.discard(key)
        value = tensor.detach().to(device="cpu", dtype=dtype).contiguous()
        nbytes = value.numel() * value.element_size()
        if self.budget_bytes is None or self._ram_bytes + nbytes <= self.budget_bytes:
            if value.data_ptr() == tensor.data_ptr():
                value = value.clone()  # never alias the caller's tensor
            self._ram[key] = value
            self._ram_bytes += nbytes
        else:
            self._disk[key] = self._append(value)

    def _append(self, value: torch.Tensor) -> _OnDisk:
        """Append one tensor to the spill file (created on first use)."""
        if self._spill_file is None:
            try:
                self._spill_tmpdir = tempfile.mkdtemp(prefix="diffstream-store-", dir=self.spill_dir)
            except OSError as err:
                raise OutputError(f"cannot create a spill folder for the attention store in "
                                  f"{self.spill_dir or tempfile.gettempdir()}: {err.strerror}") from None
            self._spill_path = os.path.join(self._spill_tmpdir, "spill.bin")
            self._spill_file = open(self._spill_path, "wb")
        array = value.numpy()
        offset = self._spill_size
        try:
            self._spill_file.write(array.tobytes())
            self._spill_file.flush()
        except OSError as err:
            raise OutputError(f"cannot spill the attention store to {self._spill_path}: {err.strerror}") from None
        self._spill_size += array.nbytes
        return _OnDisk(self._spill_path, offset, tuple(array.shape), _DTYPES[value.dtype])

    def discard(self, key: StoreKey) -> None:
        """Forget an entry (its spilled bytes stay in the file until `close`)."""
        value = self._ram.pop(key, None)
        if value is not None:
            self._ram_bytes -= value.numel() * value.element_size()
        self._disk.pop(key, None)

    # --- reading ----------------------------------------------------------------------
    def get(self, key: StoreKey, device=None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The entry under `key` on `device` in `dtype` (default: as stored). KeyError if absent.

        The result may share memory with the store: do not modify it in place.
        """
        value = self._ram.get(key)
        if value is None:
            where = self._disk[key]
            mapped = np.memmap(where.path, dtype=_NP[where.dtype], mode="r", offset=where.offset, shape=where.shape)
            value = torch.from_numpy(np.array(mapped))
            del mapped
        return value.to(device=device, dtype=dtype or value.dtype)

    def __contains__(self, key) -> bool:
        return key in self._ram or key in self._disk

    def __len__(self) -> int:
        return len(self._ram) + len(self._disk)

    def keys(self) -> list:
        return list(self._ram) + list(self._disk)

    def shape(self, key: StoreKey) -> tuple:
        value = self._ram.get(key)
        return tuple(value.shape) if value is not None else self._disk[key].shape

    # --- accounting -------------------------------------------------------------------
    @property
    def ram_bytes(self) -> int:
        """Bytes of entries held in RAM."""
        return self._ram_bytes

    @property
    def disk_bytes(self) -> int:
        """Bytes of entries on disk (spilled or loaded)."""
        return sum(d.nbytes for d in self._disk.values())

    @property
    def nbytes(self) -> int:
        return self.ram_bytes + self.disk_bytes

    def nbytes_of(self, kinds) -> int:
        """Bytes of the entries whose key's kind (first element) is in `kinds`."""
        kinds = set(kinds)
        total = sum(v.numel() * v.element_size() for k, v in self._ram.items() if k[0] in kinds)
        return total + sum(d.nbytes for k, d in self._disk.items() if k[0] in kinds)

    # --- persistence ------------------------------------------------------------------
    def save(self, directory) -> None:
        """Write every entry and `meta` to `directory` (created; must not hold a store).

        Raises:
            OutputError: the folder cannot be written.
        """
        directory = Path(directory)
        try:
            directory.mkdir(parents=True, exist_ok=True)
            if (directory / "index.json").exists():
                raise OutputError(f"{directory} already holds a saved store: choose another folder")
            entries = []
            offset = 0
            tmp = directory / "entries.bin.part"
            with open(tmp, "wb") as f:
                for key in self.keys():
                    value = self.get(key)
                    array = value.numpy()
                    f.write(array.tobytes())
                    entries.append(dict(key=list(key), offset=offset, shape=list(array.shape),
                                        dtype=_DTYPES[value.dtype]))
                    offset += array.nbytes
            os.replace(tmp, directory / "entries.bin")
            index = dict(version=FORMAT_VERSION, size=offset, entries=entries, meta=self.meta)
            with open(directory / "index.json.part", "w") as f:
                json.dump(index, f)
            os.replace(directory / "index.json.part", directory / "index.json")
        except OSError as err:
            raise OutputError(f"cannot save the inversion to {directory}: {err.strerror or err}") from None

    @classmethod
    def load(cls, directory) -> "AttentionStore":
        """Map a folder written by `save` (read-only; entries are read from disk on `get`).

        Raises:
            InputError: the folder is missing, incomplete or not a saved store.
        """
        directory = Path(directory)
        index_path, data_path = directory / "index.json", directory / "entries.bin"
        if not index_path.is_file() or not data_path.is_file():
            raise InputError(f"{directory} is not a saved inversion (no index.json / entries.bin)")
        try:
            with open(index_path) as f:
                index = json.load(f)
        except (OSError, ValueError) as err:
            raise InputError(f"cannot read {index_path}: {err}") from None
        if index.get("version") != FORMAT_VERSION:
            raise InputError(f"{directory} was saved by an incompatible diffstream version")
        if data_path.stat().st_size != index.get("size"):
            raise InputError(f"saved inversion {directory} is incomplete (entries.bin has the wrong size)")
        store = cls(budget_bytes=0)
        store.meta = index.get("meta", {})
        for e in index["entries"]:
            key = (e["key"][0], e["key"][1], int(e["key"][2]))
            store._disk[key] = _OnDisk(str(data_path), int(e["offset"]), tuple(e["shape"]), e["dtype"])
        store._read_only = True
        return store

    def close(self) -> None:
        """Drop every entry and delete the spill file."""
        self._ram.clear()
        self._disk.clear()
        self._ram_bytes = 0
        if self._spill_file is not None:
            self._spill_file.close()
            self._spill_file = None
        if self._spill_tmpdir is not None:
            shutil.rmtree(self._spill_tmpdir, ignore_errors=True)
            self._spill_tmpdir = None

    def __enter__(self) -> "AttentionStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
