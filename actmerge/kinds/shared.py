"""What both kinds of model use: ``hook_module`` (a forward hook on one module as a context manager
that always cleans up) and ``run_isolated`` (a job in a fresh interpreter that never imports the
caller's model objects: how ``verify`` loads a baked checkpoint with plain transformers / diffusers)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from ..errors import MapsMismatchError, VerificationError

ActFn = Callable[[torch.Tensor], torch.Tensor | None]


@contextmanager
def hook_module(module: torch.nn.Module, side: str, fn: ActFn, key: str) -> Iterator[None]:
    """Run ``fn`` on ``module``'s input (the first positional argument, else the ``hidden_states``
    keyword) or output (a tensor, or the first element of a tuple); ``None`` leaves it unchanged."""
    if side == "input":

        def pre_hook(_mod, args, kwargs):
            if args:
                new = fn(args[0])
                return None if new is None else ((new, *args[1:]), kwargs)
            if "hidden_states" in kwargs:
                new = fn(kwargs["hidden_states"])
                return None if new is None else (args, {**kwargs, "hidden_states": new})
            raise MapsMismatchError(
                f"{key!r}: the module was called without a positional or hidden_states input."
            )

        handle = module.register_forward_pre_hook(pre_hook, with_kwargs=True)
    elif side == "output":

        def hook(_mod, _args, output):
            tensor = output[0] if isinstance(output, tuple) else output
            new = fn(tensor)
            if new is None:
                return None
            return (new, *output[1:]) if isinstance(output, tuple) else new

        handle = module.register_forward_hook(hook)
    else:
        raise MapsMismatchError(f"{key!r}: side must be 'input' or 'output'.")
    try:
        yield
    finally:
        handle.remove()


def run_isolated(argv: list[str], payload: dict, what: str) -> dict:
    """Run ``python ARGV… ARGS.json OUT.pt`` in a fresh interpreter (offline, in a temp dir) and load
    what it saved: the baked model is loaded by plain transformers / diffusers there, never by
    actmerge."""
    with tempfile.TemporaryDirectory() as d:
        apath, opath = Path(d) / "args.json", Path(d) / "out.pt"
        apath.write_text(json.dumps(payload))
        env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
        proc = subprocess.run(
            [sys.executable, *argv, str(apath), str(opath)], capture_output=True, text=True, env=env, cwd=d
        )
        if proc.returncode != 0:
            raise VerificationError(f"{what}:\n{proc.stderr[-3000:]}")
        return torch.load(opath)
