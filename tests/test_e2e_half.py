"""bf16 / fp16 sources end to end (issue 27 item 4). Released checkpoints are bf16 or fp16; the built-in
models' cached snapshots are float32, so each test bakes a half-precision copy of one:

- the output keeps the source dtype (every tensor, added biases included), and each folded tensor is
  the float32 fold cast once to that dtype (recomputed here from the maps, independently of fold.py);
- `actmerge verify` passes within the dtype's tolerance (actmerge/tolerance.py, which records these
  measurements) with top-1 agreement ≥ 99 % over the prompts and their greedy continuations.

The real-model tests are slow (run in CI): detox-act (Linear-AcT, seconds to fit) on both built-in
models, in bf16 and fp16."""

import json
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from actmerge.cli import app
from actmerge.maps import MapSet
from actmerge.models import resolve
from actmerge.tolerance import LOGITS

from .common import make_pico, random_maps

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "detox-act.yaml"
DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16}
CONFIG_DTYPE = {torch.bfloat16: "bfloat16", torch.float16: "float16"}


def half_copy(src: Path, dtype: torch.dtype, dest: Path) -> Path:
    """A copy of the model directory ``src`` with every floating tensor cast to ``dtype`` and the config
    saying so (``dtype`` / ``torch_dtype``); tokenizer and other files copied, actmerge's cache files
    (``SOURCE``, dot files) left out."""
    dest.mkdir(parents=True)
    for f in sorted(src.iterdir()):
        if f.suffix == ".safetensors":
            tensors = load_file(f)
            cast = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
            save_file(cast, str(dest / f.name), metadata={"format": "pt"})
        elif f.name == "config.json":
            config = json.loads(f.read_text())
            config["dtype"] = config["torch_dtype"] = CONFIG_DTYPE[dtype]
            (dest / f.name).write_text(json.dumps(config, indent=2))
        elif f.is_file() and f.name != "SOURCE" and not f.name.startswith("."):
            shutil.copy(f, dest / f.name)
    return dest


def _bake(src: Path, out: Path, *args: str) -> None:
    r = CliRunner().invoke(app, ["bake", str(src), *args, "-o", str(out)])
    assert r.exit_code == 0, r.output


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(f, "pt") as g:
            out.update({k: g.get_tensor(k) for k in g.keys()})
    return out


def test_pico_bf16_bake_keeps_dtype_and_adds_biases_in_it(tmp_path):
    """Fast: a bf16 pico Llama baked with shifts at attn_ctx (a new o_proj bias, attention_bias flag):
    every output tensor is bf16, the new biases too, and they are the float32 ``W c`` cast once."""
    src = make_pico("llama", tmp_path / "src", seed=5, dtype=torch.bfloat16)
    config = json.loads((src / "config.json").read_text())
    maps = random_maps(config, ["attn_ctx"], seed=5)
    maps.save(tmp_path / "maps.safetensors")
    _bake(src, tmp_path / "out", "--maps", str(tmp_path / "maps.safetensors"), "--strength", "1.0")
    before, after = _tensors(src), _tensors(tmp_path / "out")
    added = sorted(set(after) - set(before))
    # attention_bias gives q/k/v a bias too (zeros): all of them in the source dtype
    assert {k.rsplit(".", 2)[-2] for k in added} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert {t.dtype for t in after.values()} == {torch.bfloat16}
    assert all(not after[k].any() for k in added if not k.endswith("o_proj.bias"))
    for key, m in maps.maps.items():
        module = key.split(":")[0]
        w = before[f"{module}.weight"].float()
        assert torch.equal(after[f"{module}.weight"], (w * m.omega[None, :]).to(torch.bfloat16))
        assert torch.equal(after[f"{module}.bias"], torch.mv(w, m.beta).to(torch.bfloat16))


def expected_fold(key: str, omega: torch.Tensor, w0: torch.Tensor) -> tuple[str, torch.Tensor]:
    """The tensor a scale-only detox-act map at strength 1 folds into, computed in float32 and cast
    once: an input scale of a linear (Llama's o_proj columns), or an output scale of a Gemma (1 + w)
    norm. (Written from the fold's formulas, not by calling fold.py.)"""
    module, side = key.split(":")
    w = w0.float()
    if side == "input":  # W·diag(s)
        return f"{module}.weight", (w * omega[None, :]).to(w0.dtype)
    assert module.endswith("layernorm"), key  # Gemma: x̂·(1 + w) → s·(1 + w) = 1 + w'
    return f"{module}.weight", torch.where(omega == 1, w, omega * (1.0 + w) - 1.0).to(w0.dtype)


@pytest.fixture(scope="module")
def copies(tmp_path_factory):
    return tmp_path_factory.mktemp("half")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("model", "dtype"),
    [("smollm2-135m", "BF16"), ("gemma-3-270m", "BF16"), ("smollm2-135m", "F16"), ("gemma-3-270m", "F16")],
)
def test_half_precision_bake_keeps_dtype_and_verifies(model, dtype, copies):
    src = half_copy(resolve(model).path, DTYPES[dtype], copies / f"{model}-{dtype}")
    out = copies / f"{model}-{dtype}-detox"
    t0 = time.perf_counter()
    _bake(src, out, "--recipe", str(RECIPE))
    bake_s = time.perf_counter() - t0

    # the source dtype kept, tensor by tensor; the folded ones are the float32 fold cast once
    before, after = _tensors(src), _tensors(out)
    assert after.keys() == before.keys()  # scale-only: nothing added
    assert all(
        after[k].dtype == before[k].dtype == DTYPES[dtype] for k in after if after[k].is_floating_point()
    )
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == CONFIG_DTYPE[DTYPES[dtype]]
    maps = MapSet.load(out / "actmerge" / "maps.safetensors")
    assert json.loads((out / "actmerge" / "bake.json").read_text())["strength"] == 1.0
    folded = set()
    for key, m in maps.maps.items():
        assert not m.beta.any(), key  # scale-only recipe
        name, want = expected_fold(key, m.omega, before[key.split(":")[0] + ".weight"])
        assert torch.equal(after[name], want), name
        folded.add(name)
    assert folded and all(torch.equal(after[k], before[k]) for k in after.keys() - folded)

    # verify: fresh process, the dtype's tolerance, prompts and their greedy continuations
    t0 = time.perf_counter()
    r = CliRunner().invoke(app, ["verify", str(out), "--json"])
    verify_s = time.perf_counter() - t0
    assert r.exit_code == 0, r.output
    rep = json.loads((out / "actmerge" / "verify.json").read_text())
    print(
        f"\n{model} {dtype}: max |Δlogit| {rep['max_abs_logit_diff']:.4g} (logits reach "
        f"{rep['max_abs_logit']:.3g}; tolerance {rep['tolerance']}); top-1 {rep['argmax_agreement']:.2%} "
        f"over {rep['n_positions']} positions; greedy {rep['greedy_agreement']:.2%}; bake {bake_s:.0f}s, "
        f"verify {verify_s:.0f}s"
    )
    assert rep["passed"] and rep["tolerance"] == LOGITS[dtype]
    assert 0 < rep["max_abs_logit_diff"] <= LOGITS[dtype]  # > 0: the rounding is really there
    assert rep["n_positions"] >= 150  # 6 prompts and 16 greedy tokens each
    assert rep["argmax_agreement"] >= 0.99 and rep["greedy_agreement"] >= 0.99
