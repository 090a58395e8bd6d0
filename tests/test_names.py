"""Short model names (``gemma-2-2b`` → ``google/gemma-2-2b``), resolved offline from a Hugging Face
cache laid out as the Hub writes it; unknown names get suggestions; gated downloads get a licence
+ login message (mocked Hub answers)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import httpx2
import huggingface_hub
import pytest
from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError
from safetensors.torch import load_file
from typer.testing import CliRunner

from actmerge import models, names
from actmerge.cli import app
from actmerge.errors import GatedModelError, ModelResolutionError

from .common import make_pico

runner = CliRunner()
REV = "0123456789abcdef0123456789abcdef01234567"


def fake_hub_cache(cache: Path, repo_id: str, model_dir: Path) -> Path:
    """``model_dir`` as the Hub cache holds a download of ``repo_id``: blobs, a snapshot of
    relative symlinks, refs/main."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snap = repo / "snapshots" / REV
    snap.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for f in sorted(model_dir.iterdir()):
        blob = repo / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copyfile(f, blob)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REV)
    return snap


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Pico models run fastest on one thread (on a loaded machine several threads contend)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def gemma2_cache(tmp_path_factory):
    """A pico Gemma-2 with 18 layers (the shipped detox recipe names layers 9-17 and 6-11) cached as
    google/gemma-2-2b."""
    root = tmp_path_factory.mktemp("hub")
    model = make_pico("gemma2", root / "pico-gemma2", layers=18)
    return fake_hub_cache(root / "cache", "google/gemma-2-2b", model).parents[2], model


@pytest.fixture
def offline_cache(gemma2_cache, monkeypatch):
    cache, _ = gemma2_cache
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))  # for fresh processes (verify)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the fresh verify process: see one_thread
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


def test_table_is_well_formed():
    assert names.lookup("gemma-2-2b") == "google/gemma-2-2b"
    assert names.lookup("Gemma-2-9B-IT") == "google/gemma-2-9b-it"  # case-insensitive
    assert names.lookup("llama-3.2-1b-instruct") == "meta-llama/Llama-3.2-1B-Instruct"
    assert names.lookup("mistral-7b-instruct") == "mistralai/Mistral-7B-Instruct-v0.3"
    assert names.lookup("qwen2.5-0.5b-instruct") == "Qwen/Qwen2.5-0.5B-Instruct"
    assert names.lookup("qwen3-0.6b-base") == "Qwen/Qwen3-0.6B-Base"
    assert names.lookup("phi-3-mini") == "microsoft/Phi-3-mini-4k-instruct"
    assert names.lookup("gpt2") == "openai-community/gpt2"
    assert names.lookup("gemma-2-2b-typo") is None
    for short, repo in names.SHORT_NAMES.items():
        assert short == short.lower() and "/" not in short
        org, name = repo.split("/")
        assert org and name and repo.count("/") == 1
    # every family of the site table has base and instruct names
    for family in (
        "gemma-2",
        "gemma-3",
        "llama-3",
        "mistral-7b",
        "qwen2-",
        "qwen2.5",
        "qwen3",
        "phi-3",
        "gpt2",
    ):
        assert any(k.startswith(family) for k in names.SHORT_NAMES), family
    # the built-in offline model stays first: its name is not in the Hub table
    assert not set(names.SHORT_NAMES) & set(models.BUILTIN)


def test_short_name_resolves_from_the_hub_cache(offline_cache, gemma2_cache):
    logged = []
    src = models.resolve("gemma-2-2b", log=logged.append)
    assert src.name == "google/gemma-2-2b"
    assert src.path.parent.name == "snapshots" and src.path.name == REV
    assert src.config["model_type"] == "gemma2" and src.config["num_hidden_layers"] == 18
    assert logged == ["[actmerge] gemma-2-2b → google/gemma-2-2b"]
    # the explicit id is unchanged (no log), and resolves to the same snapshot
    logged.clear()
    assert models.resolve("google/gemma-2-2b", log=logged.append).path == src.path and not logged
    # a local directory is unchanged, even one named like a short name
    _, model = gemma2_cache
    assert models.resolve(str(model)).path == model.resolve()


def test_local_directory_named_like_a_short_name_wins(gemma2_cache, tmp_path, monkeypatch):
    _, model = gemma2_cache
    monkeypatch.chdir(tmp_path)
    shutil.copytree(model, tmp_path / "gemma-2-2b")
    src = models.resolve("gemma-2-2b", log=lambda m: pytest.fail(f"no short name expected: {m}"))
    assert src.path == (tmp_path / "gemma-2-2b").resolve()


def test_unknown_short_name_suggests_close_matches():
    with pytest.raises(ModelResolutionError) as exc:
        models.resolve("gema-2-2b")
    msg = str(exc.value)
    assert "Did you mean" in msg and "gemma-2-2b" in msg and "org/name" in msg
    with pytest.raises(ModelResolutionError) as exc:
        models.resolve("gemma-3-207m")  # the built-in alias is a candidate too
    assert "gemma-3-270m" in str(exc.value)
    with pytest.raises(ModelResolutionError) as exc:
        models.resolve("zzzzzz")
    assert "Did you mean" not in str(exc.value)
    r = runner.invoke(app, ["sites", "lama-3.2-1b"])
    assert r.exit_code == 2 and "llama-3.2-1b" in r.output


def _response(status: int, repo: str) -> httpx2.Response:
    return httpx2.Response(status, request=httpx2.Request("GET", f"https://huggingface.co/api/models/{repo}"))


@pytest.mark.parametrize(
    "make_exc",
    [
        lambda repo: GatedRepoError(f"Access to model {repo} is restricted.", response=_response(401, repo)),
        lambda repo: RepositoryNotFoundError("401 Client Error", response=_response(401, repo)),
        lambda repo: HfHubHTTPError("403 Forbidden", response=_response(403, repo)),
    ],
    ids=["gated", "not-found-401", "forbidden-403"],
)
def test_gated_download_says_accept_licence_and_log_in(make_exc, monkeypatch):
    def refuse(repo_id, **kw):
        raise make_exc(repo_id)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
    with pytest.raises(GatedModelError) as exc:
        models.resolve("llama-3.2-1b", log=lambda _: None)
    msg = str(exc.value)
    assert "meta-llama/Llama-3.2-1B" in msg and "https://huggingface.co/meta-llama/Llama-3.2-1B" in msg
    assert "accept the licence" in msg and "hf auth login" in msg and "HF_TOKEN" in msg
    r = runner.invoke(app, ["bake", "gemma-2-2b", "--recipe", "detox", "--dry-run"])
    assert r.exit_code == 2 and "accept the licence" in r.output and "google/gemma-2-2b" in r.output


def test_not_found_for_an_ungated_org_is_not_called_gated(monkeypatch):
    def refuse(repo_id, **kw):
        raise RepositoryNotFoundError("404", response=_response(404, repo_id))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
    with pytest.raises(ModelResolutionError) as exc:
        models.resolve("someone/no-such-model")
    assert not isinstance(exc.value, GatedModelError) and "not found" in str(exc.value)


def test_headline_command_from_the_hub_cache(offline_cache, tmp_path, monkeypatch):
    """`actmerge bake gemma-2-2b --recipe detox.yaml --strength 1.0 -o out` as typed, from an empty
    working directory: short name → cached google/gemma-2-2b, detox.yaml → the built-in recipe."""
    monkeypatch.chdir(tmp_path)
    r = runner.invoke(
        app, ["bake", "gemma-2-2b", "--recipe", "detox.yaml", "--strength", "1.0", "-o", "out", "--verify"]
    )
    assert r.exit_code == 0, r.output
    assert "[actmerge] gemma-2-2b → google/gemma-2-2b" in r.output
    assert "[actmerge] recipe detox.yaml: the built-in detox" in r.output
    assert "PASS" in r.output
    bake = json.loads((tmp_path / "out" / "actmerge" / "bake.json").read_text())
    assert bake["base_model"] == "google/gemma-2-2b" and bake["strength"] == 1.0
    assert (tmp_path / "out" / "actmerge" / "recipe.yaml").read_text().startswith("# Detoxification")
    # the detox sites were baked (post-norm gains, o_proj columns for attn_ctx), nothing else
    base = load_file(
        str(offline_cache / "models--google--gemma-2-2b" / "snapshots" / REV / "model.safetensors")
    )
    baked = load_file(str(tmp_path / "out" / "model.safetensors"))
    changed = {k for k in base if not base[k].equal(baked[k])}
    n = json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"]
    allowed = {
        f"model.layers.{i}.{m}.weight"
        for i in range(n)
        for m in ("post_attention_layernorm", "post_feedforward_layernorm", "self_attn.o_proj")
    }
    assert changed and changed <= allowed, changed - allowed
    assert any("layernorm" in k for k in changed)
    assert not (tmp_path / "out" / "model.safetensors").is_symlink()
