"""Models beyond RAM: collection on a model dispatched by accelerate with a memory cap below its size
(layers on disk) gives the statistics and maps of in-memory collection; placement flags and errors."""

import re

import pytest
import torch
from typer.testing import CliRunner

from actmerge import pipeline
from actmerge.cli import app
from actmerge.errors import PlacementError
from actmerge.kinds.llm.collect import FitOptions, collect, fit
from actmerge.maps import MapSet
from actmerge.models import ModelSource, load_model
from actmerge.placement import Placement, from_pretrained_kwargs, input_device, parse_max_memory
from actmerge.sites import architecture_for, resolve_sites

from .common import PICO_RECIPE, make_pico, write_pico_fit_data
from .common import PICO_SENTENCES as SENTENCES

RECIPE = PICO_RECIPE.replace("{name}", "pico-offload")


def _size(path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def pico(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"offload-{request.param}")
    path = make_pico(request.param, root / "model")
    write_pico_fit_data(root)
    return root, ModelSource(request.param, path)


def _offloaded(src: ModelSource, folder):
    """A memory cap below the checkpoint's size: accelerate leaves part of the model on disk."""
    cap = int(0.9 * _size(src.path))
    return load_model(src, device="cpu", device_map="auto", max_memory={"cpu": cap}, offload_folder=folder)


def test_offloaded_collection_equals_in_memory(pico, tmp_path):
    _, src = pico
    plain, tok = load_model(src, device="cpu")
    off, _ = _offloaded(src, tmp_path / "offload")
    placed = set(off.hf_device_map.values())
    assert "disk" in placed, off.hf_device_map  # some modules really live on disk
    assert any(p.device.type == "meta" for p in off.parameters())  # not resident between forwards
    assert input_device(off) == torch.device("cpu")
    arch = architecture_for(src.config)
    sites = resolve_sites(arch, src.config, list(arch.sites), "all")
    keys = [s.key for s in sites]
    for pooling in ("mean", "last"):
        a = collect(plain, tok, SENTENCES, keys, batch_size=8, pooling=pooling, progress=False)
        b = collect(off, tok, SENTENCES, keys, batch_size=8, pooling=pooling, progress=False)
        for k in keys:
            assert a[k].shape == b[k].shape == (len(SENTENCES), a[k].shape[1])
            assert (a[k] - b[k]).abs().max() <= 1e-5, k
    for incremental in (False, True):
        m1, _ = fit(
            plain,
            tok,
            sites,
            SENTENCES[:12],
            SENTENCES[12:],
            options=FitOptions(incremental=incremental),
            progress=False,
        )
        m2, _ = fit(
            off,
            tok,
            sites,
            SENTENCES[:12],
            SENTENCES[12:],
            options=FitOptions(incremental=incremental),
            progress=False,
        )
        for k in keys:
            assert (m1[k].omega - m2[k].omega).abs().max() <= 1e-5, (incremental, k)
            assert (m1[k].beta - m2[k].beta).abs().max() <= 1e-5, (incremental, k)


def test_cli_fit_with_placement_flags(pico, tmp_path):
    root, src = pico
    recipe = root / "r.yaml"
    recipe.write_text(RECIPE.format(method="linear_act"))
    runner = CliRunner()
    plain, offl = tmp_path / "plain.safetensors", tmp_path / "off.safetensors"
    r = runner.invoke(app, ["fit", str(src.path), "-r", str(recipe), "-o", str(plain), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    cap = str(int(0.9 * _size(src.path)))
    args = ["fit", str(src.path), "-r", str(recipe), "-o", str(offl), "--device", "cpu"]
    args += ["--device-map", "auto", "--max-memory", f"cpu={cap}", "--offload-folder", str(tmp_path / "off")]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    a, b = MapSet.load(plain), MapSet.load(offl)
    assert a.maps.keys() == b.maps.keys()
    for k in a.maps:
        assert (a.maps[k].omega - b.maps[k].omega).abs().max() <= 1e-5
        assert (a.maps[k].beta - b.maps[k].beta).abs().max() <= 1e-5
    # bake accepts the flags too (the maps are fitted on the offloaded model, the plan printed)
    args = [
        "bake",
        str(src.path),
        "-r",
        str(recipe),
        "--dry-run",
        "--device",
        "cpu",
        "--max-memory",
        f"cpu={cap}",
    ]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "fold plan" in r.output


@pytest.mark.parametrize(
    "flag, value, needle",
    [
        ("--max-memory", "cpu:2GiB", "DEVICE=SIZE"),
        ("--max-memory", "cpu=lots", "not a size"),
        ("--max-memory", "gpu=2GiB", "unknown device"),
        ("--device", "tpu9", "not a torch device"),
    ],
)
def test_cli_rejects_bad_placement(pico, tmp_path, flag, value, needle):
    root, src = pico
    (root / "r.yaml").write_text(RECIPE.format(method="linear_act"))
    args = [
        "fit",
        str(src.path),
        "-r",
        str(root / "r.yaml"),
        "-o",
        str(tmp_path / "m.safetensors"),
        flag,
        value,
    ]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 2, r.output
    assert needle in re.sub(r"[\s│]+", " ", r.output)  # rich wraps long messages in a box


def test_parse_max_memory():
    assert parse_max_memory("cpu=2GiB") == {"cpu": 2 * 2**30}
    assert parse_max_memory("0=20GiB, cpu=30GiB") == {0: 20 * 2**30, "cpu": 30 * 2**30}
    assert parse_max_memory("cuda:1=1MiB,disk=5GB") == {1: 2**20, "disk": 5 * 10**9}
    assert parse_max_memory({"cpu": 1000}) == {"cpu": 1000}
    assert parse_max_memory(None) is None and parse_max_memory("") is None
    for bad in ("cpu", "cpu=", "=1GiB", "cpu=1GiB,cpu=2GiB", "cpu=-1GiB", "cpu=0"):
        with pytest.raises(PlacementError, match="--max-memory"):
            parse_max_memory(bad)


def test_placement_kwargs():
    assert from_pretrained_kwargs("cpu") == {}
    kw = from_pretrained_kwargs("cpu", max_memory="cpu=1GiB", offload_folder="/tmp/x")
    assert kw == {"device_map": "auto", "max_memory": {"cpu": 2**30}, "offload_folder": "/tmp/x"}
    with pytest.raises(PlacementError, match="device-map"):
        from_pretrained_kwargs("cpu", device_map="everywhere")
    with pytest.raises(PlacementError, match="--device is cpu"):
        from_pretrained_kwargs("cpu", max_memory="0=1GiB,cpu=1GiB")
    with pytest.raises(PlacementError, match="no GPU a budget"):
        from_pretrained_kwargs("cuda", max_memory="cpu=1GiB")


def test_lineas_refuses_disk_offload(pico, tmp_path):
    root, src = pico
    (root / "lineas.yaml").write_text(RECIPE.format(method="lineas"))
    cap = int(0.9 * _size(src.path))
    with pytest.raises(PlacementError, match="LinEAS"):
        pipeline.fit(
            str(src.path),
            root / "lineas.yaml",
            placement=Placement("cpu", max_memory={"cpu": cap}, offload_folder=tmp_path),
            progress=False,
            log=lambda _: None,
        )
