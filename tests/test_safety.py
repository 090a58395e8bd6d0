"""Output safety and faults (issue 13): --force never destroys a user's files, concurrent writers,
signals, stale temp dirs, file-system faults, bad inputs as one-line errors, strength and layer
checks, stale verification before push. Each case leaves the file system as it was."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from actmerge import pipeline
from actmerge.cli import app
from actmerge.io import output, weights
from actmerge.models import ModelSource

from .common import random_maps, write_cli_setup

runner = CliRunner()
QUIET = dict(progress=False, log=lambda *_: None)
RECIPE = """
name: safety
sites:
  - site: [attn_ctx, mlp_hidden]
    layers: all
source: src.txt
target: tgt.txt
batch_size: 8
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("safety")
    model = write_cli_setup(root, RECIPE)
    maps = random_maps(ModelSource("pico", model).config, ["attn_ctx"], seed=3)
    maps.save(root / "maps.safetensors")
    return root, model


def _tree(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in path.rglob("*") if p.is_file()}


def _bake(model, *args):
    return runner.invoke(app, ["bake", str(model), *map(str, args)])


def _one_line_error(r, code: int, needle: str) -> None:
    assert r.exit_code == code, r.output
    assert needle in r.output, r.output
    assert "Traceback" not in r.output


def test_force_never_deletes_a_users_directory(setup, tmp_path, monkeypatch):
    root, model = setup
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("precious")
    r = _bake(model, "--maps", root / "maps.safetensors", "-o", user, "--force")
    _one_line_error(r, 2, "not an actmerge output")
    assert _tree(user) == {"notes.txt": b"precious"}
    monkeypatch.chdir(user)  # `-o . --force` in a directory: refused, nothing emptied
    r = _bake(model, "--maps", root / "maps.safetensors", "-o", ".", "--force")
    _one_line_error(r, 2, "current directory")
    assert _tree(user) == {"notes.txt": b"precious"}


def test_force_replaces_an_actmerge_output_only_after_success(setup, tmp_path, monkeypatch):
    root, model = setup
    out = tmp_path / "out"
    assert _bake(model, "--maps", root / "maps.safetensors", "-o", out).exit_code == 0
    before = _tree(out)

    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(weights, "write_shard", full)
    r = _bake(model, "--maps", root / "maps.safetensors", "-s", "0.5", "-o", out, "--force")
    _one_line_error(r, 8, "no space left")
    assert _tree(out) == before  # the old bake is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp dir, no lock
    monkeypatch.undo()
    r = _bake(model, "--maps", root / "maps.safetensors", "-s", "0.5", "-o", out, "--force")
    assert r.exit_code == 0, r.output
    assert json.loads((out / "actmerge" / "bake.json").read_text())["strength"] == 0.5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EROFS, errno.EACCES])
def test_file_system_faults_are_clear_and_leave_nothing(setup, tmp_path, monkeypatch, err):
    root, model = setup

    def failing(*_a, **_k):
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(weights, "write_shard", failing)
    r = _bake(model, "--maps", root / "maps.safetensors", "-o", tmp_path / "o")
    _one_line_error(r, 8, "-o")
    assert list(tmp_path.iterdir()) == []


def test_output_naming_a_file_and_unwritable_parent(setup, tmp_path, monkeypatch):
    root, model = setup
    (tmp_path / "f").write_text("x")
    _one_line_error(_bake(model, "--maps", root / "maps.safetensors", "-o", tmp_path / "f"), 2, "is a file")
    monkeypatch.setattr(output, "_writable", lambda _p: False)  # root ignores mode bits: simulate it
    _one_line_error(
        _bake(model, "--maps", root / "maps.safetensors", "-o", tmp_path / "ro" / "o"), 8, "cannot write"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]


def test_stale_temp_dir_and_lock_of_a_dead_process_are_removed(setup, tmp_path):
    root, model = setup
    dead = 2**22 + 12345  # above the default pid_max: no such process
    (tmp_path / f".o.tmp-{dead}-abc").mkdir()
    (tmp_path / f".o.tmp-{dead}-abc" / "model.safetensors").write_bytes(b"partial")
    (tmp_path / ".o.lock").write_text(str(dead))
    r = _bake(model, "--maps", root / "maps.safetensors", "-o", tmp_path / "o")
    assert r.exit_code == 0, r.output
    assert "leftover" in r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]


def test_a_live_lock_refuses_a_second_writer(setup, tmp_path):
    root, model = setup
    (tmp_path / ".o.lock").write_text(str(os.getppid()))  # a live process holds the output
    r = _bake(model, "--maps", root / "maps.safetensors", "-o", tmp_path / "o")
    _one_line_error(r, 8, f"pid {os.getppid()}")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".o.lock"]


def _cli(*args, env=None, **kw):
    return subprocess.Popen(
        [sys.executable, "-m", "actmerge.cli", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200", **(env or {})},
        **kw,
    )


def test_two_concurrent_bakes_one_fails_cleanly(setup, tmp_path):
    root, model = setup
    out = tmp_path / "o"
    procs = [_cli("bake", model, "--maps", root / "maps.safetensors", "-o", out) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stdout.read()) for p in procs]
    codes = sorted(rc for rc, _ in results)
    assert codes[0] == 0 and codes[1] in (2, 8), results
    loser = next(text for rc, text in results if rc != 0)
    assert "already exists" in loser or "another actmerge process" in loser, loser
    assert "Traceback" not in loser
    assert pipeline.verify(out, base=pipeline.Loaded(ModelSource("pico", model)), **QUIET).passed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]


def test_sigterm_during_the_write_leaves_nothing(setup, tmp_path):
    root, model = setup
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        textwrap.dedent(
            """
            import time
            import actmerge.io.weights as w
            real = w.write_shard
            def slow(*a, **k):
                real(*a, **k)
                time.sleep(60)  # hold the bake inside the write
            w.write_shard = slow
            """
        )
    )
    work = tmp_path / "work"
    work.mkdir()
    p = _cli(
        "bake", model, "--maps", root / "maps.safetensors", "-o", work / "o", env={"PYTHONPATH": str(hook)}
    )
    deadline = time.time() + 120
    while not list(work.glob(".o.tmp-*/model.safetensors")) and time.time() < deadline:
        time.sleep(0.1)
    assert list(work.glob(".o.tmp-*")), "the bake never reached the write"
    p.send_signal(signal.SIGTERM)
    rc, text = p.wait(timeout=60), p.stdout.read()
    assert rc == 143, text
    assert "terminated" in text and "Traceback" not in text
    assert list(work.iterdir()) == []


def test_bad_inputs_are_one_line_errors(setup, tmp_path):
    root, model = setup
    (tmp_path / "bin.txt").write_bytes(b"\x00\x01\x02binary")
    (tmp_path / "latin.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1") * 20)
    (tmp_path / "tgt.txt").write_bytes((root / "tgt.txt").read_bytes())  # beside the recipe
    for name, needle in (("latin.txt", "not UTF-8 (byte 3"), ("bin.txt", "binary")):
        (tmp_path / "r.yaml").write_text(RECIPE.replace("src.txt", name))
        _one_line_error(_bake(model, "--recipe", tmp_path / "r.yaml", "-o", tmp_path / "o"), 2, needle)
    (tmp_path / "bad.yaml").write_bytes(b"name: \xff\xfe\n")
    _one_line_error(_bake(model, "--recipe", tmp_path / "bad.yaml", "-o", tmp_path / "o"), 2, "not UTF-8")
    # garbage and truncated safetensors, invalid config.json
    for case in ("garbage", "truncated", "config"):
        broken = tmp_path / case
        broken.mkdir()
        for f in model.iterdir():
            (broken / f.name).write_bytes(f.read_bytes())
        st = broken / "model.safetensors"
        if case == "garbage":
            st.write_bytes(os.urandom(4096))
        elif case == "truncated":
            st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
        else:
            (broken / "config.json").write_text("{not json")
        needle = "not valid JSON" if case == "config" else "not a valid safetensors file"
        _one_line_error(_bake(broken, "--recipe", root / "r.yaml", "-o", tmp_path / "o"), 2, needle)
    # a maps file whose order metadata is malformed
    from safetensors.torch import load_file, save_file

    bad_maps = tmp_path / "m.safetensors"
    tensors = load_file(str(root / "maps.safetensors"))
    save_file(tensors, str(bad_maps), metadata={"format": "actmerge-maps/1", "order": "[not json"})
    _one_line_error(
        _bake(model, "--maps", bad_maps, "-o", tmp_path / "o"), 2, "'order' metadata is malformed"
    )
    assert not (tmp_path / "o").exists()


def test_sentence_counts_are_checked_before_any_model_load(setup, tmp_path, monkeypatch):
    from actmerge.kinds.llm import source as llm_source

    root, model = setup
    monkeypatch.setattr(llm_source, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    (tmp_path / "few.txt").write_text("one\ntwo\nthree\nfour\nfive\n")
    (tmp_path / "tgt.txt").write_bytes((root / "tgt.txt").read_bytes())  # beside the recipe
    (tmp_path / "r.yaml").write_text(RECIPE.replace("src.txt", "few.txt"))
    _one_line_error(_bake(model, "--recipe", tmp_path / "r.yaml", "-o", tmp_path / "o"), 2, "has 5 sentences")
    from actmerge.recipe import check_sentence_counts

    said = []
    assert check_sentence_counts(5, 200, 2, said.append) == 5
    assert "only 5 of each side are used" in said[0]


@pytest.mark.parametrize(
    ("strength", "needle"),
    [
        ("nan", "not a finite number"),
        ("inf", "not a finite number"),
        ("1e9", "--allow-extrapolation"),
        ("-1", "< 0"),
    ],
)
def test_bad_strengths(setup, tmp_path, strength, needle):
    root, model = setup
    _one_line_error(
        _bake(model, "--maps", root / "maps.safetensors", "-s", strength, "-o", tmp_path / "o"), 2, needle
    )
    r = runner.invoke(
        app,
        [
            "compose",
            str(root / "maps.safetensors"),
            str(root / "maps.safetensors"),
            "-s",
            f"{strength},1",
            "-o",
            str(tmp_path / "c.safetensors"),
        ],
    )
    _one_line_error(r, 2, needle)
    assert list(tmp_path.iterdir()) == []


def test_duplicate_strengths_and_extrapolation_warning(setup, tmp_path):
    root, model = setup
    r = _bake(model, "--maps", root / "maps.safetensors", "-s", "1,1", "-o", tmp_path / "o")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "o" / "config.json").is_file()  # one strength: no lambda-1 sub-directory
    r = _bake(model, "--maps", root / "maps.safetensors", "-s", "2", "--dry-run")
    assert r.exit_code == 0 and "warning: strength 2 > 1 extrapolates" in r.output
    r = _bake(model, "--maps", root / "maps.safetensors", "-s", "10", "--allow-extrapolation", "--dry-run")
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize(
    ("layers", "needle"), [("5-2", "reversed"), ("-100:", "beyond"), ("1:0", "selects no layer")]
)
def test_bad_layer_selections(setup, tmp_path, layers, needle):
    root, model = setup
    for name in ("src.txt", "tgt.txt"):  # beside the recipe
        (tmp_path / name).write_bytes((root / name).read_bytes())
    (tmp_path / "r.yaml").write_text(RECIPE.replace("layers: all", f'layers: "{layers}"'))
    _one_line_error(_bake(model, "--recipe", tmp_path / "r.yaml", "--dry-run"), 2, needle)


def test_zero_active_maps_is_an_error_unless_lambda_zero(setup, tmp_path):
    from actmerge.maps import AffineMap, MapSet

    root, model = setup
    src = ModelSource("pico", model)
    identity = MapSet(
        {k: AffineMap.identity(m.dim) for k, m in random_maps(src.config, ["attn_ctx"]).items()}
    )
    identity.save(tmp_path / "id.safetensors")
    _one_line_error(
        _bake(model, "--maps", tmp_path / "id.safetensors", "-o", tmp_path / "o"), 2, "0 of 2 maps are active"
    )
    assert _bake(model, "--maps", root / "maps.safetensors", "-s", "0", "--dry-run").exit_code == 0


def test_interrupt_in_a_multi_strength_bake_lists_what_was_written(setup, tmp_path, monkeypatch):
    root, model = setup
    real, calls = weights.write_shard, {"n": 0}

    def second_interrupted(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(weights, "write_shard", second_interrupted)
    r = _bake(model, "--maps", root / "maps.safetensors", "-s", "0.5,1", "-o", tmp_path / "o")
    assert r.exit_code == 130, r.output
    assert "already complete and kept" in r.output and "lambda-0.5" in r.output
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["lambda-0.5"]


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o755), (0o077, 0o700)])
def test_outputs_follow_the_umask(setup, tmp_path, umask, mode):
    root, model = setup
    old = os.umask(umask)
    try:
        assert _bake(model, "--maps", root / "maps.safetensors", "-o", tmp_path / "o").exit_code == 0
    finally:
        os.umask(old)
    assert (tmp_path / "o").stat().st_mode & 0o777 == mode


def test_push_refuses_weights_changed_since_verify(setup, tmp_path):
    root, model = setup
    out = tmp_path / "o"
    assert _bake(model, "--maps", root / "maps.safetensors", "-o", out, "--verify").exit_code == 0
    r = runner.invoke(app, ["push", str(out), "me/x", "--dry-run"])
    assert r.exit_code == 0, r.output
    data = bytearray((out / "model.safetensors").read_bytes())
    data[-4:] = b"\x00\x00\x80\x7f"  # one float changed
    (out / "model.safetensors").write_bytes(bytes(data))
    r = runner.invoke(app, ["push", str(out), "me/x", "--dry-run"])
    _one_line_error(r, 6, "weights changed since verification")


def test_verify_a_missing_path_and_version(tmp_path):
    r = runner.invoke(app, ["verify", str(tmp_path / "nope")])
    _one_line_error(r, 2, "does not exist")
    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and r.output.startswith("actmerge ")


def test_a_failed_bake_leaves_no_progress_bar_running(setup, tmp_path, monkeypatch):
    """A fault inside a progress bar's loop closes the bar at once. A rich `track` left suspended is
    closed later by the garbage collector, in whatever thread happens to run it, and can deadlock
    with rich's refresh thread (a hang seen in this suite)."""
    from rich.progress import _TrackThread

    root, model = setup

    def failing(*_a, **_k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(weights, "write_shard", failing)
    r = _bake(model, "--maps", root / "maps.safetensors", "-o", tmp_path / "o")
    _one_line_error(r, 8, "-o")
    assert not [t for t in threading.enumerate() if isinstance(t, _TrackThread) and t.is_alive()]
