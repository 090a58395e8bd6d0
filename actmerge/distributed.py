"""Fitting under ``torchrun`` / ``accelerate launch``: one process per rank, data parallel.

The launchers start one process per device and set ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``;
``session`` opens the process group from them (gloo on the CPU, NCCL when the model runs on CUDA).
Everything else here is a no-op in a single process (no ``torch.distributed`` call at all), so the
one-process path is unchanged.

What is exact: collection deals whole batches round robin (``shard``: batch ``b`` goes to rank
``b mod N``), so each sentence is pooled in the very batch one process would put it in, and
``gather_rows`` puts the rows back in sentence order on every rank — the Linear-AcT / Mean-AcT /
Gaussian fits then see the one-process rows bit for bit. A LinEAS step deals the step's sentences over
the ranks (``deal``), pads each share to the whole batch's width, gathers the pooled rows of all ranks
(``join_rows``: the loss sorts over the whole batch, so it is computed on the joined rows, with
gradients flowing through this rank's own rows only) and sums the gradients (``all_reduce_grads``):
the sum over ranks is the one-process gradient. LinEAS keeps its maps and their gradients in float64,
so that sum differs from one process's only in float64 rounding (float32 sums split differently
differ at ~1e-7, which the loss's sorts amplify over the steps: 6e-3 on Gemma's detox.yaml before).

Failing together: every collective here starts with ``check`` — one all-reduce of "the lowest rank
that failed" — and a rank whose work raised calls ``fail_together`` (from ``session``) instead. Each
rank's next collective is therefore that same all-reduce; when one failed, the failing rank's message
and exit code are broadcast and every rank raises them (``DistributedError`` on the others), so every
process prints the same line and exits with the same code. ``proceed_on_main`` lets rank 0 alone go on
to plan and write once every rank has fitted; the other ranks wait in ``session``'s final ``check``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from typing import TYPE_CHECKING

from .errors import ActmergeError, DistributedError, PlacementError

if TYPE_CHECKING:
    import torch

# rank 0 may plan, write, verify and publish alone while the others wait for it
TIMEOUT = timedelta(hours=12)


def world() -> tuple[int, int]:
    """(this process's rank, number of processes): (0, 1) unless a process group is open."""
    dist = sys.modules.get("torch.distributed")  # never imported here: a plain run stays light
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def is_main() -> bool:
    """Rank 0, or the only process (before the process group opens: by the launcher's ``RANK``)."""
    rank, size = world()
    if size == 1 and launched():
        rank = int(os.environ.get("RANK", "0") or "0")
    return rank == 0


def launched() -> bool:
    """Started by torchrun / accelerate launch with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1") or "1") > 1


@contextmanager
def session(device: str | None = None) -> Iterator[None]:
    """One command under a launcher: open the process group from the launcher's environment (NCCL
    with each rank on ``cuda:LOCAL_RANK`` when CUDA is the device, else gloo), make every rank fail
    with the same message when one fails, wait for rank 0 at the end, close the group. Without a
    launcher (``WORLD_SIZE`` unset or 1): nothing."""
    if not launched():
        yield
        return
    import torch
    import torch.distributed as dist

    cuda = torch.cuda.is_available() and (device is None or device.startswith("cuda"))
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or "1")
    if cuda and per_node > torch.cuda.device_count():  # the same answer on every rank of the node
        raise PlacementError(
            f"{per_node} processes on this node but {torch.cuda.device_count()} CUDA GPU(s): launch "
            f"--nproc-per-node {torch.cuda.device_count()} (one process per GPU), or fit with --device cpu."
        )
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT)
    try:
        try:
            yield
        except Exception as exc:
            fail_together(exc)
            raise
        check()  # every rank waits here for rank 0's writing (and fails with it)
    finally:
        dist.destroy_process_group()


def check() -> None:
    """A point every rank reaches: raise here on every rank if any rank failed (its message)."""
    if world()[1] > 1:
        _agree(None)


def fail_together(exc: BaseException) -> None:
    """This rank failed with ``exc``: tell the others (their next ``check`` raises the same message);
    an error the ranks have already agreed on passes through."""
    if world()[1] > 1 and not getattr(exc, "actmerge_agreed", False):
        _agree(exc)


def _agree(exc: BaseException | None) -> None:
    import torch
    import torch.distributed as dist

    rank, size = world()
    first = torch.tensor([rank if exc is not None else size], device=_device())
    dist.all_reduce(first, op=dist.ReduceOp.MIN)
    src = int(first.item())
    if src == size:
        return
    own = _note(exc, rank, size) if exc is not None else [None, None]
    note = list(own)
    dist.broadcast_object_list(note, src=src)
    if exc is not None:
        exc.actmerge_agreed = True
        if note == own:
            return  # this rank failed the same way (or first): the caller re-raises its own error
    err = DistributedError(note[0], exit_code=note[1])
    err.actmerge_agreed = True
    raise err


def _note(exc: BaseException, rank: int, size: int) -> list:
    """[message, exit code] of a failure, as the other ranks report it."""
    if isinstance(exc, ActmergeError):
        return [str(exc), exc.exit_code]
    code = getattr(exc, "exit_code", None)
    if isinstance(code, int):  # click's Exit (e.g. a failed verification's 5) or a usage error
        text = exc.format_message() if hasattr(exc, "format_message") else ""
        return [text or f"process {rank} of {size} stopped with exit code {code} (see its output).", code]
    # a bug: the failing rank shows its traceback, the others say where to look
    return [f"process {rank} of {size} failed ({type(exc).__name__}: {exc}); see its traceback.", 1]


def proceed_on_main() -> bool:
    """After a fit: every rank got here (else every rank raises); True on the one process that goes
    on to plan and write (rank 0, or the only process)."""
    check()
    return is_main()


def shard(n: int, block: int) -> list[int]:
    """This rank's items out of ``n``, dealt in blocks of ``block`` (the collection batches): block
    ``b`` goes to rank ``b mod N``. In one process: all of them."""
    rank, size = world()
    return [i for i in range(n) if (i // block) % size == rank]


def gather_rows(
    local: dict[str, torch.Tensor], keys: Sequence[str], n: int, block: int
) -> dict[str, torch.Tensor]:
    """Every rank's collected rows ``{key: [n_r, D]}`` (from its ``shard(n, block)``), on every rank,
    as ``{key: [n, D]}`` in the original order. Site by site, so the extra memory is one site's rows."""
    import torch
    import torch.distributed as dist

    rank, size = world()
    if size == 1:
        return local
    check()
    rows_of = [[i for i in range(n) if (i // block) % size == r] for r in range(size)]
    out: dict[str, torch.Tensor] = {}
    for key in keys:
        parts: list = [None] * size
        dist.all_gather_object(parts, local.get(key))
        rows = next(p for p in parts if p is not None)
        full = torch.empty(n, rows.shape[1], dtype=rows.dtype)
        for r, part in enumerate(parts):
            if part is not None:
                full[rows_of[r]] = part
        out[key] = full
    return out


def deal(items: list) -> list[list]:
    """A global batch split over the ranks: rank ``r`` takes ``items[r::N]`` (one share in one process)."""
    size = world()[1]
    return [items[r::size] for r in range(size)]


def join_rows(local: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """This rank's rows ``[counts[rank], D]`` (its share from ``deal``) with every other rank's, back in
    the order of the items ``deal`` split ``[Σ counts, D]`` — the very tensor one process has, so a sort
    of it breaks ties alike: the others' rows are copies (no gradient), this rank's keep theirs."""
    import torch
    import torch.distributed as dist

    rank, size = world()
    if size == 1:
        return local
    check()
    width = max(counts)
    padded = torch.zeros(width, local.shape[1], dtype=local.dtype, device=local.device)
    padded[: len(local)] = local.detach()
    parts = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(parts, padded)
    joined = torch.cat([local if r == rank else parts[r][: counts[r]] for r in range(size)])
    start = [sum(counts[:r]) for r in range(size)]
    order = [start[i % size] + i // size for i in range(sum(counts))]  # item i: rank i mod N, its i // N-th
    return joined[torch.tensor(order, device=joined.device)]


def all_reduce_grads(params: list[torch.Tensor]) -> None:
    """Sum the gradients of ``params`` over the ranks (each rank's loss holds only its own rows'
    share of the whole batch's loss, so the sum is the one-process gradient; LinEAS's are float64, so
    the sum rounds as one process's does, to float64 precision)."""
    import torch
    import torch.distributed as dist

    if world()[1] == 1:
        return
    check()
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    for p, g in zip(params, flat.split([g.numel() for g in grads]), strict=True):
        p.grad = g.view_as(p).clone()


def _device() -> str:
    import torch
    import torch.distributed as dist

    return f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu"
