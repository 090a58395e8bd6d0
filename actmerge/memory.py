"""What a LinEAS fit holds in memory, per device, estimated from the model's config before loading.

A LinEAS step runs the steered batch forward through the frozen model up to the last site and back
(``lineas``), so a device holds, at its peak:

- **weights**: every parameter of the layers on it, in the loaded dtype (float32 unless asked);
- **activations**: what autograd keeps for the backward pass, per token of the batch and per decoder
  layer the forward runs through, plus the softmax of eager attention (``T`` per head per token), times
  ``TRANSIENT`` for the backward's passing gradients and the allocator's slack (measured);
  ``ACT_HIDDEN`` · hidden + ``ACT_HEADS`` · (heads · head_dim) + ``ACT_MLP`` · intermediate values
  per token and layer, counted from the tensors PyTorch's autograd saves for a decoder layer whose
  weights need no gradient (norm inputs, rotated queries/keys, values, the gated MLP's inputs);
- **maps and target rows**: ω, β, their gradients and Adam's two moments in float64 (48 bytes a
  neuron), and the target's pooled rows ``[M, Σ D]`` in float32 with a sorted copy;
- **runtime**: Python, PyTorch and transformers themselves (``RUNTIME``, measured on the CPU).

Loading comes first and can be the peak: a checkpoint stored in another dtype than the loaded one
(a bf16 release loaded in float32) is read through memory-mapped files while its float32 copy is
built, so for a moment the process holds both (**load**: the stored bytes; measured on a 1.24 B
bf16 Llama: peak 7.29 GiB = 4.60 float32 + 2.30 stored + runtime). A checkpoint stored in the loaded
dtype is mapped without a copy and adds nothing. The estimate is the larger of the two moments; it is
conservative where pages the fit never touches stay unmapped (a tied embedding the forward reads a
few rows of: 1.10-1.18 × the measured peak on the float32 Gemma-3-270M snapshot, bench/scale.py).

Under ``torchrun`` each process holds the whole model and its share of the batch (``ranks``).
``tests/test_memory.py`` checks the estimate against the measured peak RSS of a fit within 20 %.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import PlacementError
from .io.st_format import DTYPES, tensor_index

GIB = 2**30
RUNTIME = int(0.39 * GIB)  # python + torch + transformers + actmerge imported: peak RSS measured (CPU)
ACT_HIDDEN = 6  # residual-stream sized tensors saved per token and layer (norm inputs, their rsqrt, …)
ACT_HEADS = 4  # rotated q, repeated k and v, attention output
ACT_MLP = 4  # gate, its activation, up, their product
# the backward's transient gradients and the allocator's slack on top of the saved tensors: measured
# 1.22-1.27 × on Llama and Gemma 3 shapes (hidden 128-256, MLP 1024-2048, 96-128 tokens)
TRANSIENT = 1.25
BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per device, by part."""

    weights: int
    activations: int
    maps: int
    runtime: int = RUNTIME
    load: int = 0  # stored bytes held beside the loaded weights while converting them

    @property
    def total(self) -> int:
        return self.weights + max(self.activations + self.maps, self.load) + self.runtime

    def describe(self, batch: int, tokens: int, ranks: int = 1) -> str:
        per = (
            f" per process ({ranks} processes, {math.ceil(batch / ranks)} sentences each)"
            if ranks > 1
            else ""
        )
        return (
            f"LinEAS memory estimate{per}: ~{self.total / GIB:.2f} GiB = weights {self.weights / GIB:.2f} + "
            f"activations {self.activations / GIB:.2f} (batch {batch} × {tokens} tokens) + maps and target rows "
            f"{self.maps / GIB:.2f} + runtime {self.runtime / GIB:.2f} GiB"
            + (
                f"; loading needs weights + {self.load / GIB:.2f} GiB stored bytes while converting"
                if self.load
                else ""
            )
        )


def parameter_count(path: str | Path | None, config: dict) -> int:
    """Parameters of the checkpoint: summed from its safetensors headers when ``path`` has them (exact,
    any architecture), else counted from a decoder-only config (gated MLP)."""
    files = sorted(Path(path).glob("*.safetensors")) if path is not None else []
    if files:
        return sum(math.prod(info.shape) for info in tensor_index(files)[0].values())
    c = _text(config)
    hidden, inter, layers = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    heads, kv = c["num_attention_heads"], c.get("num_key_value_heads") or c["num_attention_heads"]
    hd = c.get("head_dim") or hidden // heads
    per_layer = hidden * hd * (2 * heads + 2 * kv) + 3 * hidden * inter + 4 * hidden
    embed = c["vocab_size"] * hidden * (1 if c.get("tie_word_embeddings", True) else 2)
    return layers * per_layer + embed + hidden


def lineas_memory(
    config: dict,
    *,
    site_dims: list[int],
    batch: int,
    tokens: int,
    n_target: int,
    layers: int | None = None,
    ranks: int = 1,
    dtype_bytes: int = 4,
    path: str | Path | None = None,
    eager_attention: bool = True,
) -> MemoryEstimate:
    """The peak memory of one device of a LinEAS fit: ``site_dims`` the neurons of each site,
    ``batch`` sentences a step of at most ``tokens`` tokens, ``n_target`` target sentences, ``layers``
    the decoder layers the forward runs through (default: all), ``ranks`` processes sharing the batch,
    ``dtype_bytes`` of the loaded weights, ``path`` the checkpoint (exact parameter count)."""
    c = _text(config)
    hidden, inter = c["hidden_size"], c["intermediate_size"]
    heads = c["num_attention_heads"]
    hd = c.get("head_dim") or hidden // heads
    layers = c["num_hidden_layers"] if layers is None else layers
    rows = math.ceil(batch / ranks) * tokens  # this process's tokens of a step
    per_token = ACT_HIDDEN * hidden + ACT_HEADS * heads * hd + ACT_MLP * inter
    per_token += heads * tokens if eager_attention else 0
    activations = int(rows * layers * per_token * dtype_bytes * TRANSIENT)
    activations += rows * hidden * dtype_bytes * 4  # embeddings and the last layer's transients
    neurons = sum(site_dims)
    maps = neurons * 48 + n_target * neurons * 4 * 2 + rows * max(site_dims, default=0) * 8
    return MemoryEstimate(
        parameter_count(path, config) * dtype_bytes, activations, maps, load=load_transient(path, dtype_bytes)
    )


def load_transient(path: str | Path | None, dtype_bytes: int = 4) -> int:
    """Bytes of the checkpoint at ``path`` stored in another dtype than the loaded one (``dtype_bytes``
    a value): they are mapped while converted, beside the converted copy. 0 without safetensors."""
    files = sorted(Path(path).glob("*.safetensors")) if path is not None else []
    if not files:
        return 0
    infos = tensor_index(files)[0].values()
    sizes = ((math.prod(i.shape), DTYPES[i.dtype].itemsize if i.dtype in DTYPES else 4) for i in infos)
    return sum(n * size for n, size in sizes if size != dtype_bytes)


def site_dim(name: str, config: dict) -> int:
    """Neurons at a site: the attention context (heads · head_dim), the MLP hidden (intermediate), or
    the residual stream (hidden)."""
    c = _text(config)
    if name == "attn_ctx":
        return c["num_attention_heads"] * (c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"])
    if name == "mlp_hidden":
        return c["intermediate_size"]
    return c["hidden_size"]


# the config keys the formulas read, and the names other families give them (GPT-2: n_embd, …)
ALIASES = {
    "hidden_size": ("n_embd", "d_model"),
    "num_attention_heads": ("n_head", "num_heads"),
    "num_hidden_layers": ("n_layer", "num_layers"),
    "intermediate_size": ("n_inner", "ffn_dim"),
}


def _text(config: dict) -> dict:
    """The language model's config (a multimodal config's ``text_config``) under the keys the formulas
    read; an MLP width the config leaves unset is 4 × hidden (GPT-2's ``n_inner: null``)."""
    c = dict(config.get("text_config") or config)
    for key, names in ALIASES.items():
        if c.get(key) is None:
            c[key] = next((c[n] for n in names if c.get(n) is not None), None)
    if c["intermediate_size"] is None and c["hidden_size"] is not None:
        c["intermediate_size"] = 4 * c["hidden_size"]
    return c


def largest_block(path: str | Path, dtype_bytes: int = 4) -> int:
    """Bytes of the largest piece accelerate places whole (one decoder layer, or a tensor outside the
    layers such as the embedding) of the checkpoint at ``path``, loaded with ``dtype_bytes`` a value."""
    blocks: dict[str, int] = {}
    for name, info in tensor_index(sorted(Path(path).glob("*.safetensors")))[0].items():
        layer = re.search(r"\.layers?\.\d+\.|\.h\.\d+\.", name)
        key = name[: layer.end()] if layer else name
        blocks[key] = blocks.get(key, 0) + math.prod(info.shape) * dtype_bytes
    return max(blocks.values(), default=0)


def check_budget(path: str | Path, max_memory: dict | None, what: str, dtype_bytes: int = 4) -> None:
    """A ``--max-memory`` budget (parsed: device → bytes) that cannot hold even one decoder layer of the
    checkpoint at ``path`` leaves nothing that can run: say so, with the least that works, before loading."""
    if not max_memory:
        return
    budget = (
        max(v for k, v in max_memory.items() if k != "disk")
        if len(max_memory) > ("disk" in max_memory)
        else 0
    )
    need = largest_block(path, dtype_bytes)
    if budget < need:
        raise PlacementError(
            f"--max-memory gives at most {budget / 2**20:.1f} MiB to a device, less than one layer of {what} "
            f"({need / 2**20:.1f} MiB in float32): nothing could run. Raise it to at least "
            f"{math.ceil(need / 2**20)}MiB (the layers beyond it go to disk)."
        )


def peak_rss() -> int:
    """This process image's peak resident memory in bytes. On Linux it is ``VmHWM`` of
    ``/proc/self/status``: ``getrusage``'s ``ru_maxrss`` survives ``exec`` and so reports the
    parent's peak for a child started by a large process (a test runner holding models)."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        import resource
        import sys

        scale = 1 if sys.platform == "darwin" else 1024  # macOS reports bytes, Linux KiB
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
    return int(re.search(r"^VmHWM:\s+(\d+) kB", status, re.M).group(1)) * 1024
