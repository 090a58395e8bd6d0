"""Rewrite one weight set (a single safetensors file, or the shards an index names) with some
tensors recomputed and some added. Each output shard is handed only its own tensors: a module whose
weight and bias sit in different shards is computed for each, and each keeps what lives in it."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .safetensors import DTYPES, Reader, TensorInfo, nbytes, read_shard, tensor_index, write_shard

Compute = Callable[[str, Callable[[str], torch.Tensor]], dict[str, torch.Tensor]]


@dataclass
class WeightEdits:
    """What to change in a weight set: ``edited`` tensor name → the unit (module) whose
    ``compute(unit, read)`` returns it; ``added`` new tensor name → (existing tensor it is placed
    beside, its info); an added tensor no unit computes is written as zeros."""

    compute: Compute
    edited: dict[str, str] = field(default_factory=dict)
    added: dict[str, tuple[str, TensorInfo]] = field(default_factory=dict)


def rewrite_weights(
    files: list[Path],
    dest: Path,
    edits: WeightEdits | None,
    *,
    index: Path | None = None,
    progress: Callable[[Iterable, int, str], Iterable] | None = None,
) -> None:
    """Write every shard of ``files`` into directory ``dest`` (same file names), and ``index``
    (``*.safetensors.index.json``) with the added tensors and the new ``total_size``."""
    infos, where = tensor_index(files)
    edits = edits or WeightEdits(lambda unit, read: {})
    home: dict[str, Path] = {}  # output tensor → the shard it is written to
    for name in edits.edited:
        home[name] = where[name].path if name in where else where[edits.added[name][0]].path
    for name, (anchor, _) in edits.added.items():
        home[name] = where[anchor].path
    it = progress(files, len(files), "writing shards") if progress else files
    for path in it:
        own = {n for n, p in home.items() if p == path}
        values: dict[str, torch.Tensor] = {}
        with Reader(where) as read:  # input shards are opened for this output shard only
            for unit in sorted({edits.edited[n] for n in own if n in edits.edited}):
                values.update({k: v for k, v in edits.compute(unit, read).items() if k in own})
        for name in own & set(edits.added):
            if name not in values:  # e.g. a companion bias a new config flag requires
                info = edits.added[name][1]
                values[name] = torch.zeros(info.shape, dtype=DTYPES[info.dtype])
        write_shard(read_shard(path), values, dest / path.name)
        values.clear()
    if index is not None and index.is_file():
        data = json.loads(index.read_text())
        for name, (anchor, _) in edits.added.items():
            data["weight_map"][name] = where[anchor].path.name
        data["weight_map"] = dict(sorted(data["weight_map"].items()))
        total = sum(nbytes(m) for f in files for m in read_shard(dest / f.name).tensors().values())
        data.setdefault("metadata", {})["total_size"] = total
        (dest / index.name).write_text(json.dumps(data, indent=2) + "\n")
