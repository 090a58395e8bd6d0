"""GGUF in, GGUF out: write a bake into a copy of the source GGUF (``bake X.gguf -o Y.gguf``).

The fit and the fold plan run on the de-quantised float32 snapshot as for any bake; this module then
copies the source GGUF — every key/value (tokenizer, chat template) and every tensor's bytes and
quantisation type — and replaces only what the plan edits:

- norm gains (F32 in a GGUF) are multiplied by the map's scale in the GGUF's own convention: llama.cpp's
  converter stores Gemma's ``1 + g``, and ``s·(1 + g)`` is exactly the folded ``1 + g'``, so
  ``stored' = s · stored`` for every family;
- biases (new or edited) are F32 tensors, written only where llama.cpp's architecture loads them
  (``Linear.runtimes`` holds "llama.cpp"); Llama q/k biases get the converter's head permutation;
- an edited quantised matrix is re-quantised to its own type — by gguf-py (Q8_0, Q4_0/1, Q5_0/1,
  F16, BF16…) or else by llama.cpp's own row quantiser (K-quants; an unchanged K-quant matrix comes
  back byte for byte) — and the deviation of the de-quantised result from the exact fold is reported;
  types neither can write (i-quants, which need an importance matrix) are refused with the remedy
  (``--target gguf`` keeps norm sites).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .errors import ExportError, NotFoldableError
from .fold import FoldPlan, compute
from .io.markers import GGUF_KEY
from .io.output import atomic_file, check_output
from .sites import architecture_for

FLOAT_TYPES = ("F32", "F16", "BF16")


def source_gguf(name: str) -> Path | None:
    """The GGUF file a model argument came from: a ``.gguf`` path, or a built-in alias's file."""
    from .snapshots import BUILTIN, builtin_gguf

    if name in BUILTIN:
        return builtin_gguf(name)
    path = Path(name).expanduser()
    return path.resolve() if path.suffix == ".gguf" and path.is_file() else None


def is_gguf_out(out) -> bool:
    return out is not None and str(out).endswith(".gguf")


def preflight(model_name: str, out: Path, strengths: list[float], force: bool) -> Path:
    """Before the fit: the source is a GGUF, one strength, and the output may be written (never the source)."""
    src = source_gguf(model_name)
    if src is None:
        raise ExportError(
            f"-o {out}: a .gguf output keeps the source GGUF's quantisation, but {model_name} is not a GGUF. "
            "Bake to a directory and convert it with `actmerge export-gguf`."
        )
    if len(strengths) != 1:
        raise ExportError(
            f"-o {out}: a .gguf output holds one strength; got {strengths}. Give one --strength."
        )
    if Path(out).resolve() == src.resolve():
        raise ExportError(f"-o {out} is the source GGUF itself: give another output file.")
    check_output(Path(out), src, force=force, is_dir=False)
    return src


@dataclass
class GgufBake:
    out: Path
    source: Path
    changed: dict[str, str] = field(default_factory=dict)  # GGUF tensor → what happened
    added: list[str] = field(default_factory=list)  # new F32 bias tensors
    requantised: dict[str, float] = field(default_factory=dict)  # tensor → max |Δ| vs the exact fold
    requantised_types: dict[str, str] = field(default_factory=dict)  # tensor → its GGML type
    types_kept: bool = True
    size_ratio: float = 1.0
    # GGUF name → (data, type) of every edit with the re-quantised matrices as their exact float32
    # fold: the reference `verify` runs to tell the fold's exactness from the re-quantisation's deviation
    exact_edits: dict = field(default_factory=dict, repr=False)

    def notes(self) -> list[str]:
        out = [
            f"GGUF: {len(self.changed)} tensors changed, {len(self.added)} F32 biases added, the rest copied "
            f"byte for byte; every tensor type kept: {self.types_kept}; size ×{self.size_ratio:.4f} of {self.source.name}"
        ]
        if self.requantised:
            worst = max(self.requantised, key=self.requantised.get)
            types = ", ".join(sorted(set(self.requantised_types.values())))
            out.append(
                f"GGUF: {len(self.requantised)} edited matrices re-quantised to their own types ({types}); "
                f"largest |Δ| vs the exact fold {self.requantised[worst]:.3g} ({worst})"
            )
        return out


class _Names:
    """HF tensor name → GGUF tensor name, by gguf-py's tensor name map for the file's architecture."""

    def __init__(self, reader):
        import gguf

        self.arch_name = str(reader.fields["general.architecture"].contents())
        by_name = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}
        if self.arch_name not in by_name:
            raise ExportError(f"gguf-py does not know the GGUF architecture {self.arch_name!r}.")
        blocks = int(reader.fields[f"{self.arch_name}.block_count"].contents())
        self.map = gguf.get_tensor_name_map(by_name[self.arch_name], blocks)
        self.fields = reader.fields

    def __call__(self, hf: str) -> str:
        found = self.map.get_name(hf, try_suffixes=(".weight", ".bias"))
        if found is None:
            raise ExportError(f"{hf} has no GGUF name for architecture {self.arch_name} in gguf-py's map.")
        return found

    def field(self, key: str):
        f = self.fields.get(f"{self.arch_name}.{key}")
        return None if f is None else f.contents()


def _llama_permute(t: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """llama.cpp's converter's q/k row permutation (conversion/llama.py ``LlamaModel.permute``)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return t.reshape(n_head, 2, t.shape[0] // n_head // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)


def _to_gguf_layout(names: _Names, hf: str, arr: np.ndarray) -> np.ndarray:
    if names.arch_name != "llama" or not hf.endswith(
        ("q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias")
    ):
        return arr
    n_head = int(names.field("attention.head_count"))
    n_kv = names.field("attention.head_count_kv")
    return _llama_permute(
        arr, n_head, n_head if ".q_proj." in hf else (int(n_kv) if n_kv is not None else None)
    )


def _llamacpp_loads(config: dict, hf_bias: str) -> bool:
    arch = architecture_for(config)
    for lin in arch.linears.values():
        if hf_bias.endswith(f".{lin.module}.bias"):
            return "llama.cpp" in lin.runtimes
    return False


def write_gguf(
    src: Path,
    plan: FoldPlan,
    read,
    config: dict,
    out: Path,
    *,
    force: bool = False,
    keep_exact: bool = False,
    log=print,
) -> GgufBake:
    """Copy ``src`` to ``out`` with the edits of ``plan`` (``read``: HF tensor name → float32 tensor of
    the de-quantised snapshot). ``keep_exact``: keep the exact float32 fold of every re-quantised
    matrix on the result (``exact_edits``, what ``verify_gguf`` compares with; a model's worth of
    float32 matrices for a large model, so only when verifying)."""
    import gguf
    from gguf import GGMLQuantizationType as Q
    from gguf import quants

    reader = gguf.GGUFReader(str(src))
    names = _Names(reader)
    by_name = {t.name: t for t in reader.tensors}
    new: dict[str, tuple[np.ndarray, Q]] = {}  # GGUF name → (data as stored, type)
    res = GgufBake(Path(out), Path(src))
    exact: dict[str, tuple[np.ndarray, Q]] = {}  # re-quantised matrices as their exact float32 fold
    refused: list[str] = []
    for (component, module), e in plan.edits.items():
        if component:
            raise ExportError("a .gguf output takes language-model bakes only.")
        if e.kind in ("norm", "norm_1p"):
            if e.bias:
                refused.append(f"  {module}: a norm with a bias (LayerNorm) is not folded into GGUFs yet")
                continue
            dim = by_name[names(e.weight)].n_elements
            s = compute(replace(e, kind="norm", bias=None), lambda _n, d=dim: torch.ones(d), module)
            if not s:
                continue
            g = names(e.weight)
            t = by_name[g]
            if t.tensor_type.name not in FLOAT_TYPES:
                refused.append(f"  {g}: a norm stored as {t.tensor_type.name}")
                continue
            old = quants.dequantize(t.data, t.tensor_type).reshape(-1)
            folded = (s[e.weight].numpy().astype(np.float32) * old).astype(np.float32)
            new[g] = (quants.quantize(folded.reshape(t.data.shape), t.tensor_type), t.tensor_type)
            res.changed[g] = "norm gain × scale (exact)"
            continue
        out_t = compute(e, read, module)
        for hf, value in out_t.items():
            g = names(hf)
            arr = _to_gguf_layout(names, hf, value.float().numpy())
            if hf == e.bias:
                if g not in by_name and not _llamacpp_loads(config, hf):
                    refused.append(
                        f"  {hf}: llama.cpp's {names.arch_name} does not load a bias there "
                        "(bake with --target gguf, or choose other sites)"
                    )
                    continue
                new[g] = (arr.astype(np.float32), Q.F32)
                (res.changed.__setitem__(g, "bias (F32, exact)") if g in by_name else res.added.append(g))
                continue
            t = by_name[g]
            qt = t.tensor_type
            try:
                data = _requantise(arr.astype(np.float32), qt)
            except ExportError as exc:
                refused.append(f"  {g} ({qt.name}): the edit needs re-quantisation, which failed: {exc}")
                continue
            back = quants.dequantize(data, qt).reshape(arr.shape)
            res.requantised[g] = float(np.abs(back - arr).max())
            res.requantised_types[g] = qt.name
            if keep_exact:
                exact[g] = (arr.astype(np.float32), Q.F32)
            new[g] = (data, qt)
            res.changed[g] = f"re-quantised to {qt.name} (max |Δ| {res.requantised[g]:.3g} vs the exact fold)"
    if refused:
        raise NotFoldableError(
            "these edits cannot be written into the GGUF:\n" + "\n".join(refused) + "\nRemedies: bake with "
            "--target gguf (norm gains and biases llama.cpp loads only), choose norm sites, or bake to a "
            "directory and `actmerge export-gguf` it."
        )
    _write(reader, names, by_name, new, res, force, log)
    if exact:
        res.exact_edits = {**new, **exact}
    return res


def write_exact_reference(src: Path, bake: GgufBake, out: Path) -> Path:
    """A copy of ``src`` with ``bake``'s edits where every re-quantised matrix is stored as its exact
    float32 fold instead (llama.cpp runs F32 matrices): what the bake would be without re-quantising."""
    import gguf

    reader = gguf.GGUFReader(str(src))
    by_name = {t.name: t for t in reader.tensors}
    ref = GgufBake(Path(out), Path(src))
    _write(reader, _Names(reader), by_name, bake.exact_edits, ref, True, lambda *_: None)
    return ref.out


def _requantise(arr: np.ndarray, qt) -> np.ndarray:
    """``arr`` quantised to ``qt``: by gguf-py where it can (Q8_0, Q4_0/1, Q5_0/1, F16, BF16…), else
    by llama.cpp's own row quantiser (K-quants: Q4_K, Q6_K…)."""
    import gguf
    from gguf import quants

    from .gguf_quantize import quantize_rows

    try:
        return quants.quantize(arr, qt)
    except (NotImplementedError, gguf.QuantError) as exc:
        try:
            return quantize_rows(arr.reshape(-1, arr.shape[-1]), qt)
        except ExportError as why:
            raise ExportError(f"gguf-py cannot ({exc}) and llama.cpp cannot ({why})") from None


def _write(reader, names: _Names, by_name, new, res: GgufBake, force: bool, log) -> None:
    import gguf

    with atomic_file(res.out, force=force, source=res.source, log=log) as tmp:
        w = gguf.GGUFWriter(str(tmp), arch=names.arch_name, endianess=reader.endianess)
        for f in reader.fields.values():
            if f.name in (gguf.Keys.General.ARCHITECTURE, GGUF_KEY) or f.name.startswith("GGUF."):
                continue
            sub = f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
            w.add_key_value(f.name, f.contents(), f.types[0], sub_type=sub)
        w.add_string(GGUF_KEY, __version__)  # the marker `--force` looks for
        order = [t.name for t in reader.tensors] + [g for g in new if g not in by_name]
        datas = {}
        for g in order:
            if g in new:
                data, qt = new[g]
                if g in by_name and by_name[g].tensor_type == gguf.GGMLQuantizationType.F32:
                    data = data.reshape(by_name[g].data.shape)
            else:
                data, qt = by_name[g].data, by_name[g].tensor_type
            datas[g] = data
            w.add_tensor_info(g, data.shape, data.dtype, data.nbytes, qt)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for g in order:
            w.write_tensor_data(datas[g], tensor_endianess=reader.endianess)
        w.close()
    after = gguf.GGUFReader(str(res.out))
    kept = {t.name: t.tensor_type for t in after.tensors}
    res.types_kept = all(kept.get(t.name) == t.tensor_type for t in reader.tensors)
    res.size_ratio = res.out.stat().st_size / res.source.stat().st_size


def snapshot_reader(source):
    """HF tensor name → float32 tensor, read from the de-quantised snapshot's safetensors."""
    from safetensors import safe_open

    from .io.st_format import tensor_index

    _, where = tensor_index(source.safetensors_files())

    def read(name: str) -> torch.Tensor:
        with safe_open(str(where[name].path), framework="pt") as h:
            return h.get_tensor(name).float()

    return read


def verify_gguf(
    out: Path,
    src: Path,
    loaded,
    maps,
    strength: float,
    prompts: list[str] | None = None,
    *,
    new_tokens: int = 16,
    bake: GgufBake | None = None,
):
    """The GGUF output in llama.cpp vs the hooked de-quantised base in transformers, next to the source
    GGUF vs the unhooked base (the round trip to beat: max(2 × its max |Δlogit|, FLOOR)). Where
    ``bake`` re-quantised matrices, the pass is judged on the exact reference (those matrices in
    float32, ``write_exact_reference``) and the output's deviation from it is reported beside."""
    from .kinds.llm.verify import DEFAULT_PROMPTS
    from .llamacpp import FLOOR, LlamaCppReport, compare_runs, run_llamacpp, run_transformers

    model, tok = loaded.get()
    ids = [tok(p)["input_ids"] for p in (prompts or DEFAULT_PROMPTS)]
    hooked = run_transformers(model, ids, new_tokens, maps, strength)
    got = run_llamacpp(out, ids, new_tokens)
    baked = compare_runs(hooked, got, ids)
    base = compare_runs(run_transformers(model, ids, new_tokens), run_llamacpp(src, ids, new_tokens), ids)
    tol = max(2 * base.max_abs_logit_diff, FLOOR)
    if bake is None or not bake.requantised:
        return LlamaCppReport(baked, base, "gguf (source types)", tol, baked.max_abs_logit_diff <= tol, [])
    if not bake.exact_edits:
        raise ExportError("verify_gguf: the bake kept no exact reference (write_gguf(keep_exact=True)).")
    # re-quantised matrices: the fold's exactness is judged on the same edits with those matrices in
    # float32; the re-quantisation's own deviation (output vs that reference, both in llama.cpp) is reported
    with tempfile.TemporaryDirectory(prefix="actmerge-gguf-ref-") as d:
        ref = run_llamacpp(write_exact_reference(src, bake, Path(d) / "exact.gguf"), ids, new_tokens)
    exact = compare_runs(hooked, ref, ids)
    requantised = compare_runs(ref, got, ids)
    return LlamaCppReport(
        baked,
        base,
        "gguf (source types)",
        tol,
        exact.max_abs_logit_diff <= tol,
        [],
        exact=exact,
        requantised=requantised,
    )
