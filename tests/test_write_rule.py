"""One rule for every write (issue 25): never into or over a model source or a model cache, never
through a link, ``--force`` only over what actmerge wrote, every temp name cleaned after a crash, the
``--force`` swap recoverable at every instant, stale locks with reused pids, long names, the umask.
Each fault test snapshots the file system around the output (names, link targets, hashes) and
asserts it unchanged, with no partial output left."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from actmerge import pipeline
from actmerge.cli import app
from actmerge.evaluation import lmeval
from actmerge.io.markers import GGUF_KEY, is_actmerge_file
from actmerge.io.output import atomic_dir
from actmerge.models import ModelSource

from .common import make_pico, random_maps, write_cli_setup

runner = CliRunner()
DEAD = 2**22 + 12345  # above the default pid_max: no such process
RECIPE = """
name: rule
sites:
  - site: [attn_ctx]
    layers: all
source: src.txt
target: tgt.txt
batch_size: 8
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("rule")
    model = write_cli_setup(root, RECIPE)
    config = ModelSource("pico", model).config
    random_maps(config, ["attn_ctx"], seed=3).save(root / "maps.safetensors")
    random_maps(config, ["mlp_out"], seed=4).save(root / "cv_maps.safetensors")
    return root, model


def snapshot(root: Path) -> dict[str, str]:
    """Every name under ``root`` (hidden ones too): a link's target, a file's size and hash, or dir."""
    out = {}
    for dirpath, dirs, files in os.walk(root, followlinks=False):
        for name in dirs + files:
            p = Path(dirpath) / name
            rel = p.relative_to(root).as_posix()
            if p.is_symlink():
                out[rel] = "-> " + os.readlink(p)
            elif p.is_dir():
                out[rel] = "dir"
            else:
                data = p.read_bytes()
                out[rel] = f"{len(data)}:{hashlib.sha256(data).hexdigest()}"
    return out


def _run(*args):
    return runner.invoke(app, [str(a) for a in args])


def _refused(r, code: int, needle: str) -> None:
    assert r.exit_code == code, r.output
    assert needle in r.output, r.output
    assert "Traceback" not in r.output


def _no_slow_work(monkeypatch):
    def boom(*_a, **_k):
        raise AssertionError("the fit ran before the output was checked")

    monkeypatch.setattr(pipeline, "fit", boom)


def test_fit_never_writes_into_or_over_its_source(setup, tmp_path, monkeypatch):
    """Issue item 1: `fit MODEL -o MODEL/model.safetensors --force` replaced the weights."""
    root, model = setup
    before = snapshot(model)
    _no_slow_work(monkeypatch)
    for target, extra in ((model / "model.safetensors", ["--force"]), (model / "maps.safetensors", [])):
        r = _run("fit", model, "--recipe", root / "r.yaml", "-o", target, *extra)
        _refused(r, 2, "overlaps the source")
    (tmp_path / "link").symlink_to(model)  # the same through a link
    r = _run("fit", model, "--recipe", root / "r.yaml", "-o", tmp_path / "link" / "m.safetensors")
    _refused(r, 2, "overlaps the source")
    assert snapshot(model) == before


def test_no_output_in_a_model_cache(setup, tmp_path, monkeypatch):
    root, model = setup
    cache, hf = tmp_path / "cache", tmp_path / "hf"
    (cache / "gemma-3-270m").mkdir(parents=True)
    (cache / "gemma-3-270m" / "model.safetensors").write_bytes(b"weights")
    (hf / "blobs").mkdir(parents=True)
    (hf / "blobs" / "abc").write_bytes(b"a blob")
    (tmp_path / "to_hf").symlink_to(hf)
    monkeypatch.setenv("ACTMERGE_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_CACHE", str(hf))
    before = snapshot(tmp_path)
    maps = root / "maps.safetensors"
    for out, extra in (
        (cache / "gemma-3-270m" / "model.safetensors", ["--force"]),
        (cache / "new.safetensors", []),
        (hf / "blobs" / "abc", ["--force"]),
        (tmp_path / "to_hf" / "x.safetensors", []),
    ):
        _refused(
            _run("compose", maps, maps, "-s", "1,0.5", "-o", out, *extra), 2, "actmerge never writes there"
        )
    _refused(_run("bake", model, "--maps", maps, "-o", cache / "baked"), 2, "actmerge never writes there")
    _refused(_run("bake", model, "--maps", maps, "-o", tmp_path), 2, "actmerge never writes there")
    assert snapshot(tmp_path) == before


def test_force_replaces_only_files_actmerge_wrote(setup, tmp_path):
    """Issue item 1: --force on file outputs (maps, GGUF, control vector, notes.txt) replaced any file."""
    import gguf

    root, model = setup
    maps, cv_maps = root / "maps.safetensors", root / "cv_maps.safetensors"
    (tmp_path / "notes.txt").write_text("mine")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "user.safetensors"), metadata={"format": "pt"})
    w = gguf.GGUFWriter(str(tmp_path / "user.gguf"), "llama")
    for step in (w.write_header_to_file, w.write_kv_data_to_file, w.write_tensors_to_file, w.close):
        step()
    before = snapshot(tmp_path)
    for name in ("notes.txt", "user.safetensors"):
        r = _run("compose", maps, maps, "-s", "1,0.5", "-o", tmp_path / name, "--force")
        _refused(r, 2, "not a file actmerge wrote")
    r = _run("export-control-vector", cv_maps, "--model", model, "-o", tmp_path / "user.gguf", "--force")
    _refused(r, 2, "not a file actmerge wrote")
    r = _run("export-gguf", model, "-o", tmp_path / "user.gguf", "--force")
    _refused(r, 2, "not a file actmerge wrote")
    assert snapshot(tmp_path) == before
    # what actmerge wrote carries its marker, and --force replaces exactly that
    for _ in range(2):
        assert (
            _run("compose", maps, maps, "-s", "1,0.5", "-o", tmp_path / "c.safetensors", "--force").exit_code
            == 0
        )
        r = _run("export-control-vector", cv_maps, "--model", model, "-o", tmp_path / "cv.gguf", "--force")
        assert r.exit_code == 0, r.output
    assert is_actmerge_file(tmp_path / "c.safetensors") and is_actmerge_file(tmp_path / "cv.gguf")
    assert GGUF_KEY in gguf.GGUFReader(str(tmp_path / "cv.gguf")).fields


def test_report_directories_carry_a_marker_and_refuse_a_users_directory(setup, tmp_path):
    root, model = setup
    (tmp_path / "p.txt").write_text("hello there\nthe cat\n")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "report.json").write_text("my own notes")
    before = snapshot(tmp_path)
    args = ["eval", model, "--strengths", "", "--prompts", tmp_path / "p.txt", "--metrics", "perplexity"]
    _refused(_run(*args, "-o", mine), 2, "already exists")
    _refused(_run(*args, "-o", mine, "--force"), 2, "not an actmerge output")
    _refused(_run(*args, "-o", model / "rep"), 2, "overlaps the source")
    assert snapshot(tmp_path) == before
    assert _run(*args, "-o", tmp_path / "rep").exit_code == 0
    assert (tmp_path / "rep" / "actmerge" / "output.json").is_file()
    _refused(_run(*args, "-o", tmp_path / "rep"), 2, "--force")
    assert _run(*args, "-o", tmp_path / "rep", "--force").exit_code == 0


def test_eval_lm_eval_edits_only_cards_actmerge_wrote(setup, tmp_path, monkeypatch):
    """Issue item 3: eval --baked DIR --lm-eval rewrote DIR/README.md through a link (an HF cache blob)."""
    root, model = setup
    monkeypatch.setattr(lmeval, "scores", lambda *_a, **_k: {"task:acc": 0.5})
    foreign = tmp_path / "snapshots" / "abc"
    make_pico("llama", foreign, seed=1)
    (tmp_path / "blobs").mkdir()
    (tmp_path / "blobs" / "card").write_text("# someone's card\n\n## Use\n")
    (foreign / "README.md").symlink_to(tmp_path / "blobs" / "card")
    ours = tmp_path / "ours"
    assert _run("bake", model, "--maps", root / "maps.safetensors", "-o", ours).exit_code == 0
    linked = tmp_path / "linked"
    assert _run("bake", model, "--maps", root / "maps.safetensors", "-o", linked).exit_code == 0
    (tmp_path / "blobs" / "other").write_text("# a linked card\n")
    (linked / "README.md").unlink()
    (linked / "README.md").symlink_to(tmp_path / "blobs" / "other")
    (tmp_path / "p.txt").write_text("hello there\nthe cat\n")
    before = {p: snapshot(p) for p in (tmp_path / "snapshots", tmp_path / "blobs", linked)}
    r = _run(
        "eval", model, "--strengths", "", "--prompts", tmp_path / "p.txt", "--metrics", "perplexity",
        "--baked", foreign, "--baked", linked, "--baked", ours, "--lm-eval", "task", "-o", tmp_path / "rep",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    assert {p: snapshot(p) for p in before} == before  # nothing foreign or linked was touched
    assert "in the report only" in r.output
    card = (ours / "README.md").read_text()
    assert "## lm-evaluation-harness" in card and card.index("task:acc") < card.index("## Use")
    assert not [p.name for p in ours.iterdir() if p.name.startswith(".")]
    assert '"task:acc"' in (tmp_path / "rep" / "report.json").read_text()


def _cli(*args, hook: Path | None = None, env: dict | None = None):
    path = os.pathsep.join(filter(None, [str(hook) if hook else None, os.environ.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", "actmerge.cli", *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200", "PYTHONPATH": path, **(env or {})},
        timeout=300,
    )


def test_kill_between_the_swap_renames_restores_the_old_output(setup, tmp_path):
    """Issue item 7: a kill -9 between `out → .out.old-…` and `tmp → out`: the next run deleted the old
    output. Now it is renamed back (and said), and the partial new one removed."""
    root, model = setup
    work = tmp_path / "work"
    assert _run("bake", model, "--maps", root / "maps.safetensors", "-o", work / "o").exit_code == 0
    before = snapshot(work)
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        textwrap.dedent(
            """
            import os, pathlib, signal
            real = pathlib.Path.rename
            def rename(self, target):
                out = real(self, target)
                if ".old-" in str(target) and ".old-" not in self.name:
                    os.kill(os.getpid(), signal.SIGKILL)  # between the two renames of the swap
                return out
            pathlib.Path.rename = rename
            """
        )
    )
    p = _cli(
        "bake",
        model,
        "--maps",
        root / "maps.safetensors",
        "-s",
        "0.5",
        "-o",
        work / "o",
        "--force",
        hook=hook,
    )
    assert p.returncode == -signal.SIGKILL, p.stdout + p.stderr
    assert not (work / "o").exists() and list(work.glob(".o.old-*"))  # the kill came between the renames
    r = _cli("bake", model, "--maps", root / "maps.safetensors", "-s", "0.25", "-o", work / "o")
    text = r.stdout + r.stderr
    assert r.returncode == 2 and "restored" in text and "already exists" in text, text
    assert snapshot(work) == before


FAKE_CONVERTER = """
import argparse, os, signal, time
import gguf
ap = argparse.ArgumentParser()
ap.add_argument("model")
ap.add_argument("--outfile")
ap.add_argument("--outtype")
args = ap.parse_args()
with open(args.outfile, "wb") as f:
    f.write(b"partial")
if os.environ.get("KILL_EXPORT"):
    os.kill(os.getppid(), signal.SIGKILL)  # actmerge dies while the converter writes
    time.sleep(1)
    raise SystemExit(1)
w = gguf.GGUFWriter(args.outfile, "llama")
for step in (w.write_header_to_file, w.write_kv_data_to_file, w.write_tensors_to_file, w.close):
    step()
"""


def test_a_killed_export_gguf_is_cleaned_by_the_next_run(setup, tmp_path):
    """Issue item 7: kill -9 during export-gguf left `.actmerge-gguf-*` with a partial GGUF forever."""
    root, model = setup
    conv = tmp_path / "llama.cpp"
    (conv / "gguf-py").mkdir(parents=True)
    (conv / "convert_hf_to_gguf.py").write_text(FAKE_CONVERTER)
    work = tmp_path / "work"
    work.mkdir()
    env = {"ACTMERGE_LLAMA_CPP": str(conv)}
    p = _cli("export-gguf", model, "-o", work / "m.gguf", env={**env, "KILL_EXPORT": "1"})
    assert p.returncode == -signal.SIGKILL, p.stdout + p.stderr
    assert list(work.iterdir())  # the killed run's scratch space is there
    r = _cli("export-gguf", model, "-o", work / "m.gguf", env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "leftover" in r.stderr
    assert sorted(p.name for p in work.iterdir()) == ["m.gguf"]
    assert is_actmerge_file(work / "m.gguf")  # the converter's GGUF carries actmerge's marker
    assert _cli("export-gguf", model, "-o", work / "m.gguf", "--force", env=env).returncode == 0


def test_temp_files_of_a_dead_process_are_cleaned(setup, tmp_path):
    """Issue item 7: file outputs' `.NAME.tmp-PID-*` were never cleaned, and a set-aside link was
    reported as a leftover by every later run."""
    root, _ = setup
    compose = ["compose", root / "maps.safetensors", root / "maps.safetensors", "-s", "1,0.5"]
    assert _run(*compose, "-o", tmp_path / "c.safetensors").exit_code == 0
    for name in (f".c.safetensors.tmp-{DEAD}-abc", f".c.safetensors.tmp-{DEAD}-77-abc"):
        (tmp_path / name).write_bytes(b"partial")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "keep").write_text("not a leftover")
    (tmp_path / f".c.safetensors.old-{DEAD}-77-abc").symlink_to(tmp_path / "elsewhere")
    r = _run(*compose, "-o", tmp_path / "c.safetensors", "--force")
    assert r.exit_code == 0, r.output
    assert "removed 3 leftover" in r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.safetensors", "elsewhere"]
    assert (tmp_path / "elsewhere" / "keep").read_text() == "not a leftover"  # the link, not its target
    r = _run(*compose, "-o", tmp_path / "c.safetensors", "--force")
    assert r.exit_code == 0 and "leftover" not in r.output, r.output


def test_a_lock_whose_pid_was_reused_is_stale(setup, tmp_path):
    """Issue item 7: a lock naming a pid now used by another process blocked the output forever."""
    root, model = setup
    lock = tmp_path / ".o.lock"
    lock.write_text(str(os.getppid()))  # a live pid, but the lock was written before it started
    os.utime(lock, (946684800, 946684800))  # 2000-01-01
    r = _run("bake", model, "--maps", root / "maps.safetensors", "-o", tmp_path / "o")
    assert r.exit_code == 0, r.output
    lock = tmp_path / ".o2.lock"
    lock.write_text(f"{os.getppid()} 1")  # a live pid with another start time
    r = _run("bake", model, "--maps", root / "maps.safetensors", "-o", tmp_path / "o2")
    assert r.exit_code == 0, r.output
    lock = tmp_path / ".o3.lock"
    lock.write_text(str(os.getppid()))  # held: the message names the lock file and the remedy
    r = _run("bake", model, "--maps", root / "maps.safetensors", "-o", tmp_path / "o3")
    _refused(r, 8, "remove the lock file")
    assert str(lock) in r.output.replace("\n", "")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".o3.lock", "o", "o2"]


def test_force_onto_a_symlink_is_refused(setup, tmp_path):
    """Issue item 7: --force onto a link left a `.NAME.old-*` link reported as a leftover forever."""
    root, model = setup
    real = tmp_path / "real"
    assert _run("bake", model, "--maps", root / "maps.safetensors", "-o", real).exit_code == 0
    (tmp_path / "link").symlink_to(real)
    before = snapshot(tmp_path)
    for extra in ([], ["--force"]):
        r = _run("bake", model, "--maps", root / "maps.safetensors", "-o", tmp_path / "link", *extra)
        _refused(r, 2, "symbolic link")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("length", [250, 300])
def test_a_too_long_output_name_is_refused_before_any_work(setup, tmp_path, monkeypatch, length):
    root, model = setup
    _no_slow_work(monkeypatch)
    long = tmp_path / ("x" * length)
    _refused(_run("fit", model, "--recipe", root / "r.yaml", "-o", long), 2, "shorter -o")
    _refused(_run("bake", model, "--recipe", root / "r.yaml", "-o", long), 2, "shorter -o")
    assert list(tmp_path.iterdir()) == []


def test_outputs_and_cache_entries_follow_the_umask(tmp_path):
    """Issue item 10: the cached model.safetensors was 0600 under umask 022 (safetensors' save_file)."""
    old = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "entry", owned=True, log=lambda _m: None) as tmp:
            save_file({"w": torch.zeros(2)}, str(tmp / "model.safetensors"))
            (tmp / "run.sh").write_text("#!/bin/sh\n")
            os.chmod(tmp / "run.sh", 0o700)
    finally:
        os.umask(old)
    assert (tmp_path / "entry" / "model.safetensors").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "entry" / "run.sh").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "entry").stat().st_mode & 0o777 == 0o755
