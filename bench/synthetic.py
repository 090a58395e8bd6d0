"""Write a synthetic checkpoint with a real configuration and random weights (bf16), for measuring
what actmerge costs at a size no built-in model has.

    python bench/synthetic.py OUT [--shape llama-3.2-1b]

``llama-3.2-1b``: Llama-3.2-1B's shapes (hidden 2048, 16 layers, 32 heads / 8 KV heads, MLP 8192,
vocab 128256, tied embeddings; 1.24 B parameters, 2.5 GB in bf16). Weights ~ N(0, 0.02²), norm gains 1;
the tokenizer is SmolLM2-135M's (its ids lie inside the vocabulary). Written one tensor at a time in
~1 GB shards with an index, so the peak memory is one shard.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

SHAPES = {
    "llama-3.2-1b": dict(
        hidden_size=2048,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        intermediate_size=8192,
        vocab_size=128256,
        tie_word_embeddings=True,
        rope_theta=500000.0,
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
    ),
}
SHARD_BYTES = 1 << 30


def tensors(c: dict):
    """(name, shape) of every weight of a Llama with config ``c``, in checkpoint order."""
    h, i, hd = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    yield "model.embed_tokens.weight", (c["vocab_size"], h)
    for n in range(c["num_hidden_layers"]):
        p = f"model.layers.{n}."
        yield p + "input_layernorm.weight", (h,)
        yield p + "self_attn.q_proj.weight", (q, h)
        yield p + "self_attn.k_proj.weight", (kv, h)
        yield p + "self_attn.v_proj.weight", (kv, h)
        yield p + "self_attn.o_proj.weight", (h, q)
        yield p + "post_attention_layernorm.weight", (h,)
        yield p + "mlp.gate_proj.weight", (i, h)
        yield p + "mlp.up_proj.weight", (i, h)
        yield p + "mlp.down_proj.weight", (h, i)
    yield "model.norm.weight", (h,)


def write(out: Path, shape: str = "llama-3.2-1b", seed: int = 0) -> Path:
    from actmerge.models import resolve

    c = SHAPES[shape]
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, dims in tensors(c):
        if len(dims) == 1:
            t = torch.ones(dims, dtype=torch.bfloat16)
        else:
            t = (torch.randn(dims, generator=gen) * 0.02).to(torch.bfloat16)
        if size + t.numel() * 2 > SHARD_BYTES and shards[-1]:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += t.numel() * 2
    index, total = {}, 0
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / fname), metadata={"format": "pt"})
        index |= {name: fname for name in shard}
        total += sum(t.numel() * 2 for t in shard.values())
        shard.clear()
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": index}, indent=1)
    )
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "torch_dtype": "bfloat16",
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        **c,
    }
    (out / "config.json").write_text(json.dumps(config, indent=1))
    tok = resolve("smollm2-135m", log=lambda *_: None).path
    for f in tok.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            shutil.copy(f, out / f.name)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--shape", default="llama-3.2-1b", choices=sorted(SHAPES))
    args = ap.parse_args()
    print(write(args.out, args.shape))


if __name__ == "__main__":
    main()
