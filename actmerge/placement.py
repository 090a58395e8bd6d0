"""Where a model's weights live while actmerge runs it: one device, or accelerate's device map.

A model larger than RAM (or than the GPU) loads with ``device_map="auto"`` and a ``max_memory``
budget per device: transformers/accelerate place whole decoder layers on the GPUs, then the CPU, and
leave the rest on disk (read from the checkpoint's own safetensors files, or from ``offload_folder``
when they must be converted), moving each layer's weights in for its forward. Hooks see activations
on whichever device a layer runs on; collection pools there and brings the pooled rows to the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import PlacementError

if TYPE_CHECKING:  # torch is imported where it is used: importing models/cli stays light
    import torch

DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
MEMORY_HELP = "e.g. 'cpu=2GiB', or '0=20GiB,cpu=30GiB' (GPU index or cpu/mps/disk = size in GiB, MiB, GB, MB)"


def pick_device(device: str | None) -> str:
    """The device asked for, else ``cuda`` when PyTorch sees a GPU, else ``cpu``."""
    import torch

    if not device:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise PlacementError(f"--device {device!r} is not a torch device: use cpu, cuda or cuda:N.") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise PlacementError(f"--device {device}: PyTorch sees no CUDA GPU here; use --device cpu.")
    return device


def parse_max_memory(spec: str | dict | None) -> dict[int | str, int] | None:
    """``'0=20GiB,cpu=30GiB'`` → ``{0: 20·2³⁰, 'cpu': 30·2³⁰}`` (bytes). A dict is checked the same way."""
    if spec is None or spec == "" or spec == {}:
        return None
    if isinstance(spec, str):
        items = []
        for part in (p.strip() for p in spec.split(",")):
            key, sep, value = part.partition("=")
            if not sep or not key.strip() or not value.strip():
                raise PlacementError(f"--max-memory {spec!r}: {part!r} is not DEVICE=SIZE; {MEMORY_HELP}.")
            items.append((key.strip(), value.strip()))
    else:
        items = list(spec.items())
    out: dict[int | str, int] = {}
    for key, value in items:
        dev = _memory_device(key, spec)
        if dev in out:
            raise PlacementError(f"--max-memory {spec!r}: device {key!r} is given twice.")
        out[dev] = _memory_size(value, spec)
    return out


def _memory_device(key: int | str, spec) -> int | str:
    if isinstance(key, int):
        return key
    k = key.strip().lower()
    if k.isdigit():
        return int(k)
    if k.startswith("cuda:") and k[5:].isdigit():
        return int(k[5:])
    if k == "cuda":
        return 0
    if k in ("cpu", "mps", "disk"):
        return k
    raise PlacementError(f"--max-memory {spec!r}: unknown device {key!r}; {MEMORY_HELP}.")


def _memory_size(value: int | str, spec) -> int:
    from accelerate.utils import convert_file_size_to_int

    if isinstance(value, str):
        value = int(value) if value.strip().isdigit() else value.strip()  # digits alone: bytes
    try:
        size = convert_file_size_to_int(value)
    except (ValueError, AttributeError, TypeError):
        size = -1
    if size <= 0:
        raise PlacementError(f"--max-memory {spec!r}: {value!r} is not a size; {MEMORY_HELP}.")
    return size


def from_pretrained_kwargs(
    device: str,
    device_map: str | dict | None = None,
    max_memory: str | dict | None = None,
    offload_folder: str | Path | None = None,
) -> dict:
    """``from_pretrained`` arguments for accelerate's dispatch; ``{}`` when the whole model goes to
    ``device``. A memory budget or an offload folder alone implies ``device_map="auto"``."""
    import torch

    memory = parse_max_memory(max_memory)
    if device_map is None and memory is None and offload_folder is None:
        return {}
    device_map = device_map or "auto"
    if isinstance(device_map, str) and device_map not in DEVICE_MAPS:
        raise PlacementError(
            f"--device-map {device_map!r}: use one of {', '.join(DEVICE_MAPS)} "
            "(or pass a {module: device} dict through the library API)."
        )
    gpus = [k for k in memory or {} if isinstance(k, int)]
    if torch.device(device).type == "cuda" and memory is not None and not gpus:
        raise PlacementError(
            f"--max-memory {max_memory!r} gives no GPU a budget, so nothing would run on --device {device}: "
            "add one (e.g. 0=20GiB,cpu=30GiB) or use --device cpu."
        )
    if torch.device(device).type == "cpu" and isinstance(device_map, str):
        if gpus:
            raise PlacementError(
                f"--max-memory gives GPU budgets ({gpus}) but --device is cpu: drop them or use --device cuda."
            )
        if memory is None and torch.cuda.is_available():
            from accelerate.utils import get_max_memory

            memory = {"cpu": get_max_memory()["cpu"]}  # --device cpu: keep the GPUs out of the map
    kwargs: dict = {"device_map": device_map}
    if memory:
        kwargs["max_memory"] = memory
    if offload_folder is not None:
        kwargs["offload_folder"] = str(offload_folder)
    return kwargs


def input_device(model: torch.nn.Module) -> torch.device:
    """Where a batch's input ids go: the execution device of the input embedding under accelerate's
    hooks (its weights may sit on disk, as ``meta`` tensors), else the device of the parameters."""
    import torch

    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    hook = getattr(emb, "_hf_hook", None)
    for h in getattr(hook, "hooks", [hook]):  # a SequentialHook holds several
        execution = getattr(h, "execution_device", None)
        if execution is not None:
            return torch.device(f"cuda:{execution}" if isinstance(execution, int) else execution)
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def offloaded(model: torch.nn.Module) -> dict[str, int]:
    """How many modules of accelerate's device map sit on each device, e.g. ``{'cpu': 20, 'disk': 9}``."""
    counts: dict[str, int] = {}
    for dev in (getattr(model, "hf_device_map", None) or {}).values():
        counts[str(dev)] = counts.get(str(dev), 0) + 1
    return counts


@dataclass(frozen=True)
class Placement:
    """Where a model is loaded, as one value passed from the CLI to ``models.load_model`` (fit, bake,
    verify, eval). ``device``: None = cuda when present, else cpu; ``device_map`` / ``max_memory`` /
    ``offload_folder``: accelerate's dispatch for models larger than memory. Checked on construction,
    so a bad value fails before any slow work."""

    device: str | None = None
    device_map: str | dict | None = None
    max_memory: str | dict | None = None
    offload_folder: str | Path | None = None

    def __post_init__(self):
        from_pretrained_kwargs(
            pick_device(self.device), self.device_map, self.max_memory, self.offload_folder
        )

    @property
    def dispatched(self) -> bool:
        return any(v is not None for v in (self.device_map, self.max_memory, self.offload_folder))

    def kwargs(self) -> dict:
        """``from_pretrained`` arguments (``{}``: load whole, then move to ``resolved_device``)."""
        return from_pretrained_kwargs(
            self.resolved_device, self.device_map, self.max_memory, self.offload_folder
        )

    @property
    def resolved_device(self) -> str:
        return pick_device(self.device)

    def to_dict(self) -> dict:
        return {
            "device": self.device,
            "device_map": self.device_map if not isinstance(self.device_map, dict) else "custom",
            "max_memory": self.max_memory
            if isinstance(self.max_memory, str | None)
            else str(self.max_memory),
            "offload_folder": None if self.offload_folder is None else str(self.offload_folder),
        }
