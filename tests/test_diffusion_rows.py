"""Every row of the diffusion site table, every site it declares: the component baked at λ = 1 and
reloaded with from_pretrained ≡ the hooked base component, on random inputs. And the refusals."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from actmerge import pipeline
from actmerge.errors import NotFoldableError, RecipeError, UnknownArchitectureError
from actmerge.kinds.diffusers import resolve_pipeline
from actmerge.kinds.diffusers.collect import fit_pipeline
from actmerge.kinds.diffusers.hooks import steer
from actmerge.kinds.diffusers.plan import shift_home
from actmerge.kinds.diffusers.recipe import DiffusionRecipe, load_diffusion_recipe
from actmerge.kinds.diffusers.sites import resolve
from actmerge.kinds.diffusers.table import COMPONENTS
from actmerge.kinds.diffusers.verify import moved_shifts
from actmerge.maps import AffineMap, MapSet

from .diffusion_common import (
    REL_TOL,
    clip_text_encoder,
    random_maps,
    randomize,
    rel_err,
    save_component,
    t5_encoder,
    tiny_pixart,
    tiny_unet,
    tiny_vae,
)

B, T = 2, 7


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_sd3():
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=32,
        caption_projection_dim=16,
        pooled_projection_dim=32,
        out_channels=4,
        pos_embed_max_size=16,
    )


def tiny_flux():
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=(4, 6, 6),
    )


def _ids(g):
    return torch.randint(3, 60, (B, T), generator=g)


def _run_clip(c, g):
    out = c["text_encoder_2"](_ids(g), output_hidden_states=True)
    return [out.last_hidden_state, out.text_embeds, *out.hidden_states]


def _run_unet(c, g):
    x, e = torch.randn(B, 4, 8, 8, generator=g), torch.randn(B, T, 32, generator=g)
    return [c["unet"](x, torch.tensor([999, 500]), e).sample]


def _run_pixart(c, g):
    x, e = torch.randn(B, 4, 8, 8, generator=g), torch.randn(B, T, 32, generator=g)
    cond = {"resolution": None, "aspect_ratio": None}
    return [
        c["transformer"](
            x, encoder_hidden_states=e, timestep=torch.tensor([999, 500]), added_cond_kwargs=cond
        ).sample
    ]


def _run_sd3(c, g):
    x, e, p = (
        torch.randn(B, 4, 8, 8, generator=g),
        torch.randn(B, T, 32, generator=g),
        torch.randn(B, 32, generator=g),
    )
    return [
        c["transformer"](
            x, encoder_hidden_states=e, pooled_projections=p, timestep=torch.tensor([999, 500])
        ).sample
    ]


def _run_flux_t5(c, g):
    e = c["text_encoder_2"](_ids(g)).last_hidden_state
    x, p = torch.randn(B, 16, 4, generator=g), torch.randn(B, 32, generator=g)
    img_ids = torch.stack(
        torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij"), -1
    )
    out = c["transformer"](
        x, encoder_hidden_states=e, pooled_projections=p, timestep=torch.tensor([1.0, 0.5]),
        img_ids=img_ids.reshape(-1, 3), txt_ids=torch.zeros(T, 3),
    ).sample  # fmt: skip
    return [e, out]


# row name → (pipeline class, {component: builder}, forward)
CASES = {
    "clip": (
        "StableDiffusionXLPipeline",
        {"text_encoder_2": lambda: clip_text_encoder(64, projection=True)},
        _run_clip,
    ),
    "unet": ("StableDiffusionPipeline", {"unet": tiny_unet}, _run_unet),
    "pixart": ("PixArtAlphaPipeline", {"transformer": tiny_pixart}, _run_pixart),
    "sd3": ("StableDiffusion3Pipeline", {"transformer": tiny_sd3}, _run_sd3),
    "flux": (
        "FluxPipeline",
        {"text_encoder_2": lambda: t5_encoder(64), "transformer": tiny_flux},
        _run_flux_t5,
    ),
}


def _build(root, pipeline_class, builders):
    index = {"_class_name": pipeline_class, "_diffusers_version": "0.42.1"}
    models = {}
    for i, (name, build) in enumerate(builders.items()):
        torch.manual_seed(i)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            models[name] = randomize(build(), seed=i)
        save_component(root, pipeline_class, name, models[name])
        index.update(json.loads((root / "model_index.json").read_text()))
    (root / "model_index.json").write_text(json.dumps(index, indent=2))
    return models


def _load(path, model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return type(model).from_pretrained(path).eval()


def test_every_row_is_tested():
    covered = {"clip", "unet", "pixart", "sd3", "flux", "t5"}  # t5: with flux (its route) and pixart
    assert covered == {c.name for c in COMPONENTS}


@pytest.mark.parametrize("row", list(CASES))
def test_every_site_baked_equals_hooked(row, tmp_path):
    pipeline_class, builders, forward = CASES[row]
    models = _build(tmp_path / "pipe", pipeline_class, builders)
    source = resolve_pipeline(tmp_path / "pipe")
    maps = {}
    for comp in models:
        arch = next(c for c in COMPONENTS if type(models[comp]).__name__ in c.classes)
        for name in arch.sites:
            for site in resolve(source, f"{comp}/{name}", None):
                shifts = bool(shift_home(source, site)[0])  # T5's inner sites have no bias: scale only
                maps.update(random_maps(source, [site], seed=len(maps), shifts=shifts).maps)
    mapset = MapSet(maps)
    (res,) = pipeline.bake(
        source,
        maps=mapset,
        options=pipeline.BakeOptions(strengths=[1.0], out=tmp_path / "out"),
        log=lambda *_: None,
        progress=False,
    )
    assert all(sp.exactness == "exact" for sp in res.plan.sites)
    baked = {c: _load(tmp_path / "out" / c, m) for c, m in models.items()}
    # a T5 shift folded into the DiT is absent from the baked T5's output: text outputs are compared
    # with it left out of the hooks, the denoiser output (last) with everything hooked
    moved = moved_shifts(source, mapset)
    inside = MapSet({k: (m.scale_only() if k in moved else m) for k, m in maps.items()})
    with torch.no_grad():
        plain = forward(models, torch.Generator().manual_seed(0))
        with steer(models, mapset, 1.0):
            ref = forward(models, torch.Generator().manual_seed(0))
        with steer(models, inside, 1.0):
            ref[:-1] = forward(models, torch.Generator().manual_seed(0))[:-1]
        got = forward(baked, torch.Generator().manual_seed(0))
    errs = [rel_err(a, b) for a, b in zip(ref, got, strict=True)]
    diff = max(float((a - b).abs().max()) for a, b in zip(ref, got, strict=True))
    print(row, f"{len(maps)} maps ({len(moved)} moved shifts): max rel {max(errs):.2e}, max abs {diff:.2e}")
    assert max(errs) <= REL_TOL, errs
    assert rel_err(ref[-1], plain[-1]) > 1e-2  # the maps change the denoiser output
    assert (row == "flux") == bool(moved)


def test_flux_block_output_is_refused(tmp_path):
    _build(tmp_path / "pipe", "FluxPipeline", {"transformer": tiny_flux})
    source = resolve_pipeline(tmp_path / "pipe")
    with pytest.raises(NotFoldableError, match="residual stream"):
        resolve(source, "dit_block_out", "all")


def test_sd3_t5_shift_is_refused_with_the_reason(tmp_path):
    _build(
        tmp_path / "pipe",
        "StableDiffusion3Pipeline",
        {"text_encoder_3": lambda: t5_encoder(64), "transformer": tiny_sd3},
    )
    source = resolve_pipeline(tmp_path / "pipe")
    site = resolve(source, "text_encoder_3/text_final", None)
    with pytest.raises(NotFoldableError, match="concatenates the CLIP and T5"):
        pipeline.bake(
            source,
            maps=random_maps(source, site),
            options=pipeline.BakeOptions(dry_run=True),
            log=lambda *_: None,
            progress=False,
        )
    # scale-only maps there fold (into the RMSNorm gain)
    (res,) = pipeline.bake(
        source,
        maps=random_maps(source, site, shifts=False),
        options=pipeline.BakeOptions(dry_run=True),
        log=lambda *_: None,
    )
    assert res.plan.sites[0].scale_into == ["encoder.final_layer_norm.weight"]


def test_per_pixel_and_spatial_mean_maps_are_refused(tmp_path):
    _build(tmp_path / "pipe", "StableDiffusionPipeline", {"unet": tiny_unet})
    source = resolve_pipeline(tmp_path / "pipe")
    (site,) = resolve(source, "unet_resnet_norm1", "0")
    per_pixel = MapSet({site.key: AffineMap(torch.full((8 * 8 * 8,), 1.1), torch.zeros(8 * 8 * 8))})
    with pytest.raises(NotFoldableError, match="per-pixel map"):
        pipeline.bake(
            source,
            maps=per_pixel,
            options=pipeline.BakeOptions(dry_run=True),
            log=lambda *_: None,
            progress=False,
        )
    (tmp_path / "s.txt").write_text("a\nb\n")
    for mode in ("per_pixel", "spatial_mean"):
        r = DiffusionRecipe(
            name="x",
            sites=["unet_resnet_norm1"],
            source="s.txt",
            target="s.txt",
            diffusion={"feature_maps": mode},
        )
        with pytest.raises(NotFoldableError, match="cannot be baked"):
            fit_pipeline(source, r)


def test_unknown_component_class_is_refused(tmp_path):
    _build(tmp_path / "pipe", "StableDiffusionPipeline", {"vae": tiny_vae})
    source = resolve_pipeline(tmp_path / "pipe")
    maps = MapSet({"vae/encoder.conv_norm_out:output": AffineMap(torch.ones(16) * 2, torch.zeros(16))})
    with pytest.raises(UnknownArchitectureError, match="AutoencoderKL, which has no row"):
        pipeline.bake(
            source, maps=maps, options=pipeline.BakeOptions(dry_run=True), log=lambda *_: None, progress=False
        )


def test_recipe_refuses_lineas_and_unknown_keys(tmp_path):
    (tmp_path / "s.txt").write_text("a\nb\n")
    base = "name: x\nsites: [text_attn_in]\nsource: s.txt\ntarget: s.txt\n"
    (tmp_path / "a.yaml").write_text(base + "method: lineas\n")
    with pytest.raises(RecipeError, match="lineas is not available"):
        load_diffusion_recipe(tmp_path / "a.yaml")
    (tmp_path / "b.yaml").write_text(base + "diffusion:\n  stepz: 3\n")
    with pytest.raises(RecipeError, match="stepz"):
        load_diffusion_recipe(tmp_path / "b.yaml")
