"""The fast writer: chunked fold = unchunked fold byte for byte, untouched shards copied whole, added
tensors in one shard whose data section moves by whole pages, writer-thread errors surface."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from actmerge import fold, pipeline
from actmerge.errors import NotFoldableError
from actmerge.io import st_format, st_reader, st_rewrite, st_writer
from actmerge.io.tree import INDEX
from actmerge.models import ModelSource
from actmerge.sites import architecture_for

from .common import MODEL_TYPES, char_tokenizer, make_pico, pico_config, random_maps, stable_seed

STRENGTHS = [0.5, 1.0, 1.7]
QUIET = dict(progress=False, log=lambda *_: None)


def _bytes(v) -> bytes:
    if isinstance(v, st_rewrite.Streamed):
        blocks = list(v.blocks())
        assert len(blocks) >= 1 and all(b.dtype == v.dtype for b in blocks)
        return b"".join(st_format.to_bytes(b) for b in blocks)
    return st_format.to_bytes(v)


def _same(e: fold.Edit, read, chunk: int, scratch: fold.Scratch | None = None) -> int:
    """compute_chunked(chunk) gives compute's bytes; returns how many values came as blocks."""
    ref = fold.compute(e, read)
    got = fold.compute_chunked(e, read, chunk=chunk, scratch=scratch)
    assert set(got) == set(ref)
    for name in ref:
        assert _bytes(got[name]) == st_format.to_bytes(ref[name]), name
    return sum(isinstance(v, st_rewrite.Streamed) for v in got.values())


@pytest.fixture(scope="module")
def picos(tmp_path_factory):
    root = tmp_path_factory.mktemp("picos")
    return {mt: make_pico(mt, root / mt, seed=i) for i, mt in enumerate(MODEL_TYPES)}


def test_chunked_fold_same_bytes_for_every_row_site_and_strength(picos):
    """Every (row × site × λ) pico case of test_fold_archs: every edit, chunked into one-row and
    few-row blocks, gives the bytes of the one-piece fold."""
    streamed = 0
    scratch = fold.Scratch()  # one buffer for every b + W c, as in a bake
    for mt in MODEL_TYPES:
        src = ModelSource(mt, picos[mt])
        infos, where = st_format.tensor_index(src.safetensors_files())
        for site in architecture_for(mt).sites:
            maps = random_maps(src.config, [site], seed=stable_seed(site))
            for lam in STRENGTHS:
                plan = pipeline.plan(src, maps, lam)
                with st_reader.Reader(where) as read:
                    for e in plan.edits.values():
                        for chunk in (1, 50):
                            streamed += _same(e, read, chunk, scratch)
    assert streamed > 100  # the blocked path really ran


def _linear_edit(out_dim, in_dim, dtype, conv1d=False, new_bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (in_dim, out_dim) if conv1d else (out_dim, in_dim)
    tensors = {"l.weight": (torch.randn(shape, generator=g) * 0.05).to(dtype)}
    if not new_bias:
        tensors["l.bias"] = torch.randn(out_dim, generator=g).to(dtype)

    def op(n):
        return (1 + 0.3 * torch.randn(n, generator=g), 0.2 * torch.randn(n, generator=g))

    e = fold.Edit("linear", "l.weight", "l.bias", conv1d=conv1d, new_bias=new_bias)
    e.inputs, e.outputs = [op(in_dim), (1 + 0.1 * torch.randn(in_dim, generator=g), None)], [op(out_dim)]
    return e, tensors


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
@pytest.mark.parametrize(("conv1d", "new_bias"), [(False, False), (False, True), (True, False)])
def test_chunked_fold_same_bytes_on_a_tensor_of_many_chunks(dtype, conv1d, new_bias):
    e, tensors = _linear_edit(700, 384, dtype, conv1d, new_bias)
    chunk = 384 * 64  # ~11 blocks, the last one partial
    got = fold.compute_chunked(e, tensors.__getitem__, chunk=chunk)
    assert isinstance(got["l.weight"], st_rewrite.Streamed) and len(list(got["l.weight"].blocks())) > 5
    assert _same(e, tensors.__getitem__, chunk) == 1
    # and through the writer (writer thread, blocks at their offsets) the file bytes are the same
    _same_file(tensors, fold.compute(e, tensors.__getitem__), got)


def _same_file(tensors, ref, got):
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        save_file({**tensors, "z.other": torch.arange(10.0)}, str(d / "s.safetensors"))
        shard = st_format.read_shard(d / "s.safetensors")
        st_rewrite.write_shard(shard, ref, d / "a.safetensors")
        st_rewrite.write_shard(shard, got, d / "b.safetensors")
        assert (d / "a.safetensors").read_bytes() == (d / "b.safetensors").read_bytes()


def test_chunked_fold_refuses_overflow_while_writing(tmp_path):
    e, tensors = _linear_edit(300, 200, torch.float16)
    e.outputs, e.bias = [(torch.full((300,), 1e6), None)], None  # the weight overflows fp16
    del tensors["l.bias"]
    with pytest.raises(NotFoldableError, match="NaN/Inf"):
        fold.compute(e, tensors.__getitem__)
    got = fold.compute_chunked(e, tensors.__getitem__, chunk=2000)
    save_file(tensors, str(tmp_path / "s.safetensors"))
    with pytest.raises(NotFoldableError, match="NaN/Inf"):  # raised from the blocks, writer stopped
        st_rewrite.write_shard(
            st_format.read_shard(tmp_path / "s.safetensors"), got, tmp_path / "o.safetensors"
        )


def test_writer_thread_error_reaches_the_caller(tmp_path, monkeypatch):
    save_file({"a": torch.zeros(1000), "b": torch.ones(1000)}, str(tmp_path / "s.safetensors"))

    def broken(*_a, **_k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(st_writer, "pwrite_all", broken)
    with pytest.raises(OSError, match="No space"):
        st_rewrite.write_shard(
            st_format.read_shard(tmp_path / "s.safetensors"), {"a": torch.ones(1000)}, tmp_path / "o"
        )


@pytest.mark.parametrize("path", ["as found", "no reflink", "no copy_file_range"])
def test_copy_file_whole(tmp_path, monkeypatch, path):
    """A whole-file copy through the writer: a reflink, else in-kernel ranges, else read + write."""
    if path != "as found":
        monkeypatch.setattr(st_writer, "reflink", lambda *_: False)
    if path == "no copy_file_range":

        def unsupported(*_a):
            raise OSError(18, "Invalid cross-device link")

        monkeypatch.setattr(st_writer.os, "copy_file_range", unsupported)
    data = torch.randn(300_000).numpy().tobytes()
    (tmp_path / "a").write_bytes(data)
    with st_writer.Writer() as w:
        w.copy_file(tmp_path / "a", tmp_path / "b")
    assert (tmp_path / "b").read_bytes() == data


@pytest.mark.parametrize("header_pad", [0, 3000])
def test_appended_tensors_keep_data_page_aligned(tmp_path, header_pad):
    tensors = {f"t{i}": torch.randn(50 + i, 30) for i in range(4)}
    save_file(tensors, str(tmp_path / "s.safetensors"), metadata={"format": "pt", "pad": "x" * header_pad})
    shard = st_format.read_shard(tmp_path / "s.safetensors")
    values = {"t2": torch.zeros(52, 30), "new.bias": torch.arange(7.0)}
    st_rewrite.write_shard(shard, values, tmp_path / "o.safetensors")
    out = st_format.read_shard(tmp_path / "o.safetensors")
    assert (out.data_start - shard.data_start) % st_format.ALIGN == 0 and out.data_start % 8 == 0
    got = load_file(str(tmp_path / "o.safetensors"))
    for name, t in {**tensors, **values}.items():
        assert torch.equal(got[name], t), name


def test_untouched_shards_copied_whole_added_tensors_in_one_shard(tmp_path):
    path = tmp_path / "llama"
    torch.manual_seed(0)
    cfg = pico_config("llama")
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path, max_shard_size="20KB")
    char_tokenizer().save_pretrained(path)
    src = ModelSource("pico", path)
    files = src.safetensors_files()
    # a shift at layer 0's attn_in only: q,k,v,o biases of every layer appear (attention_bias)
    maps = random_maps(src.config, ["attn_in"], seed=3)
    maps = type(maps)({k: v for k, v in maps.items() if ".layers.0." in k}, maps.base_model, maps.method)
    (res,) = pipeline.bake(
        pipeline.Loaded(src),
        maps=maps,
        options=pipeline.BakeOptions(out=tmp_path / "o", verify_after=False),
        **QUIET,
    )
    added = set(res.plan.new_tensors)
    assert len(added) >= 8
    index = json.loads((res.out / INDEX).read_text())
    homes = {index["weight_map"][n] for n in added}
    assert len(homes) == 1
    (home,) = homes
    edited = {n for n in res.plan.edited_tensors() if n not in added}
    whole = 0
    for f in files:
        a, b = st_format.read_shard(f), st_format.read_shard(res.out / f.name)
        if f.name == home:
            assert set(b.tensors()) == set(a.tensors()) | added
            assert (b.data_start - a.data_start) % st_format.ALIGN == 0
        elif not edited & set(a.tensors()):
            assert (res.out / f.name).read_bytes() == f.read_bytes()
            whole += 1
        else:  # rewritten only for its edited tensors: same header, same size
            assert (res.out / f.name).read_bytes()[: a.data_start] == f.read_bytes()[: a.data_start]
            assert (res.out / f.name).stat().st_size == f.stat().st_size
    assert whole >= 2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_fast_finiteness_check_agrees_with_the_cast(dtype):
    """The one-pass min/max check says "finite" only when the cast really is finite, at the edges."""
    lim = fold._CAST_LIMIT.get(dtype, float("inf"))
    edge = [lim, -lim] if lim != float("inf") else []
    for v in [1.0, 3e38, -3.4e38, float("inf"), float("-inf"), float("nan"), 65504.0, 65519.0, *edge]:
        x = torch.tensor([0.5, v], dtype=torch.float32)
        for near in (x, torch.nextafter(x, torch.zeros_like(x))):
            if fold._cast_finite(near, dtype):
                assert bool(torch.isfinite(near.to(dtype)).all()), (dtype, near)
    if edge:  # the limit is exact: it overflows, the float32 just below it does not
        at = torch.tensor([lim], dtype=torch.float32)
        assert torch.isinf(at.to(dtype)).all() and torch.isfinite(torch.nextafter(at, at * 0).to(dtype)).all()
    # and it does not refuse ordinary blocks
    assert fold._cast_finite(torch.randn(1000) * 100, dtype)


def _fds() -> int:
    import os

    return len(os.listdir("/proc/self/fd"))


def test_one_writer_for_many_shards_same_bytes_and_files_closed(tmp_path, monkeypatch):
    """Shards queued on one Writer (the caller runs ahead, writes blocks itself past the held budget,
    copies at close) give the bytes of one writer per shard; every file is closed."""
    monkeypatch.setattr(st_writer, "OPEN_FILES", 2)  # the caller must help before opening the third
    monkeypatch.setattr(st_writer, "PIECE", 4096)  # many copy jobs per file
    g = torch.Generator().manual_seed(0)
    jobs = []
    for k in range(5):
        tensors = {f"t{i}": torch.randn(40 + i, 300, generator=g) for i in range(6)}
        save_file(tensors, str(tmp_path / f"s{k}.safetensors"))
        e, lin = _linear_edit(300, 120, torch.bfloat16, seed=k)
        save_file(lin, str(tmp_path / f"l{k}.safetensors"))
        values = {"t2": torch.zeros(42, 300), "new.bias": torch.arange(5.0) + k} if k % 2 else {}
        jobs.append((tmp_path / f"s{k}.safetensors", values))
        got = fold.compute_chunked(e, lin.__getitem__, chunk=120 * 16)
        jobs.append((tmp_path / f"l{k}.safetensors", got))
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for path, values in jobs:
        st_rewrite.write_shard(st_format.read_shard(path), values, tmp_path / "a" / path.name)
    before = _fds()
    with st_writer.Writer(held=3000) as w:  # a block is 7680 bytes: every block beyond the first waits
        for path, values in jobs:
            st_rewrite.write_shard(st_format.read_shard(path), values, tmp_path / "b" / path.name, writer=w)
            assert len(w.outs) <= 2
    assert _fds() == before and not w.outs
    for path, _ in jobs:
        assert (tmp_path / "b" / path.name).read_bytes() == (tmp_path / "a" / path.name).read_bytes()


def test_copy_error_in_a_shared_writer_reaches_the_caller(tmp_path, monkeypatch):
    save_file({"a": torch.zeros(1000), "b": torch.ones(1000)}, str(tmp_path / "s.safetensors"))
    shard = st_format.read_shard(tmp_path / "s.safetensors")
    real = st_writer.copy_at

    def broken(src, dst, a, b, n):
        if b > 0:  # the header copies, the data does not
            raise OSError(28, "No space left on device")
        real(src, dst, a, b, n)

    monkeypatch.setattr(st_writer, "copy_at", broken)
    before = _fds()
    with pytest.raises(OSError, match="No space"):
        with st_writer.Writer() as w:
            for k in range(3):
                st_rewrite.write_shard(shard, {"a": torch.ones(1000)}, tmp_path / f"o{k}", writer=w)
    assert _fds() == before
