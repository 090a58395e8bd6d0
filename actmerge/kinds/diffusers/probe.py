"""Run a pipeline on fixed prompts, seed (latents) and steps, and capture what verification compares:
every text-encoder output tensor and the denoiser output at every step, plus the final latents.

Standalone on purpose: it imports torch and diffusers only. ``verify`` runs this file as a script
in a fresh interpreter on the baked pipeline (plain diffusers, no actmerge), and imports ``probe``
in-process for the hooked base pipeline: one capture, two independent implementations of the maps.
"""

from __future__ import annotations

import inspect
import json
import sys
import warnings

import torch

CALL_DEFAULTS = {"clean_caption": False, "use_resolution_binning": False}
SCRIPT = __file__  # what ``verify`` runs in the fresh interpreter


def _tensors(output) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output.detach().float().cpu()]
    if isinstance(output, dict):  # ModelOutput
        output = tuple(v for v in output.values() if v is not None)
    if isinstance(output, (tuple, list)):
        return [t for item in output for t in _tensors(item)]
    return []


def probe(pipe, prompts: list[str], *, texts: list[str], denoiser: str, steps: int, seed: int) -> dict:
    captured: dict[str, list[torch.Tensor]] = {f"text:{t}": [] for t in texts}
    captured["denoiser"] = []
    handles = []
    components = pipe.components

    def grab(name):
        def hook(_mod, _args, output):
            captured[name].extend(_tensors(output))

        return hook

    for t in texts:
        handles.append(components[t].register_forward_hook(grab(f"text:{t}")))
    handles.append(components[denoiser].register_forward_hook(grab("denoiser")))
    params = inspect.signature(pipe.__call__).parameters
    kwargs = {k: v for k, v in CALL_DEFAULTS.items() if k in params}
    try:
        with torch.no_grad():
            out = pipe(
                prompt=prompts,
                num_inference_steps=steps,
                generator=torch.Generator().manual_seed(seed),
                output_type="latent",
                **kwargs,
            )
    finally:
        for h in handles:
            h.remove()
    captured["latents"] = [out.images.detach().float().cpu()]
    return captured


def main() -> None:
    from diffusers import DiffusionPipeline

    path, args_path, out_path = sys.argv[1:4]
    args = json.loads(open(args_path).read())
    with warnings.catch_warnings():  # newer diffusers renamed torch_dtype to dtype; older lack dtype
        warnings.simplefilter("ignore", FutureWarning)
        pipe = DiffusionPipeline.from_pretrained(path, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(args.pop("device", "cpu"))  # the hooked reference's device: like is compared with like
    result = probe(
        pipe,
        args["prompts"],
        texts=args["texts"],
        denoiser=args["denoiser"],
        steps=args["steps"],
        seed=args["seed"],
    )
    leaked = [m for m in sys.modules if m == "actmerge" or m.startswith("actmerge.")]
    assert not leaked, f"actmerge was imported: {leaked[:3]}"
    torch.save(result, out_path)


if __name__ == "__main__":
    main()
