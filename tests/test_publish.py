"""Publish exactly what was verified: ``verify.json`` records every file of the checkpoint, ``push``
refuses anything added, changed or removed since, any symlink, and uploads that explicit list of
regular files. The Hub is a fake behind ``hub.get_hf_api()``; nothing here touches the network."""

import hashlib
import json
import os
import shutil
from types import SimpleNamespace

import huggingface_hub
import pytest
from typer.testing import CliRunner

from actmerge import hub, pipeline
from actmerge.cli import app
from actmerge.errors import PublishError
from actmerge.models import ModelSource

from .common import make_pico

QUIET = dict(progress=False, log=lambda *_: None)
runner = CliRunner()
REPORT = "actmerge/verify.json"

RECIPE = """
name: pico-pub
sites: [attn_ctx]
source: src.txt
target: tgt.txt
max_sentences: 24
batch_size: 8
min_sentences: 12
"""


class FakeApi:
    """Records each call; ``create_commit`` reads what each operation would upload."""

    def __init__(self):
        self.calls, self.uploaded = [], {}

    def whoami(self):
        return {"name": "alice"}

    def create_repo(self, repo_id, **kw):
        self.calls.append("create_repo")
        return SimpleNamespace(repo_id=repo_id)

    def create_branch(self, repo_id, **kw):
        self.calls.append("create_branch")

    def create_commit(self, repo_id, *, operations, **kw):
        self.calls.append("create_commit")
        for op in operations:
            with op.as_file() as f:
                self.uploaded[op.path_in_repo] = f.read()

    def upload_folder(self, **kw):  # the old folder walk: anything it would send is recorded
        self.calls.append("upload_folder")
        root = kw["folder_path"]
        for p in sorted(root.rglob("*")):
            if p.is_file():
                self.uploaded[p.relative_to(root).as_posix()] = p.read_bytes()


@pytest.fixture
def api(monkeypatch):
    fake = FakeApi()
    monkeypatch.setattr(hub, "get_hf_api", lambda: fake)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_fake_token")
    return fake


@pytest.fixture(scope="module")
def verified(tmp_path_factory):
    """A pico GPT-2 baked from a recipe with ``bake(verify=True)`` (the flow of `bake --verify`)."""
    root = tmp_path_factory.mktemp("publish")
    model = make_pico("gpt2", root / "gpt2")
    (root / "src.txt").write_text("\n".join(f"bad words number {i} are here!!" for i in range(24)))
    (root / "tgt.txt").write_text("\n".join(f"kind text {i}, nice and calm." for i in range(24)))
    (root / "r.yaml").write_text(RECIPE)
    loaded = pipeline.Loaded(ModelSource("pico", model))
    (res,) = pipeline.bake(
        loaded,
        recipe=root / "r.yaml",
        options=pipeline.BakeOptions(strengths=[1.0], out=root / "out", verify_after=True),
        **QUIET,
    )
    assert res.verification.passed
    return res.out


@pytest.fixture
def ckpt(verified, tmp_path):
    """A private copy of the verified checkpoint, for tests that change it."""
    return shutil.copytree(verified, tmp_path / "ckpt")


def tree(root) -> dict[str, str]:
    """Every regular file below ``root`` (relative path → sha256), symlinks not followed."""
    out = {}
    for top, _, names in os.walk(root):
        for n in names:
            p = os.path.join(top, n)
            if os.path.isfile(p) and not os.path.islink(p):
                out[os.path.relpath(p, root)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


def test_verify_json_lists_every_file_with_digest_and_size(verified):
    recorded = json.loads((verified / REPORT).read_text())["files"]
    files = sorted(tree(verified))
    assert sorted(recorded) == sorted(f for f in files if f != REPORT)
    # weights, config, tokenizer, the card (final: written before verify), provenance
    for f in ("model.safetensors", "config.json", "tokenizer_config.json", "README.md", "actmerge/bake.json"):
        assert f in recorded, f
    for f, entry in recorded.items():
        data = (verified / f).read_bytes()
        assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}, f


def test_push_uploads_exactly_the_verified_regular_files(verified, api):
    res = hub.push(verified, "alice/pico", log=lambda _: 0)
    recorded = json.loads((verified / REPORT).read_text())["files"]
    expected = sorted([*recorded, REPORT])
    assert res.files == expected and api.calls == ["create_repo", "create_commit"]
    assert api.uploaded == {f: (verified / f).read_bytes() for f in expected}


def test_dry_run_lists_exactly_that_list(verified, api):
    r = runner.invoke(app, ["push", str(verified), "alice/pico", "--dry-run"])
    assert r.exit_code == 0, r.output
    listed = [line.split("  (")[0].strip() for line in r.output.splitlines() if line.startswith("  ")]
    assert listed == sorted([*json.loads((verified / REPORT).read_text())["files"], REPORT])
    assert api.calls == []


def _tamper_tokenizer(d, outside):
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{{ 'pwned' }}"
    cfg["auto_map"] = {"AutoTokenizer": "evil.EvilTokenizer"}
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    return "tokenizer_config.json changed"


def _add_evil(d, outside):
    (d / "evil.py").write_text("import os; os.system('echo pwned')\n")
    return "evil.py added"


def _remove_file(d, outside):
    (d / "generation_config.json").unlink()
    return "generation_config.json removed"


def _symlink_out(d, outside):
    (d / "notes.txt").symlink_to(outside)
    return "notes.txt is a symlink"


def _symlink_out_nested(d, outside):
    (d / "actmerge" / "extra").mkdir()
    (d / "actmerge" / "extra" / "key").symlink_to(outside)
    return "actmerge/extra/key is a symlink"


def _weights_replaced_by_symlink(d, outside):
    real = d.parent / "moved.safetensors"
    (d / "model.safetensors").rename(real)
    (d / "model.safetensors").symlink_to(real)  # same bytes, but not the checkpoint's own file
    return "model.safetensors is a symlink"


@pytest.mark.parametrize(
    "tamper",
    [
        _tamper_tokenizer,
        _add_evil,
        _remove_file,
        _symlink_out,
        _symlink_out_nested,
        _weights_replaced_by_symlink,
    ],
)
def test_push_refuses_anything_changed_since_verify(ckpt, api, tmp_path, tamper):
    outside = tmp_path / "secret" / "id_rsa"
    outside.parent.mkdir()
    outside.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nsecret\n")
    named = tamper(ckpt, outside)
    before = tree(tmp_path)
    r = runner.invoke(app, ["push", str(ckpt), "alice/pico"])
    assert r.exit_code == 6 and "Traceback" not in r.output, r.output
    with pytest.raises(PublishError) as e:
        hub.push(ckpt, "alice/pico", log=lambda _: 0)
    message = str(e.value)
    assert named in message and f"run `actmerge verify {ckpt}` again" in message and "\n" not in message
    with pytest.raises(PublishError):
        hub.push(ckpt, "alice/pico", dry_run=True, log=lambda _: 0)
    assert api.calls == [] and api.uploaded == {}  # nothing reached the Hub
    assert tree(tmp_path) == before  # refusing changes nothing on disk


def test_verify_again_makes_a_change_publishable(ckpt, api, tmp_path):
    """The remedy works: after `actmerge verify` the changed file is part of what is published."""
    (ckpt / "notes.md").write_text("extra notes\n")
    with pytest.raises(PublishError, match="notes.md added"):
        hub.push(ckpt, "alice/pico", log=lambda _: 0)
    report = json.loads((ckpt / REPORT).read_text())
    from actmerge.io.provenance import write_verify_report

    write_verify_report(ckpt, json.dumps({k: v for k, v in report.items() if k != "files"}))
    res = hub.push(ckpt, "alice/pico", log=lambda _: 0)
    assert "notes.md" in res.files and api.uploaded["notes.md"] == b"extra notes\n"


def test_an_older_verify_record_without_a_file_list_is_refused(ckpt, api):
    report = json.loads((ckpt / REPORT).read_text())
    del report["files"]
    (ckpt / REPORT).write_text(json.dumps({**report, "weights_sha256": {}}))
    with pytest.raises(PublishError, match=r"does not list the checkpoint's files.*actmerge verify .* again"):
        hub.push(ckpt, "alice/pico", log=lambda _: 0)
    assert api.calls == []


def test_no_verify_still_refuses_symlinks_and_uploads_regular_files_only(ckpt, api, tmp_path):
    outside = tmp_path / "secret.txt"
    outside.write_text("secret")
    (ckpt / "secret.txt").symlink_to(outside)
    r = runner.invoke(app, ["push", str(ckpt), "alice/pico", "--no-verify"])
    assert r.exit_code == 6 and "Traceback" not in r.output, r.output
    with pytest.raises(PublishError, match="secret.txt is a symlink"):
        hub.push(ckpt, "alice/pico", verify_required=False, log=lambda _: 0)
    assert api.uploaded == {}
    (ckpt / "secret.txt").unlink()
    (ckpt / "notes.md").write_text("unverified but regular\n")
    r = runner.invoke(app, ["push", str(ckpt), "alice/pico", "--no-verify"])
    assert r.exit_code == 0, r.output
    assert set(api.uploaded) == set(tree(ckpt)) and b"secret" not in b"".join(api.uploaded.values())


def test_a_fifo_in_the_checkpoint_is_refused_not_read(ckpt, api):
    os.mkfifo(ckpt / "pipe")
    with pytest.raises(PublishError, match="pipe is a FIFO"):
        hub.push(ckpt, "alice/pico", verify_required=False, log=lambda _: 0)
    assert api.uploaded == {}
