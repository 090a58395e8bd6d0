"""Diffusers pipelines end to end on tiny random pipelines: bake → reload with plain diffusers in a
fresh process → the same text-encoder and denoiser outputs as the hooked base; the collection
protocol; the CLI."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from typer.testing import CliRunner

from actmerge import pipeline
from actmerge.cli import app
from actmerge.errors import NotFoldableError
from actmerge.kinds.diffusers import probe, resolve_pipeline, verify_pipeline
from actmerge.kinds.diffusers.collect import collect, denoiser_name, load_pipeline
from actmerge.kinds.diffusers.hooks import steer
from actmerge.kinds.diffusers.recipe import DiffusionRecipe
from actmerge.kinds.diffusers.sites import resolve
from actmerge.kinds.diffusers.verify import PROMPTS, text_components

from .diffusion_common import REL_TOL, make_pixart, make_sd, random_maps, rel_err

runner = CliRunner()

SD_SITES = [
    "text_attn_in",  # CLIP LayerNorm
    "text_mlp_hidden",  # CLIP fc2 input (linear_in)
    "text_attn_out",  # CLIP out_proj output (linear_out)
    "text_final",  # the prompt embedding
    "unet_attn_in",  # UNet LayerNorm
    "unet_cross_ctx",  # attn2.to_out.0 input
    "unet_ff_out",  # ff.net.2 output
    "unet_resnet_norm1",  # GroupNorm on [B, C, H, W], per channel
    "unet_resnet_norm2",
    "unet_proj_norm",
]
PIXART_SITES = ["dit_attn_in", "dit_cross_in", "dit_ff_in", "dit_attn_ctx", "dit_ff_out", "dit_text_in"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run ~100× faster on one thread when the cores are shared (subprocesses too)."""
    threads, env = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    yield
    torch.set_num_threads(threads)
    if env is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = env


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = make_sd(tmp_path_factory.mktemp("sd") / "pipe")
    source = resolve_pipeline(path)
    return source, load_pipeline(source)


@pytest.fixture(scope="module")
def pixart(tmp_path_factory):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = make_pixart(tmp_path_factory.mktemp("pixart") / "pipe")
    source = resolve_pipeline(path)
    return source, load_pipeline(source)


def _sites(source, names):
    return [s for n in names for s in resolve(source, n, None)]


def _probe_args(source):
    return dict(texts=text_components(source), denoiser=denoiser_name(source), steps=2, seed=0)


def _changes_outputs(source, pipe, maps):
    """The maps must move every compared output, or equivalence proves nothing."""
    base = probe.probe(pipe, PROMPTS, **_probe_args(source))
    with steer(pipe.components, maps, 1.0):
        steered = probe.probe(pipe, PROMPTS, **_probe_args(source))
    return {k: max(rel_err(a, b) for a, b in zip(base[k], steered[k], strict=True)) for k in base}


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_sd_baked_equals_hooked(sd, tmp_path):
    source, pipe = sd
    sites = _sites(source, SD_SITES)
    assert {s.name for s in sites} == set(SD_SITES)
    maps = random_maps(source, sites, seed=1)
    (res,) = pipeline.bake(
        source,
        maps=maps,
        options=pipeline.BakeOptions(strengths=[1.0], out=tmp_path / "out"),
        log=lambda *_: None,
        progress=False,
    )
    assert all(sp.exactness == "exact" for sp in res.plan.sites)
    report = verify_pipeline(res.out, base=source, pipe=pipe)
    print("SD", {k: (f"{g.max_abs:.2e}", f"{g.max_rel:.2e}") for k, g in report.groups.items()})
    assert report.passed and report.max_rel <= REL_TOL, report.to_json()
    assert set(report.groups) == {"text:text_encoder", "denoiser", "latents"}
    moved = _changes_outputs(source, pipe, maps)
    assert min(moved.values()) > 1e-2, moved
    # untouched components and every non-weight file byte-identical; edited ones keep names and dtypes
    src, out = _files(source.path), _files(res.out)
    for rel, data in src.items():
        if rel.split("/")[0] in ("text_encoder", "unet") and rel.endswith(".safetensors"):
            assert out[rel] != data and len(out[rel]) == len(data), rel
        else:
            assert out[rel] == data, rel
    assert set(out) - set(src) == {
        "README.md",
        "actmerge/maps.safetensors",
        "actmerge/bake.json",
        "actmerge/verify.json",
    }


def test_lambda_zero_is_bit_identical(sd, tmp_path):
    source, _ = sd
    maps = random_maps(source, _sites(source, SD_SITES), seed=2)
    (res,) = pipeline.bake(
        source,
        maps=maps,
        options=pipeline.BakeOptions(strengths=[0.0], out=tmp_path / "zero"),
        log=lambda *_: None,
        progress=False,
    )
    assert all(sp.exactness == "identity" for sp in res.plan.sites)
    src, out = _files(source.path), _files(res.out)
    assert all(out[rel] == data for rel, data in src.items())


def test_pixart_t5_shift_folds_into_caption_projection(pixart, tmp_path):
    source, pipe = pixart
    t5_final = resolve(source, "text_final", None)
    t5_inner = resolve(source, "text_attn_in", None) + resolve(source, "text_mlp_hidden", None)
    dit = _sites(source, PIXART_SITES)
    maps = random_maps(source, dit + t5_final, seed=3)  # dit_text_in first: ops compose in forward order
    maps.maps.update(random_maps(source, t5_inner, seed=4, shifts=False).maps)  # T5 has no biases
    (res,) = pipeline.bake(
        source,
        maps=maps,
        options=pipeline.BakeOptions(strengths=[1.0], out=tmp_path / "out"),
        log=lambda *_: None,
        progress=False,
    )
    final_row = next(sp for sp in res.plan.sites if sp.site.name == "text_final")
    assert final_row.shift_into == ["transformer/caption_projection.linear_1.bias"]
    report = verify_pipeline(res.out, base=source, pipe=pipe, fresh=False)  # SD and the CLI test fresh=True
    print("PixArt", {k: (f"{g.max_abs:.2e}", f"{g.max_rel:.2e}") for k, g in report.groups.items()})
    assert report.passed and report.max_rel <= REL_TOL, report.to_json()
    assert report.moved_shifts == [t5_final[0].key]
    moved = _changes_outputs(source, pipe, maps)
    assert min(moved.values()) > 1e-2, moved
    for rel, data in _files(source.path).items():
        if rel.startswith(("vae/", "scheduler/", "tokenizer/")):
            assert (res.out / rel).read_bytes() == data, rel


def test_t5_shift_without_bias_is_refused(pixart, tmp_path):
    source, _ = pixart
    maps = random_maps(source, resolve(source, "text_attn_in", None), seed=5)
    with pytest.raises(NotFoldableError, match="no bias"):
        pipeline.bake(
            source,
            maps=maps,
            options=pipeline.BakeOptions(strengths=[1.0], out=tmp_path / "out"),
            log=lambda *_: None,
            progress=False,
        )
    assert not (tmp_path / "out").exists()
    (res,) = pipeline.bake(
        source,
        maps=maps,
        options=pipeline.BakeOptions(strengths=[1.0], dry_run=True, shift_policy="drop"),
        log=lambda *_: None,
    )
    assert {sp.exactness for sp in res.plan.sites} == {"scale only (shift dropped)"}


def _recipe(tmp_path, sites, **diffusion) -> DiffusionRecipe:
    (tmp_path / "src.txt").write_text("\n".join(f"a red house number {i}" for i in range(6)))
    (tmp_path / "tgt.txt").write_text("\n".join(f"a red house number {i}, watercolor" for i in range(6)))
    r = DiffusionRecipe(
        name="t",
        sites=sites,
        source="src.txt",
        target="tgt.txt",
        batch_size=3,
        min_sentences=2,
        diffusion=diffusion,
    )
    r._base_dir = tmp_path
    return r


def test_collection_keeps_the_conditional_half_of_the_first_step(sd, tmp_path):
    """With guidance the denoiser sees [uncond; cond]; the kept half equals a run without guidance."""
    source, pipe = sd
    sites = _sites(source, ["text_mlp_in", "unet_resnet_norm2", "unet_cross_in"])
    prompts = [f"a blue boat {i}" for i in range(5)]
    calls = []
    h = pipe.unet.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    try:
        cfg = collect(
            pipe, source, sites, prompts, _recipe(tmp_path, [], guidance_scale=7.5, pixel_samples=8)
        )
        plain = collect(
            pipe, source, sites, prompts, _recipe(tmp_path, [], guidance_scale=1.0, pixel_samples=8)
        )
    finally:
        h.remove()
    assert calls == [6, 4, 3, 2]  # one denoiser call per batch (first step only), doubled with guidance
    for s in sites:
        n = len(prompts) * (1 if s.arch.role == "text_encoder" else 8)
        assert cfg[s.key].shape[0] == n
        torch.testing.assert_close(cfg[s.key], plain[s.key], rtol=1e-5, atol=1e-5)


CLI_RECIPE = """
name: cli-test
method: linear_act
sites:
  - site: [text_attn_in, text_final]
  - site: [unet_cross_in, unet_resnet_norm2]
    layers: "0-1"
source: src.txt
target: tgt.txt
batch_size: 4
min_sentences: 8
diffusion:
  steps: 10
  pixel_samples: 16
"""


def test_cli_bake_verify_sites(sd, tmp_path):
    source, _ = sd
    (tmp_path / "src.txt").write_text("\n".join(f"a cat on a mat {i}" for i in range(8)))
    (tmp_path / "tgt.txt").write_text("\n".join(f"a cat on a mat {i}, watercolor" for i in range(8)))
    (tmp_path / "r.yaml").write_text(CLI_RECIPE)
    out = tmp_path / "out"
    r = runner.invoke(app, ["bake", str(source.path), "--recipe", str(tmp_path / "r.yaml"), "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert "fold plan at λ" in r.output and (out / "actmerge" / "recipe.yaml").is_file()
    card = (out / "README.md").read_text()
    assert "library_name: diffusers" in card and "cli-test" in card
    r = runner.invoke(app, ["verify", str(out)])
    assert r.exit_code == 0, r.output
    assert "PASS" in r.output
    r = runner.invoke(app, ["bake", str(source.path), "--recipe", str(tmp_path / "r.yaml"), "-o", str(out)])
    assert r.exit_code == 2 and "already exists" in r.output
    r = runner.invoke(app, ["sites", str(source.path)])
    assert r.exit_code == 0 and "StableDiffusionPipeline" in r.output
    maps = tmp_path / "maps.safetensors"
    r = runner.invoke(app, ["fit", str(source.path), "--recipe", str(tmp_path / "r.yaml"), "-o", str(maps)])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["bake", str(source.path), "--maps", str(maps), "-s", "0.5,1", "--dry-run"])
    assert r.exit_code == 0 and r.output.count("fold plan at λ") == 2, r.output
    r = runner.invoke(app, ["bake", str(source.path), "--maps", str(maps), "--target", "vllm", "--dry-run"])
    assert r.exit_code == 2 and "--target" in r.output


@pytest.mark.parametrize("recipe", ["diffusion-watercolor.yaml", "diffusion-no-elephant.yaml"])
def test_shipped_recipes_fit_and_plan(sd, recipe):
    source, _ = sd
    r = runner.invoke(app, ["bake", str(source.path), "--recipe", recipe, "--dry-run"])  # built-in
    assert r.exit_code == 0, r.output
    assert "exact" in r.output


def test_top_neurons_on_the_pipeline_fit(sd):
    """The diffusers fit sparsifies with the same ``top_neurons`` as the LLM fit: half of each site's
    channels keep the dense fit's values (the largest moves), the rest are identity."""
    from actmerge.kinds.diffusers.collect import fit_pipeline
    from actmerge.kinds.diffusers.recipe import load_diffusion_recipe

    source, pipe = sd
    dense = load_diffusion_recipe("diffusion-watercolor.yaml")
    top = dense.model_copy(update={"top_neurons": 0.5})
    quiet = lambda *_: None  # noqa: E731
    a = fit_pipeline(source, dense, pipe=pipe, log=quiet).maps
    b = fit_pipeline(source, top, pipe=pipe, log=quiet).maps
    sparsified = 0
    for k, d in a.maps.items():
        m = b.maps[k]
        moved, dense_moved = (m.omega != 1) | (m.beta != 0), (d.omega != 1) | (d.beta != 0)
        assert int(moved.sum()) == min(round(0.5 * d.dim), int(dense_moved.sum())), k
        sparsified += int(moved.sum()) < int(dense_moved.sum())
        assert torch.equal(m.omega[moved], d.omega[moved]) and torch.equal(m.beta[moved], d.beta[moved])
    assert sparsified, "no site was sparsified: the test proves nothing"
