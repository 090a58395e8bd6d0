"""Rewrite one weight set (a single safetensors file, or the shards an index names) with some
tensors recomputed and some added. Each output shard is handed only its own tensors; each module is
computed once (a module whose weight and bias sit in different shards hands each its own)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from itertools import groupby
from pathlib import Path

import torch

from .st_format import DTYPES, TensorInfo, nbytes, read_shard, tensor_index
from .st_reader import Reader
from .st_rewrite import Value, write_shard
from .st_writer import Writer

Compute = Callable[[str, Callable[[str], torch.Tensor]], dict[str, Value]]


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
    progress: Callable[[Iterable, int, str], AbstractContextManager[Iterable]] | None = None,
) -> None:
    """Write every shard of ``files`` into directory ``dest`` (same file names), and ``index``
    (``*.safetensors.index.json``) with the added tensors and the new ``total_size``.

    A shard with nothing to change is copied whole (a reflink where the file system has one); an
    edited one keeps its header and layout and only its edited byte ranges are rewritten; every added
    tensor goes into one shard (the smallest), whose header is rewritten with the data section moved
    by whole pages. Each unit is computed once, with the shard it reads open (its outputs for later
    shards — a bias in another shard, an added bias — wait in memory until that shard is written).
    One writer thread (``Writer``) copies and writes every shard while this thread computes: a
    shard's work is queued, then the next shard's units are computed while it is copied; the files
    are complete when this returns."""
    infos, where = tensor_index(files)
    edits = edits or WeightEdits(lambda unit, read: {})
    order = {p: i for i, p in enumerate(files)}
    added_home = min(files, key=lambda p: (p.stat().st_size, -order[p])) if edits.added else None
    home: dict[str, Path] = {}  # output tensor → the shard it is written to
    for name in edits.edited:
        home[name] = where[name].path if name in where else added_home
    for name in edits.added:
        home[name] = added_home
    due: dict[Path, set[str]] = {}  # shard → units computed when it is written
    reads: dict[str, Path] = {}  # unit → the shard it reads (its first existing tensor)
    for name, unit in sorted(edits.edited.items()):
        if name in where:
            reads.setdefault(unit, where[name].path)
    for unit, path in reads.items():
        due.setdefault(path, set()).add(unit)
    done: set[str] = set()
    pending: dict[Path, dict[str, Value]] = {}
    bar = progress or (lambda it, _total, _desc: nullcontext(it))
    # one thread copies and writes while this one computes the next shard
    with bar(files, len(files), "writing shards") as todo, Writer() as writer:
        for path in todo:
            todo = {u for n, u in edits.edited.items() if home[n] == path} | due.get(path, set())
            todo -= done
            # grouped by the shard they read: one input shard open at a time
            for _, group in groupby(
                sorted(todo, key=lambda u: (order.get(reads.get(u), -1), u)), key=reads.get
            ):
                with Reader(where) as read:
                    for unit in group:
                        for k, v in edits.compute(unit, read).items():
                            if edits.edited.get(k) == unit:
                                pending.setdefault(home[k], {})[k] = v
                        done.add(unit)
            values = pending.pop(path, {})
            for name in edits.added:
                if home[name] == path and name not in values:  # e.g. a companion bias a config flag requires
                    info = edits.added[name][1]
                    values[name] = torch.zeros(info.shape, dtype=DTYPES[info.dtype])
            write_shard(read_shard(path), values, dest / path.name, writer=writer)
            values.clear()
    if index is not None and index.is_file():
        data = json.loads(index.read_text())
        for name in edits.added:
            data["weight_map"][name] = added_home.name
        data["weight_map"] = dict(sorted(data["weight_map"].items()))
        total = sum(nbytes(m) for f in files for m in read_shard(dest / f.name).tensors().values())
        data.setdefault("metadata", {})["total_size"] = total
        (dest / index.name).write_text(json.dumps(data, indent=2) + "\n")
