"""A lazy tensor reader over the shards of a weight set: a tensor is decoded only when asked for."""

from __future__ import annotations

import mmap
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open

from .st_format import DTYPES, Shard, nbytes

MAP_BYTES = 1 << 20  # a tensor this large is read as a view of a private file mapping, not a copy


class Reader:
    """``read(name)`` → an original tensor; safetensors handles are opened on demand and closed on
    exit, so only the shards a caller reads from are ever open. A tensor of ``MAP_BYTES`` or more
    is a copy-on-write view of the file (no copy until written; the mapping lives as long as the
    tensor)."""

    def __init__(self, where: dict[str, Shard]):
        self.where = where
        self.stack = ExitStack()
        self.handles: dict[Path, object] = {}
        self.maps: dict[Path, mmap.mmap] = {}  # closed when the last tensor viewing one is freed

    def __enter__(self):
        return self.read

    def __exit__(self, *exc):
        self.stack.close()
        self.handles.clear()
        self.maps.clear()

    def read(self, name: str) -> torch.Tensor:
        shard = self.where[name]
        meta, path = shard.header[name], shard.path
        if nbytes(meta) >= MAP_BYTES and meta["dtype"] in DTYPES:  # zero-copy: a private mapping
            if path not in self.maps:
                with open(path, "rb") as f:
                    self.maps[path] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            dtype = DTYPES[meta["dtype"]]
            start, stop = meta["data_offsets"]
            count = (stop - start) // torch.empty((), dtype=dtype).element_size()
            offset = shard.data_start + start
            t = torch.frombuffer(self.maps[path], dtype=dtype, count=count, offset=offset).view(meta["shape"])
            # a product (b + W c) on a float32 weight itself may round differently at another
            # alignment: such a weight is a view only at the allocator's 64-byte alignment (other
            # dtypes are upcast into a fresh, aligned tensor first)
            return t if offset % 64 == 0 or dtype != torch.float32 else t.clone()
        if path not in self.handles:
            self.handles[path] = self.stack.enter_context(safe_open(str(path), framework="pt"))
        return self.handles[path].get_tensor(name)
