"""The CLI under property-based fuzzing (hypothesis): generated recipe YAML, maps files, strengths,
layer selections and argument lists against pico models, run in-process. Every example must end with
an exit code of the documented table (``errors.py``, 0, typer's 2 for usage errors), no traceback,
nothing changed outside its output, and no partial output or temp file left. The budget is bounded
and derandomised (the same examples on every run); the suite prints how many examples ran."""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import shutil
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st
from safetensors.torch import save as st_save
from typer.testing import CliRunner

from actmerge import errors
from actmerge.cli import app
from actmerge.maps import FORMAT
from actmerge.sites import ARCHITECTURES

from .common import PICO_SENTENCES, make_pico, random_maps

runner = CliRunner()

# the documented exit codes: every ActmergeError's, success, and typer/click's 2 for usage errors
EXIT_CODES = {0, 2} | {
    c.exit_code for c in vars(errors).values() if isinstance(c, type) and issubclass(c, errors.ActmergeError)
}
FUZZ = settings(
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    database=None,
    phases=[
        Phase.explicit,
        Phase.generate,
    ],  # no shrinking: a failure is reported as generated, in bounded time
)
COUNT: dict[str, int] = {}


# --- the world every example runs in ------------------------------------------------------------


@dataclass
class World:
    root: Path
    llama: Path
    gpt2: Path
    maps: Path  # a valid maps file for the llama pico
    keys: list[str]  # the llama pico's map keys
    gpt2_keys: list[str]
    serial: itertools.count

    def example_dir(self) -> Path:
        """A fresh directory for one example (the previous example's is removed: snapshots stay small)."""
        shutil.rmtree(self.root / "ex", ignore_errors=True)
        d = self.root / "ex" / f"{next(self.serial)}"
        d.mkdir(parents=True)
        return d


@pytest.fixture(scope="module")
def world(tmp_path_factory, request):
    root = tmp_path_factory.mktemp("fuzz")
    llama, gpt2 = make_pico("llama", root / "llama"), make_pico("gpt2", root / "gpt2")
    data = root / "data"
    data.mkdir()
    (data / "src.txt").write_text("\n".join(PICO_SENTENCES[:12]))
    (data / "tgt.txt").write_text("\n".join(PICO_SENTENCES[12:]))
    (data / "few.txt").write_text("one\ntwo\n")
    (data / "empty.txt").write_text("")
    (data / "binary.txt").write_bytes(b"\xff\xfe\x00bad \x80\x81\n" * 4)
    (data / "prompts.txt").write_text("Hello there\nThe weather\n")
    (data / "adir").mkdir()
    (root / "outside.txt").write_text("\n".join(PICO_SENTENCES))
    cfg = json.loads((llama / "config.json").read_text())
    maps = random_maps(cfg)
    maps.base_model = str(llama)
    maps.save(root / "llama.maps.safetensors")
    gcfg = json.loads((gpt2 / "config.json").read_text())
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ACTMERGE_CACHE", str(root / "cache"))
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("COLUMNS", "200")
        mp.delenv("ACTMERGE_DEBUG", raising=False)
        mp.chdir(root)  # a relative path an example names lands inside the snapshot
        yield World(
            root,
            llama,
            gpt2,
            root / "llama.maps.safetensors",
            list(maps.maps),
            list(random_maps(gcfg).maps),
            itertools.count(),
        )
    counts = ", ".join(f"{k} {v}" for k, v in sorted(COUNT.items()))
    line = f"[test_fuzz] generated cases this run: {sum(COUNT.values())} ({counts})"
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        print("\n" + line, file=sys.stderr)  # past the capture: the count shows in every run's log


def snapshot(root: Path, skip: Path | None) -> dict[str, tuple]:
    """Every path under ``root`` (but ``skip`` and what is under it): kind, size and content hash."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            if skip is not None and (p == skip or p.is_relative_to(skip)):
                continue
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = ("link", os.readlink(p))
            elif p.is_dir():
                out[rel] = ("dir",)
            else:
                out[rel] = ("file", p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def run_cli(world: World, args: list[str], out: Path | None, kind: str):
    """Run the CLI in-process and check the properties every example must hold."""
    COUNT[kind] = COUNT.get(kind, 0) + 1
    before = snapshot(world.root, out)
    existed = out is not None and (out.exists() or out.is_symlink())
    res = runner.invoke(app, [str(a) for a in args], catch_exceptions=True)
    text = res.output
    shown = f"actmerge {' '.join(map(str, args))}\nexit {res.exit_code}\n{text}"
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        tb = "".join(traceback.format_exception(res.exception))
        pytest.fail(f"uncaught {type(res.exception).__name__} (a traceback for the user):\n{shown}\n{tb}")
    assert "Traceback" not in text, shown
    assert res.exit_code in EXIT_CODES, shown
    after = snapshot(world.root, out)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"changed outside the output: {changed}\n{shown}"
    if out is not None and res.exit_code != 0 and not existed and "already complete and kept" not in text:
        assert not out.exists() and not out.is_symlink(), f"partial output {out} left\n{shown}"
    return res


# --- strategies ------------------------------------------------------------------------------

SITE_NAMES = sorted({n for a in ARCHITECTURES for n in a.sites})
LAYERS = st.one_of(
    st.sampled_from(
        [
            "all",
            "0",
            "1",
            "0-1",
            "2-5",
            "-4:",
            "-1:",
            ":1",
            "50%-100%",
            "0%-50%",
            "0,1",
            "1,0",
            "5",
            "-1",
            "1-0",
            "",
            "abc",
            "%",
            "0-",
            "-",
            "50%",
            "100%-50%",
            "0..1",
            "1e3",
            " 1 ",
            "200%-300%",
            "0,0,0",
        ]
    ),  # fmt: skip
    st.lists(st.integers(-3, 5), max_size=3),
    st.text(max_size=6),
    st.integers(-5, 5),
    st.none(),
)
SITE = st.one_of(st.sampled_from(SITE_NAMES), st.sampled_from(["bogus", "", "attn", "ATTN_IN"]))
SITE_SPEC = st.one_of(
    st.fixed_dictionaries({"site": st.one_of(SITE, st.lists(SITE, max_size=3)), "layers": LAYERS}),
    st.fixed_dictionaries({"site": SITE}),
    SITE,
    st.fixed_dictionaries({"layers": LAYERS}),
    st.fixed_dictionaries({"site": SITE, "layers": LAYERS, "colour": st.just("red")}),
)
PATHS = st.sampled_from(
    ["data/src.txt", "data/tgt.txt", "data/few.txt", "data/empty.txt", "data/binary.txt", "data/adir",
     "data/missing.txt", "outside.txt", "/nonexistent/x.txt", "", 5]
)  # fmt: skip
NUMBERS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-10, 10**6),
    st.sampled_from(["1.0", "nan", "x", None, True]),
)
RAW_KEYS = st.sampled_from(
    ["model.layers.0.input_layernorm:output", "model.layers.1.mlp.down_proj:input",
     "model.layers.9.mlp.down_proj:input", "transformer.h.0.ln_1:output", "model.layers.0:middle", "x"]
)  # fmt: skip
RECIPE = st.fixed_dictionaries(
    {
        "lineas": st.one_of(
            st.just({"steps": 1, "batch": 2}),
            st.fixed_dictionaries({"steps": st.integers(-1, 2), "batch": st.integers(0, 4)}),
            st.just({"steps": 1, "batch": 2, "lr": "fast"}),
        ),
    },
    optional={
        "name": st.one_of(st.just("fz"), st.text(max_size=8), st.integers(), st.none()),
        "method": st.sampled_from(["linear_act", "mean_act", "gaussian_act", "lineas", "bogus", 3]),
        "sites": st.one_of(
            st.lists(SITE_SPEC, max_size=3),
            SITE_SPEC,
            st.dictionaries(
                st.sampled_from(["llama", "gpt2", "default", "nope"]), st.lists(SITE_SPEC, max_size=2)
            ),
        ),
        "modules": st.one_of(st.lists(RAW_KEYS, max_size=2), RAW_KEYS),
        "source": PATHS,
        "target": PATHS,
        "eval_prompts": PATHS,
        "max_sentences": st.one_of(st.integers(-1, 30), NUMBERS),
        "min_sentences": st.integers(-1, 30),
        "batch_size": st.one_of(st.integers(-1, 16), NUMBERS),
        "max_tokens": st.integers(-1, 40),
        "strength": st.one_of(NUMBERS, st.dictionaries(st.sampled_from(["llama", "default"]), NUMBERS)),
        "top_neurons": NUMBERS,
        "fit_shift": st.one_of(st.booleans(), st.just("maybe")),
        "pooling": st.sampled_from(["mean", "last", "max"]),
        "incremental": st.booleans(),
        "targets": st.lists(st.sampled_from(["transformers", "vllm", "llama.cpp", "tpu"]), max_size=2),
        "colour": st.just("red"),
    },
)
GARBAGE_YAML = st.one_of(
    st.text(max_size=40),
    st.sampled_from(
        [
            "a: [",
            "- 1\n- 2\n",
            "null",
            "42",
            "name: x\nsource: [",
            "{{{",
            ": :",
            "name: !!python/object:os.system x",
            "[" * 50 + "]" * 50,
            "[" * 600 + "]" * 600,
            "a:\n" + "".join("  " * i + "b:\n" for i in range(1, 600)),
        ]
    ),  # fmt: skip
    st.binary(max_size=40).map(lambda b: b.decode("latin-1")),
)


def recipe_text(d: dict) -> str:
    return yaml.safe_dump(d, allow_unicode=True, sort_keys=False)


def valid_recipe(**over) -> dict:
    base = {
        "name": "fz",
        "method": "linear_act",
        "sites": [{"site": ["attn_ctx", "mlp_hidden"], "layers": "all"}],
        "source": "data/src.txt",
        "target": "data/tgt.txt",
        "min_sentences": 12,
        "batch_size": 8,
        "lineas": {"steps": 1, "batch": 2},
    }
    base.update(over)
    return base


def write_recipe(world: World, ex: Path, text: str) -> Path:
    """Recipes live in the world's root, so their relative paths (data/…) resolve; one per example."""
    path = world.root / f"recipe-{ex.name}.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    return path


STRENGTH_TEXT = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.lists(st.floats(-2, 6, allow_nan=False), min_size=1, max_size=3).map(
        lambda xs: ",".join(map(str, xs))
    ),
    st.sampled_from(
        [
            "auto",
            "",
            " ",
            "1,,2",
            "1e309",
            "-0",
            "0x10",
            "nan",
            "inf",
            "-inf",
            "4.0000001",
            "1e-320",
            "0.5,0.5000001",
            "1,nan",
            "abc",
            "1;2",
            "½",
            "0.5, 1.0",
            ",",
            "5,5",
            "-1",
        ]
    ),  # fmt: skip
    st.text(max_size=6),
)


MAPS_FAULTS = [
    "none", "width", "2-D", "scalar", "float16", "bfloat16", "int64", "nan", "inf", "huge", "no-beta",
    "foreign-key", "garbage-key", "no-format", "format", "base-model", "no-base-model", "order", "no-order",
    "empty", "bytes",
]  # fmt: skip


@st.composite
def maps_bytes(draw, keys: list[str], foreign: list[str]) -> bytes:
    """A maps file for the llama pico with zero to three faults: widths, shapes, dtypes, non-finite or
    huge values, an omega without its beta, another model's or garbage keys, and every metadata field
    wrong or missing; or garbage bytes. Faults are applied to a valid file so that each is reached."""
    faults = draw(st.lists(st.sampled_from(MAPS_FAULTS), min_size=1, max_size=3))
    if "bytes" in faults:
        return draw(st.binary(max_size=64))
    chosen = draw(st.lists(st.sampled_from(keys), min_size=1, max_size=4, unique=True))
    if "foreign-key" in faults:
        chosen.append(draw(st.sampled_from(foreign)))
    if "garbage-key" in faults:
        chosen.append(
            draw(st.sampled_from(["x", "model.layers.9.mlp.down_proj:input", "a:middle", ":output"]))
        )
    if "empty" in faults:
        chosen = []
    g = torch.Generator().manual_seed(draw(st.integers(0, 3)))
    victim = draw(st.integers(0, 9))  # the map a per-map fault hits
    tensors: dict[str, torch.Tensor] = {}
    for n, key in enumerate(chosen):
        hit = set(faults) if n == victim % max(len(chosen), 1) else set()
        dim = draw(st.sampled_from([7, 64, 0, 31])) if "width" in hit else 32
        shape = (2, dim) if "2-D" in hit else () if "scalar" in hit else (dim,)
        for part in ("omega", "beta"):
            if part == "beta" and "no-beta" in hit:
                continue
            dtype = next((DTYPES[f] for f in sorted(hit) if f in DTYPES), torch.float32)
            tensors[f"{key}:{part}"] = _values(shape, part, hit, g).to(dtype)
    meta = {"format": FORMAT, "base_model": "pico", "method": "linear_act", "order": json.dumps(chosen)}
    if "no-format" in faults:
        del meta["format"]
    if "format" in faults:
        meta["format"] = draw(st.sampled_from(["actmerge-maps/2", "", "ACTMERGE-MAPS/1"]))
    if "base-model" in faults:
        meta["base_model"] = draw(st.sampled_from(["some/other-model", "gpt2", "", "../../etc"]))
    if "no-base-model" in faults:
        del meta["base_model"]
    if "order" in faults:
        meta["order"] = draw(st.sampled_from(["[", '{"a": 1}', "[1, 2]", "null", "[]", '["nope"]']))
    if "no-order" in faults:
        del meta["order"]
    return st_save(tensors, metadata=meta)


DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "int64": torch.int64}


def _values(shape, part: str, hit: set, g) -> torch.Tensor:
    """omega near 1 or beta near 0, with the first value poisoned where a fault asks."""
    t = (1.0 if part == "omega" else 0.0) + 0.2 * torch.randn(shape, generator=g)
    for fault, value in (("nan", float("nan")), ("inf", float("inf")), ("huge", 1e30)):
        if fault in hit and t.numel():
            t.view(-1)[0] = value
    return t


# --- properties ----------------------------------------------------------------------------------


@settings(FUZZ, max_examples=40)
@given(data=st.data())
@example(data=None)  # the valid recipe itself (fits and writes)
def test_fuzz_recipes(world, data):
    """Generated recipes through fit, bake --dry-run and recipes show."""
    ex = world.example_dir()
    if data is None:
        d, raw, verb, model = valid_recipe(), None, "fit", world.llama
    else:
        d = data.draw(
            st.one_of(RECIPE, st.builds(valid_recipe, sites=st.lists(SITE_SPEC, min_size=1, max_size=2)))
        )
        raw = data.draw(st.one_of(st.none(), st.none(), st.none(), GARBAGE_YAML))
        verb = data.draw(st.sampled_from(["fit", "bake", "show"]))
        model = data.draw(st.sampled_from([world.llama, world.gpt2]))
    recipe = write_recipe(world, ex, raw if raw is not None else recipe_text(d))
    if verb == "fit":
        out = ex / "maps.safetensors"
        res = run_cli(world, ["fit", model, "--recipe", recipe, "-o", out], out, "recipe:fit")
        assert (res.exit_code == 0) == out.is_file(), res.output
    elif verb == "bake":
        run_cli(world, ["bake", model, "--recipe", recipe, "--dry-run"], None, "recipe:bake-dry-run")
    else:
        run_cli(world, ["recipes", "show", recipe], None, "recipe:show")
    recipe.unlink()


@settings(FUZZ, max_examples=40)
@given(data=st.data())
def test_fuzz_layer_selections(world, data):
    """Layer selections of every shape through a bake --dry-run of a recipe (the fit is tiny)."""
    ex = world.example_dir()
    layers = data.draw(LAYERS)
    sites = data.draw(
        st.lists(st.sampled_from(["attn_in", "attn_ctx", "mlp_hidden", "mlp_out"]), min_size=1, max_size=2)
    )
    recipe = write_recipe(world, ex, recipe_text(valid_recipe(sites=[{"site": sites, "layers": layers}])))
    model = data.draw(st.sampled_from([world.llama, world.gpt2]))
    run_cli(world, ["bake", model, "--recipe", recipe, "--dry-run"], None, "layers:bake-dry-run")
    recipe.unlink()


@pytest.mark.parametrize("verb", ["bake", "bake-out", "compose", "cv", "eval"])
@settings(FUZZ, max_examples=12)
@given(data=st.data())
def test_fuzz_maps_files(world, data, verb):
    """Generated maps files through bake (--dry-run or a real bake), compose, export-control-vector
    and eval (one parameter per verb: each gets its share of the examples)."""
    ex = world.example_dir()
    maps = ex / "m.safetensors"
    maps.write_bytes(data.draw(maps_bytes(world.keys, world.gpt2_keys)))
    s = data.draw(st.sampled_from(["1", "0.5", "0", "1,0.5"]))
    if verb == "bake":
        run_cli(world, ["bake", world.llama, "--maps", maps, "-s", s, "--dry-run"], None, "maps:bake-dry-run")
    elif verb == "bake-out":
        out = ex / "baked"
        args = ["bake", world.llama, "--maps", maps, "-s", s, "-o", out]
        run_cli(world, args, out, "maps:bake")
    elif verb == "compose":
        other = data.draw(st.sampled_from([world.maps, maps]))
        out = ex / "c.safetensors"
        run_cli(world, ["compose", maps, other, "-s", "1,0.5", "-o", out], out, "maps:compose")
    elif verb == "cv":
        out = ex / "cv.gguf"
        args = ["export-control-vector", maps, "--model", world.llama, "-o", out, "-s", s.split(",")[0]]
        run_cli(world, args + data.draw(st.sampled_from([[], ["--partial"]])), out, "maps:control-vector")
    else:
        out = ex / "report"
        args = [
            "eval",
            world.llama,
            "--maps",
            maps,
            "--strengths",
            s,
            "--prompts",
            world.root / "data/prompts.txt",
        ]
        args += ["--max-new-tokens", "1", "--limit", "1", "--metrics", "perplexity", "-o", out]
        run_cli(world, args, out, "maps:eval")


@pytest.mark.parametrize("verb", ["bake", "compose", "cv", "eval"])
@settings(FUZZ, max_examples=12)
@given(strength=STRENGTH_TEXT)
@example(strength="-1")
@example(strength="1e309")
@example(strength="0.5,0.5000001")
def test_fuzz_strengths(world, strength, verb):
    """Strength text of every shape through each verb that takes one."""
    ex = world.example_dir()
    if verb == "bake":
        out = ex / "baked"
        run_cli(
            world,
            ["bake", world.llama, "--maps", world.maps, "-s", strength, "-o", out],
            out,
            "strength:bake",
        )
    elif verb == "compose":
        out = ex / "c.safetensors"
        args = ["compose", world.maps, world.maps, "-s", strength, "-o", out]
        run_cli(world, args, out, "strength:compose")
    elif verb == "cv":
        out = ex / "cv.gguf"
        args = ["export-control-vector", world.maps, "--model", world.llama, "-o", out, "-s", strength]
        res = run_cli(world, args + ["--partial"], out, "strength:control-vector")
        if res.exit_code == 0:  # a written vector is finite
            import gguf

            reader = gguf.GGUFReader(str(out))
            assert all(bool(torch.isfinite(torch.from_numpy(t.data.copy())).all()) for t in reader.tensors)
    else:
        out = ex / "report"
        args = ["eval", world.llama, "--maps", world.maps, "--strengths", strength, "--prompts"]
        args += [
            world.root / "data/prompts.txt",
            "--max-new-tokens",
            "1",
            "--limit",
            "1",
            "--metrics",
            "perplexity",
        ]
        res = run_cli(world, args + ["-o", out], out, "strength:eval")
        if res.exit_code == 0:
            rows = json.loads((out / "report.json").read_text())["rows"]
            assert all(r.get("strength") is None or r["strength"] == r["strength"] for r in rows), rows


# the CLI's vocabulary: per verb, its options and the values they may take (paths into the world)
def _vocab(world: World, ex: Path) -> dict[str, list]:
    model = st.sampled_from([str(world.llama), str(world.gpt2), "no-such-model", "", str(ex / "nope")])
    path = st.sampled_from(
        [str(world.maps), str(world.root / "data/src.txt"), str(world.root / "data"), "x", ""]
    )
    text = st.one_of(STRENGTH_TEXT, st.text(max_size=6))
    return {
        "fit": [model, ("--recipe", st.sampled_from(["detox", str(world.root / "data/src.txt"), "nope"])),
                ("-o", st.just(str(ex / "out.safetensors"))), ("--device", st.sampled_from(["cpu", "tpu", ""])),
                ("--max-memory", text), "--force"],
        "bake": [model, ("--maps", path), ("-s", text), "--dry-run", ("-o", st.just(str(ex / "out"))),
                 ("--target", st.sampled_from(["llama.cpp", "vllm", "tpu"])), ("--shift-policy", text),
                 "--no-flags", "--as-llama", "--allow-extrapolation", ("--max-ppl-ratio", text),
                 ("--device-map", text), "--force"],
        "compose": [path, path, ("-s", text), ("-o", st.just(str(ex / "out.safetensors"))), "--force",
                    "--allow-extrapolation"],
        "sites": [model, ("--target", st.sampled_from(["llama.cpp", "vllm", "tpu", ""]))],
        "recipes": [st.sampled_from(["show", "list", ""]), st.sampled_from(["detox", "nope", str(world.maps), ""])],
        "export-control-vector": [path, ("--model", model), ("-o", st.just(str(ex / "cv.gguf"))), ("-s", text),
                                  "--partial", "--force"],
        "eval": [model, ("--maps", path), ("--strengths", text), ("--prompts", path), ("--metrics", text),
                 ("--max-new-tokens", st.sampled_from(["1", "0", "-1", "x"])), ("--limit", st.sampled_from(["1", "0", "-3"])),
                 ("-o", st.just(str(ex / "report"))), ("--baked", path), "--no-clamped"],
    }  # fmt: skip


OUTPUTS = {"fit": "out.safetensors", "bake": "out", "compose": "out.safetensors",
           "export-control-vector": "cv.gguf", "eval": "report"}  # fmt: skip


@pytest.mark.parametrize(
    "verb", ["fit", "bake", "compose", "sites", "recipes", "export-control-vector", "eval"]
)
@settings(FUZZ, max_examples=10)
@given(data=st.data())
def test_fuzz_argument_lists(world, data, verb):
    """Argument lists drawn from each verb's vocabulary (options in any order, missing, repeated or
    with bad values, plus stray tokens). Slow defaults are kept tiny: eval always gets one new token
    and one prompt unless the list sets them; fit and bake only ever see the pico models."""
    ex = world.example_dir()
    args: list[str] = [verb]
    for item in data.draw(st.lists(st.sampled_from(_vocab(world, ex)[verb]), max_size=6)):
        if isinstance(item, str):
            args.append(item)
        elif isinstance(item, tuple):
            args += [item[0], data.draw(item[1])]
        else:
            args.append(data.draw(item))
    if data.draw(st.integers(0, 5)) == 0:
        args.insert(
            data.draw(st.integers(1, len(args))), data.draw(st.sampled_from(["--bogus", "-", "--", "-x"]))
        )
    if verb == "eval":
        args += ["--max-new-tokens", "1", "--limit", "1", "--metrics", "perplexity"]
        if not any(a == "--maps" for a in args):
            args += ["--strengths", ""]
    if verb in ("fit", "bake") and "--recipe" in args and "--dry-run" not in args and verb == "bake":
        args.append("--dry-run")
    out = ex / OUTPUTS[verb] if verb in OUTPUTS else None
    run_cli(world, args, out, f"args:{verb}")


# --- regression tests: cases the fuzzing (and issue 25) found --------------------------------------


def _maps_file(
    path: Path, width: int, key: str = "model.layers.0.mlp.down_proj:output", base: str = "a"
) -> Path:
    from actmerge.maps import AffineMap, MapSet

    MapSet({key: AffineMap(torch.ones(width) * 1.1, torch.full((width,), 0.1))}, base_model=base).save(path)
    return path


def test_compose_of_maps_of_different_widths_is_refused(world):
    ex = world.example_dir()
    a, b = (
        _maps_file(ex / "a.safetensors", 640, base="m640"),
        _maps_file(ex / "b.safetensors", 576, base="m576"),
    )
    out = ex / "c.safetensors"
    res = run_cli(world, ["compose", a, b, "-s", "1,1", "-o", out], out, "regression")
    assert res.exit_code == errors.MapsMismatchError.exit_code, res.output
    assert "640 and 576" in res.output and "m640" in res.output and "different models" in res.output


def test_bake_eval_checks_missing_eval_prompts_before_the_fit(world):
    ex = world.example_dir()
    recipe = write_recipe(world, ex, recipe_text(valid_recipe(eval_prompts="data/missing.txt")))
    out = ex / "baked"
    res = run_cli(world, ["bake", world.llama, "--recipe", recipe, "--eval", "-o", out], out, "regression")
    assert res.exit_code == errors.RecipeError.exit_code, res.output
    assert "missing.txt" in res.output and "fitted" not in res.output  # refused before the fit
    recipe.unlink()


def test_export_gguf_of_an_invalid_config_is_a_clear_error(world):
    ex = world.example_dir()
    ck = ex / "ck"
    ck.mkdir()
    (ck / "config.json").write_text("{not json")
    out = ex / "m.gguf"
    res = run_cli(world, ["export-gguf", ck, "-o", out], out, "regression")
    assert res.exit_code == errors.CheckpointFormatError.exit_code and "not valid JSON" in res.output, (
        res.output
    )
    (ck / "config.json").write_text('{"model_type": "zzz"}')
    res = run_cli(world, ["export-gguf", ck, "-o", out], out, "regression")
    assert res.exit_code == errors.UnknownArchitectureError.exit_code and "zzz" in res.output, res.output


def test_eval_into_an_existing_file_is_refused_before_loading(world):
    ex = world.example_dir()
    existing = ex / "notes.txt"
    existing.write_text("mine")
    args = [
        "eval",
        world.llama,
        "--maps",
        world.maps,
        "--strengths",
        "1",
        "--prompts",
        world.root / "data/prompts.txt",
    ]
    res = run_cli(world, args + ["-o", existing], None, "regression")
    assert res.exit_code == errors.OutputExistsError.exit_code, res.output
    assert "not a directory" in res.output and "base:" not in res.output  # no row was evaluated
    assert existing.read_text() == "mine"


def test_eval_baked_with_an_unknown_model_type_is_refused_before_loading(world):
    ex = world.example_dir()
    ck = ex / "ck"
    ck.mkdir()
    cfg = json.loads((world.llama / "config.json").read_text()) | {"model_type": "zzz"}
    (ck / "config.json").write_text(json.dumps(cfg))
    out = ex / "report"
    args = [
        "eval",
        world.llama,
        "--strengths",
        "",
        "--baked",
        ck,
        "--prompts",
        world.root / "data/prompts.txt",
    ]
    res = run_cli(world, args + ["-o", out], out, "regression")
    assert res.exit_code == errors.UnknownArchitectureError.exit_code, res.output
    assert "'zzz'" in res.output and "base:" not in res.output


def test_eval_baked_without_weights_is_refused_and_its_card_untouched(world):
    """A foreign directory with a config.json but no weights (issue 25, found by hand with --lm-eval):
    a one-line error before any load, and its README.md is not rewritten."""
    ex = world.example_dir()
    ck = ex / "foreign"
    ck.mkdir()
    (ck / "config.json").write_text((world.llama / "config.json").read_text())
    (ck / "README.md").write_text("my card\n")
    out = ex / "report"
    args = [
        "eval",
        world.llama,
        "--strengths",
        "",
        "--baked",
        ck,
        "--prompts",
        world.root / "data/prompts.txt",
    ]
    args += ["--lm-eval", "tinytask", "--lm-eval-include", Path(__file__).parent / "data" / "lmeval"]
    res = run_cli(world, args + ["-o", out], out, "regression")
    assert res.exit_code == errors.ModelResolutionError.exit_code, res.output
    assert "no *.safetensors weights" in res.output and (ck / "README.md").read_text() == "my card\n"


@pytest.mark.parametrize("verb", ["bake", "eval", "cv"])
def test_maps_from_another_model_name_it_before_slow_work(world, verb):
    """gpt2 maps given with the llama model: "these maps were fitted on <gpt2>, not <llama>", before any
    row is evaluated or anything written."""
    ex = world.example_dir()
    from actmerge.maps import MapSet

    cfg = json.loads((world.gpt2 / "config.json").read_text())
    foreign = random_maps(cfg)
    foreign.base_model = str(world.gpt2)
    maps = ex / "gpt2.safetensors"
    foreign.save(maps)
    assert isinstance(MapSet.load(maps), MapSet)
    out = {"bake": ex / "baked", "eval": ex / "report", "cv": ex / "cv.gguf"}[verb]
    args = {
        "bake": ["bake", world.llama, "--maps", maps, "-o", out],
        "eval": ["eval", world.llama, "--maps", maps, "--strengths", "1", "--prompts",
                 world.root / "data/prompts.txt", "-o", out],
        "cv": ["export-control-vector", maps, "--model", world.llama, "-o", out],
    }[verb]  # fmt: skip
    res = run_cli(world, args, out, "regression")
    assert res.exit_code == errors.MapsMismatchError.exit_code, res.output
    flat = " ".join(res.output.split())
    assert f"fitted on {world.gpt2}, not {world.llama}" in flat and "base:" not in flat, res.output


def test_maps_of_the_wrong_width_and_of_another_base_model(world):
    """Same modules, wrong widths: an error naming both models (before the dry-run plan, which used to
    print and exit 0); same modules and widths but another base_model: a warning, and it bakes."""
    ex = world.example_dir()
    key = world.keys[0]
    wrong = _maps_file(ex / "wrong.safetensors", 33, key=key, base="other/model")
    res = run_cli(world, ["bake", world.llama, "--maps", wrong, "--dry-run"], None, "regression")
    assert res.exit_code == errors.MapsMismatchError.exit_code, res.output
    flat = " ".join(res.output.split())
    assert (
        f"fitted on other/model, not {world.llama}" in flat and "dim 33" in flat and "fold plan" not in flat
    )
    right = _maps_file(ex / "right.safetensors", 32, key=key, base="other/model")
    res = run_cli(world, ["bake", world.llama, "--maps", right, "--dry-run"], None, "regression")
    flat = " ".join(res.output.split())
    assert res.exit_code == 0 and f"fitted on other/model, not {world.llama}" in flat and "warning" in flat
    same = _maps_file(ex / "same.safetensors", 32, key=key, base=str(world.llama))
    res = run_cli(world, ["bake", world.llama, "--maps", same, "--dry-run"], None, "regression")
    assert res.exit_code == 0 and "fitted on" not in res.output, res.output


@pytest.mark.parametrize("verb", ["cv", "compose", "eval"])
def test_nonfinite_maps_are_refused_when_read(world, verb):
    """A maps file holding NaN is refused on reading (exit 2), before it can become a NaN control
    vector, NaN composed maps or NaN report rows."""
    ex = world.example_dir()
    from actmerge.maps import MapSet

    m = MapSet.load(world.maps)
    key = next(k for k in m.maps if "down_proj:output" in k)
    m.maps[key].beta[0] = float("nan")
    maps = m.save(ex / "nan.safetensors")
    out = {"cv": ex / "cv.gguf", "compose": ex / "c.safetensors", "eval": ex / "report"}[verb]
    args = {
        "cv": ["export-control-vector", maps, "--model", world.llama, "-o", out, "--partial"],
        "compose": ["compose", world.maps, maps, "-s", "1,1", "-o", out],
        "eval": ["eval", world.llama, "--maps", maps, "--strengths", "1", "--prompts",
                 world.root / "data/prompts.txt", "--max-new-tokens", "1", "--limit", "1", "-o", out],
    }[verb]  # fmt: skip
    res = run_cli(world, args, out, "regression")
    assert res.exit_code == errors.MapsMismatchError.exit_code and "NaN/Inf" in res.output, res.output


# --- found by the fuzzing: regression tests ---------------------------------------------------------

DEEP_LIST = "[" * 600 + "]" * 600
DEEP_MAP = "a:\n" + "".join("  " * i + "b:\n" for i in range(1, 600))


@pytest.mark.parametrize(
    "text",
    [b"- 1\n- 2\n", b"42\n", b"a: [\n", b"name: \xff\xfe\n", DEEP_LIST.encode(), DEEP_MAP.encode()],
    ids=["list", "scalar", "broken", "non-utf8", "deep-list", "deep-map"],
)
def test_recipes_show_of_a_bad_yaml_file(world, text):
    ex = world.example_dir()
    recipe = ex / "r.yaml"
    recipe.write_bytes(text)
    res = run_cli(world, ["recipes", "show", recipe], None, "regression")
    assert res.exit_code == errors.RecipeError.exit_code, res.output


@pytest.mark.parametrize("text", [DEEP_LIST, DEEP_MAP], ids=["deep-list", "deep-map"])
def test_bake_of_a_deeply_nested_recipe(world, text):
    ex = world.example_dir()
    recipe = write_recipe(world, ex, text)
    res = run_cli(world, ["bake", world.llama, "--recipe", recipe, "--dry-run"], None, "regression")
    recipe.unlink()
    assert res.exit_code == errors.RecipeError.exit_code, res.output


def test_control_vector_of_a_nan_strength(world):
    ex = world.example_dir()
    out = ex / "cv.gguf"
    args = ["export-control-vector", world.maps, "--model", world.llama, "-o", out, "-s", "nan", "--partial"]
    res = run_cli(world, args, out, "regression")
    assert res.exit_code == errors.RecipeError.exit_code and not out.exists(), res.output


def test_eval_of_a_nan_strength(world):
    ex = world.example_dir()
    out = ex / "report"
    args = ["eval", world.llama, "--maps", world.maps, "--strengths", "nan", "--prompts"]
    args += [
        world.root / "data/prompts.txt",
        "--max-new-tokens",
        "1",
        "--limit",
        "1",
        "--metrics",
        "perplexity",
    ]
    res = run_cli(world, args + ["-o", out], out, "regression")
    assert res.exit_code == errors.RecipeError.exit_code, res.output


def test_bake_of_strengths_that_print_alike(world):
    ex = world.example_dir()
    out = ex / "baked"
    args = ["bake", world.llama, "--maps", world.maps, "-s", "0.5,0.5000001", "-o", out]
    res = run_cli(world, args, out, "regression")
    assert (res.exit_code == 0 and len(list(out.iterdir())) == 2) or (res.exit_code == 2 and not out.exists())


def test_failed_multi_strength_bake_leaves_no_output_dir(world):
    """Maps that overflow float32 when folded fail the first strength; -o must not be left behind."""
    ex = world.example_dir()
    from actmerge.maps import AffineMap, MapSet

    big = torch.full((32,), 3.4e38)  # the norm's gains (≈ 1) times this overflow float32
    maps = MapSet({world.keys[0]: AffineMap(big, big.clone())}, base_model=str(world.llama)).save(
        ex / "huge.safetensors"
    )
    out = ex / "baked"
    res = run_cli(world, ["bake", world.llama, "--maps", maps, "-s", "1,0.5", "-o", out], out, "regression")
    assert res.exit_code == errors.NotFoldableError.exit_code, res.output
    assert not out.exists(), sorted(p.name for p in out.iterdir())
