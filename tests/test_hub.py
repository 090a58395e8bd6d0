"""Publishing: the model card, the exact upload list, the refusals, and the upload itself through a fake
``get_hf_api()`` — nothing here touches the network."""

import json
import re
import shutil
from types import SimpleNamespace

import huggingface_hub
import pytest
import yaml
from huggingface_hub.errors import HfHubHTTPError
from typer.testing import CliRunner

from actmerge import card, hub, pipeline
from actmerge.cli import app
from actmerge.errors import PublishError
from actmerge.models import ModelSource

from .common import make_pico, random_maps

QUIET = dict(progress=False, log=lambda *_: None)
runner = CliRunner()

RECIPE = """
name: pico-detox
method: linear_act
sites:
  - site: [attn_ctx, mlp_hidden]
    layers: all
source: src.txt
target: tgt.txt
max_sentences: 30
batch_size: 8
"""

BAKED_FILES = [
    "README.md",
    "actmerge/bake.json",
    "actmerge/maps.safetensors",
    "actmerge/recipe.yaml",
    "actmerge/src.txt",  # the recipe's sentence files ship with it
    "actmerge/tgt.txt",
    "actmerge/verify.json",
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
]


@pytest.fixture(scope="module")
def pico(tmp_path_factory):
    """A pico GPT-2 whose card says apache-2.0, and a recipe for it."""
    root = tmp_path_factory.mktemp("hub")
    model = make_pico("gpt2", root / "gpt2")
    (model / "README.md").write_text("---\nlicense: apache-2.0\ntags: [pico]\n---\n# pico\n")
    (root / "src.txt").write_text("\n".join(f"bad words number {i} are here!!" for i in range(24)))
    (root / "tgt.txt").write_text("\n".join(f"kind text {i}, nice and calm." for i in range(24)))
    (root / "r.yaml").write_text(RECIPE)
    return root, model


@pytest.fixture(scope="module")
def baked(pico):
    """Baked from the recipe and verified (verify.json passed)."""
    root, model = pico
    loaded = pipeline.Loaded(ModelSource("pico", model))
    (res,) = pipeline.bake(
        loaded,
        recipe=root / "r.yaml",
        options=pipeline.BakeOptions(strengths=[1.0], out=root / "out"),
        **QUIET,
    )
    assert pipeline.verify(res.out, base=loaded, log=lambda *_: None).passed
    return res.out


@pytest.fixture
def copy(baked, tmp_path):
    """A private copy of the verified bake, for tests that change it."""
    return shutil.copytree(baked, tmp_path / "baked")


class FakeApi:
    """Records every call; ``fail`` makes create_repo raise it."""

    def __init__(self, user="alice", fail=None):
        self.user, self.fail, self.calls = user, fail, []

    def whoami(self):
        self.calls.append(("whoami",))
        return {"name": self.user}

    def create_repo(self, repo_id, **kw):
        self.calls.append(("create_repo", repo_id, kw))
        if self.fail:
            raise self.fail
        return SimpleNamespace(repo_id=repo_id)

    def create_branch(self, repo_id, **kw):
        self.calls.append(("create_branch", repo_id, kw))

    def create_commit(self, repo_id, *, operations, **kw):
        """The explicit upload: each operation's path in the repo and the bytes it would send."""
        uploaded = {}
        for op in operations:
            with op.as_file() as f:
                uploaded[op.path_in_repo] = f.read()
        self.calls.append(("create_commit", repo_id, kw, uploaded))

    def uploaded(self) -> dict[str, bytes]:
        """path in repo → bytes, over every commit."""
        return {k: v for c in self.calls if c[0] == "create_commit" for k, v in c[3].items()}

    def names(self):
        return [c[0] for c in self.calls]


@pytest.fixture
def api(monkeypatch):
    fake = FakeApi()
    monkeypatch.setattr(hub, "get_hf_api", lambda: fake)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_fake_token")
    return fake


def front_matter(text: str) -> dict:
    m = re.match(r"^---\n(.*?)\n---\n", text, re.S)
    assert m, text[:200]
    return yaml.safe_load(m.group(1))


# ---- model card ---------------------------------------------------------------------------------


def test_card_of_a_real_bake(baked):
    text = (baked / "README.md").read_text()
    meta = front_matter(text)
    assert meta["license"] == "apache-2.0"  # from the base's card front matter
    assert meta["base_model"] == "pico" and meta["base_model_relation"] == "finetune"
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert {"actmerge", "activation-steering", "linear_act", "pico-detox"} <= set(meta["tags"])
    body = text.split("---\n", 2)[2]
    for needle in (
        "λ = 1",
        "linear_act",
        "attn_ctx, mlp_hidden",
        "Fold report",
        "config changes: none",
        "AutoModelForCausalLM.from_pretrained",
        "vllm serve",
        "LLM(model=",
        "actmerge export-gguf model -o model.gguf",
        "llama-cli -m",
        "## Reproduce",
        "actmerge bake pico --recipe model/actmerge/recipe.yaml --strength 1 -o out/",
    ):
        assert needle in body, needle
    assert "could not be determined" not in body


def test_card_unknown_license_and_local_base(tmp_path):
    from actmerge.io.provenance import BakeInfo

    def info(base):  # duplicate tags collapse: method and recipe are both mean_act
        return BakeInfo(
            "llm", base, 0.5, "mean_act", "0", recipe="mean_act", config_patch={"attention_bias": True}
        )

    kw = dict(evaluation="| row | toxicity |\n|---|---|\n| base | 0.5 |")
    from actmerge.kinds.llm.card import text as llm_text

    text = card.render(info(str(tmp_path)), llm_text(info(str(tmp_path)), chat=False), license=None, **kw)
    meta = front_matter(text)
    assert meta["license"] == "other" and "could not be determined" in text
    assert "base_model" not in meta  # a local path is not a Hub id: the Hub would reject the card
    assert meta["tags"].count("mean_act") == 1
    assert "## Evaluation" in text and "`attention_bias=True`" in text
    gemma = info("gemma-3-270m")
    meta = front_matter(card.render(gemma, llm_text(gemma, chat=False), license=None, **kw))
    assert meta["base_model"] == "google/gemma-3-270m" and meta["license"] == "gemma"
    assert card.base_license(tmp_path, {"license": "mit"}) == "mit"  # config fallback


# ---- what is uploaded ---------------------------------------------------------------------------


def test_upload_plan_is_exact(copy):
    assert hub.upload_plan(copy) == BAKED_FILES
    (copy / ".DS_Store").write_text("x")
    (copy / ".git").mkdir()
    (copy / ".git" / "HEAD").write_text("x")
    (copy / "actmerge" / ".notes").write_text("x")
    (copy / "model.safetensors.tmp").write_text("x")
    (copy / "__pycache__").mkdir()
    (copy / "__pycache__" / "x.pyc").write_text("x")
    assert hub.upload_plan(copy) == BAKED_FILES


def test_upload_plan_from_maps(pico, tmp_path):
    _, model = pico
    src = ModelSource("pico", model)
    (res,) = pipeline.bake(
        pipeline.Loaded(src),
        maps=random_maps(src.config),
        options=pipeline.BakeOptions(strengths=[1.0], out=tmp_path / "o"),
        **QUIET,
    )
    files = hub.upload_plan(res.out)
    assert "actmerge/recipe.yaml" not in files and "actmerge/verify.json" not in files
    assert {"actmerge/maps.safetensors", "actmerge/bake.json", "README.md", "model.safetensors"} <= set(files)
    # no recipe name in the maps: the default name says "steered"
    assert hub.default_repo_id(FakeApi("bob"), res.out) == "bob/pico-steered"


# ---- push through the fake API ------------------------------------------------------------------


def test_push_calls(baked, api):
    res = hub.push(
        baked, "alice/pico-x", private=True, revision="lam-1", commit_message="hi", log=lambda _: 0
    )
    assert api.names() == ["create_repo", "create_branch", "create_commit"]
    _, repo, kw = api.calls[0]
    assert repo == "alice/pico-x" and kw == dict(private=True, exist_ok=True, repo_type="model")
    assert api.calls[1][1:] == ("alice/pico-x", dict(branch="lam-1", exist_ok=True))
    _, repo, kw, uploaded = api.calls[2]
    assert repo == "alice/pico-x" and kw == dict(commit_message="hi", revision="lam-1", repo_type="model")
    assert uploaded == {f: (baked / f).read_bytes() for f in BAKED_FILES}
    assert res.url == "https://huggingface.co/alice/pico-x/tree/lam-1" and not res.dry_run
    assert res.files == BAKED_FILES


def test_push_default_repo_id(baked, api):
    res = hub.push(baked, log=lambda _: 0)
    assert (
        res.repo_id == "alice/pico-pico-detox" and res.url == "https://huggingface.co/alice/pico-pico-detox"
    )
    assert api.names() == ["whoami", "create_repo", "create_commit"]
    assert api.calls[1][2]["private"] is False and api.calls[2][2]["revision"] is None
    # a bare name goes under the token's user
    assert hub.push(baked, "my-model", log=lambda _: 0).repo_id == "alice/my-model"


def test_default_repo_id_sanitised(copy):
    info = json.loads((copy / "actmerge" / "bake.json").read_text())
    info["base_model"] = "/some/where/My Model..v2 (fp32)"
    (copy / "actmerge" / "bake.json").write_text(json.dumps(info))
    repo = hub.default_repo_id(FakeApi("carol"), copy)
    assert repo == "carol/My-Model.v2-fp32-pico-detox"
    hub.validate_repo_id(repo)


def test_dry_run_touches_nothing(baked, monkeypatch):
    fake = FakeApi()
    monkeypatch.setattr(hub, "get_hf_api", lambda: fake)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)  # no token needed for a dry run
    lines = []
    res = hub.push(baked, "alice/x", dry_run=True, log=lines.append)
    assert res.dry_run and res.files == BAKED_FILES and fake.calls == []
    assert any(f"would upload {len(BAKED_FILES)} files" in line for line in lines)
    assert hub.push(baked, dry_run=True, log=lines.append).repo_id == "alice/pico-pico-detox"
    assert fake.names() == ["whoami"]

    class Offline:
        def whoami(self):
            raise huggingface_hub.errors.LocalTokenNotFoundError("no token")

    monkeypatch.setattr(hub, "get_hf_api", Offline)
    assert hub.push(baked, dry_run=True, log=lines.append).repo_id == "<user>/pico-pico-detox"


# ---- refusals -----------------------------------------------------------------------------------


def test_refuses_unverified(copy, api):
    (copy / "actmerge" / "verify.json").unlink()
    with pytest.raises(PublishError, match=r"actmerge verify .*--no-verify") as e:
        hub.push(copy, "alice/x", log=lambda _: 0)
    assert e.value.exit_code == 6 and api.calls == []
    hub.push(copy, "alice/x", verify_required=False, log=lambda _: 0)
    assert api.names() == ["create_repo", "create_commit"]


def test_refuses_failed_verification(copy, api):
    report = json.loads((copy / "actmerge" / "verify.json").read_text())
    (copy / "actmerge" / "verify.json").write_text(json.dumps({**report, "passed": False}))
    with pytest.raises(PublishError, match="failed verification"):
        hub.push(copy, "alice/x", log=lambda _: 0)
    (copy / "actmerge" / "verify.json").write_text("{not json")
    with pytest.raises(PublishError, match="not a readable verification report"):
        hub.check_publishable(copy)
    assert api.calls == []


def test_refuses_non_actmerge_dir(pico, tmp_path, api):
    _, model = pico
    plain = shutil.copytree(model, tmp_path / "plain")
    with pytest.raises(PublishError, match=r"not an actmerge output.*--force"):
        hub.check_publishable(plain, verify_required=False)
    hub.check_publishable(plain, verify_required=False, force=True)
    # --force does not skip verification: a plain directory has no verify.json
    with pytest.raises(PublishError, match="--no-verify"):
        hub.check_publishable(plain, force=True)
    res = hub.push(plain, "alice/plain", force=True, verify_required=False, log=lambda _: 0)
    assert res.files == sorted(p.name for p in plain.iterdir())
    with pytest.raises(PublishError, match="not a directory"):
        hub.check_publishable(tmp_path / "missing")


def test_refuses_without_token(baked, api, monkeypatch):
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(PublishError, match=r"HF_TOKEN.*hf auth login"):
        hub.push(baked, "alice/x", log=lambda _: 0)
    assert api.calls == []


def test_refuses_invalid_repo_id(baked, api):
    with pytest.raises(PublishError, match="invalid repo id"):
        hub.push(baked, "alice/bad--name", log=lambda _: 0)


@pytest.mark.parametrize(
    "status, match", [(403, "lacks write access"), (401, "lacks write access"), (500, "HTTP 500")]
)
def test_hub_http_errors_become_publish_errors(baked, api, status, match):
    response = SimpleNamespace(status_code=status, headers={}, request=None)
    api.fail = HfHubHTTPError(f"{status} Client Error", response=response)
    with pytest.raises(PublishError, match=match) as e:
        hub.push(baked, "alice/x", log=lambda _: 0)
    assert isinstance(e.value.__cause__, HfHubHTTPError)


# ---- CLI ----------------------------------------------------------------------------------------


def test_cli_push_dry_run(baked, api):
    r = runner.invoke(app, ["push", str(baked), "alice/pico-x", "--dry-run"])
    assert r.exit_code == 0, r.output
    for f in BAKED_FILES:
        assert f"  {f}  (" in r.output, f
    assert "https://huggingface.co/alice/pico-x" in r.output and "nothing was uploaded" in r.output
    assert api.calls == []


def test_cli_push(baked, api):
    r = runner.invoke(app, ["push", str(baked), "--private", "--revision", "v1"])
    assert r.exit_code == 0, r.output
    assert "https://huggingface.co/alice/pico-pico-detox/tree/v1" in r.output
    assert api.names() == ["whoami", "create_repo", "create_branch", "create_commit"]
    assert api.calls[1][2]["private"] is True


def test_cli_push_unverified_exits_6(copy, api):
    (copy / "actmerge" / "verify.json").unlink()
    r = runner.invoke(app, ["push", str(copy), "alice/x"])
    assert r.exit_code == 6, r.output
    assert "actmerge verify" in r.output and api.calls == []
    r = runner.invoke(app, ["push", str(copy), "alice/x", "--no-verify"])
    assert r.exit_code == 0, r.output


def test_cli_bake_push_to_hub(pico, tmp_path, api):
    """bake --push-to-hub verifies each strength, then pushes each to its own repo."""
    _, model = pico
    maps = random_maps(ModelSource("pico", model).config, ["attn_ctx"]).save(tmp_path / "maps.safetensors")
    out = tmp_path / "out"
    args = ["bake", str(model), "--maps", str(maps), "-s", "0.5,1", "-o", str(out)]
    r = runner.invoke(app, [*args, "--push-to-hub", "alice/pico", "--private"])
    assert r.exit_code == 0, r.output
    assert r.output.count("PASS") == 2
    uploads = [c for c in api.calls if c[0] == "create_commit"]
    assert [u[1] for u in uploads] == ["alice/pico-lambda-0.5", "alice/pico-lambda-1"]
    for u, lam in zip(uploads, ("0.5", "1"), strict=True):  # each strength's own files, as verified
        assert u[3] == {
            f: (out / f"lambda-{lam}" / f).read_bytes() for f in hub.upload_plan(out / f"lambda-{lam}")
        }
    assert all(c[2]["private"] for c in api.calls if c[0] == "create_repo")
    assert (out / "lambda-1" / "actmerge" / "verify.json").is_file()


def test_cli_bake_push_needs_token_before_baking(pico, tmp_path, api, monkeypatch):
    _, model = pico
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    maps = random_maps(ModelSource("pico", model).config, ["attn_ctx"]).save(tmp_path / "maps.safetensors")
    r = runner.invoke(
        app, ["bake", str(model), "--maps", str(maps), "-o", str(tmp_path / "o"), "--push-to-hub", "a/b"]
    )
    assert r.exit_code == 6 and "HF_TOKEN" in r.output
    assert not (tmp_path / "o").exists()
