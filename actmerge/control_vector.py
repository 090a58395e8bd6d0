"""llama.cpp control vectors: the shifts at layer-end sites that have no home in the weights
(``actmerge export-control-vector``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import ExportError
from .io.markers import GGUF_KEY
from .io.output import atomic_file
from .sites import architecture_for, num_layers

# sites whose output is the last thing a decoder layer adds into the residual stream: a shift there
# equals llama.cpp's control vector for that layer (added to the layer output, ``l_out``)
LAYER_END_SITES = ("mlp_post", "mlp_out")


@dataclass(frozen=True)
class ControlVector:
    directions: dict[int, torch.Tensor]  # llama.cpp layer il (≥ 1) → shift added to that layer's output
    from_sites: list[str]  # map keys whose shift is in the vector
    elsewhere: list[str]  # map keys with a shift that is not (it folds into the weights, or nowhere)


def control_vector(
    maps, config: dict, strength: float, *, partial: bool = False, allow_extrapolation: bool = False
) -> ControlVector:
    """The shifts (λβ) of maps at layer-end sites, as llama.cpp control-vector directions.

    A shift at a layer-end site (Gemma's ``mlp_post``, the Llama-like ``mlp_out``) adds into the
    residual after the layer's last block: exactly what llama.cpp adds a control vector to. The scale of
    the same map still has to be baked (``bake --shift-policy drop``). Shifts elsewhere cannot be a
    control vector: an error unless ``partial`` (then reported in ``elsewhere``). ``strength`` passes
    the strength rules (``strength.one``)."""
    from .shifts import shift_home
    from .sites import site_for_key
    from .strength import one

    strength = one(strength, allow_extrapolation=allow_extrapolation)

    arch = architecture_for(config)
    n = num_layers(arch, config)
    dirs: dict[int, torch.Tensor] = {}
    used, elsewhere, bad = [], [], []
    for key, amap in maps.items():
        _, shift = amap.at(strength)
        if not bool((shift != 0).any()):
            continue
        site = site_for_key(arch, config, key)
        if site.name in LAYER_END_SITES and site.layer >= 1:
            dirs[site.layer] = dirs.get(site.layer, torch.zeros_like(shift)) + shift.float()
            used.append(key)
            continue
        folds, _, _, _ = shift_home(arch, config, site.name, targets=frozenset({"llama.cpp"}))
        elsewhere.append(key)
        if not folds:
            why = (
                "llama.cpp applies no control vector to layer 0's output"
                if site.name in LAYER_END_SITES
                else f"{site.name} is not the end of a layer (control vectors add to layer outputs)"
            )
            bad.append(f"  {key}: {why}")
    if bad and not partial:
        raise ExportError(
            "these shifts can neither fold into weights llama.cpp loads nor be a control vector:\n"
            + "\n".join(bad[:8])
            + ("\n  …" if len(bad) > 8 else "")
            + f"\nControl vectors hold shifts at {' / '.join(LAYER_END_SITES)} of layers 1..{n - 1}. "
            "Refit with shifts there (or scale-only), or pass --partial to export what can be expressed."
        )
    return ControlVector(dirs, used, elsewhere)


def write_control_vector(
    cv: ControlVector, out: Path, *, model_hint: str, n_layers: int, force: bool = True, source=None
) -> Path:
    """Write the GGUF llama.cpp's ``--control-vector`` reads: arch ``controlvector``, F32 ``direction.N``
    (and actmerge's marker key, which ``--force`` looks for)."""
    import gguf

    from . import __version__

    if not cv.directions:
        raise ExportError("no shift at a layer-end site: the control vector would be empty.")
    out = Path(out)
    with atomic_file(out, force=force, source=source) as tmp:
        w = gguf.GGUFWriter(str(tmp), "controlvector")
        w.add_string(GGUF_KEY, __version__)
        w.add_string("controlvector.model_hint", model_hint)
        w.add_int32("controlvector.layer_count", n_layers)
        for layer in sorted(cv.directions):  # llama.cpp: direction.N is added to the output of layer N
            w.add_tensor(f"direction.{layer}", cv.directions[layer].numpy().astype(np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return out
