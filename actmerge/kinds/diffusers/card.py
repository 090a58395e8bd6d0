"""A pipeline's parts of the model card (``card.render``)."""

from __future__ import annotations

from ... import __version__
from ...card import REPO_PLACEHOLDER, KindText, base_license


def text(info) -> KindText:
    """The card text of a baked pipeline (``info``: ``BakeInfo``)."""
    return KindText(
        library_name="diffusers",
        pipeline_tag="text-to-image",
        intro=(
            f"This pipeline is **{info.base_model}** ({info.pipeline_class}) with activation steering baked "
            f"into the weights of {', '.join(info.edited_components) or 'no component'} by actmerge "
            f"{__version__}. It loads in plain diffusers (no actmerge, no hooks) and runs at the base "
            "pipeline's speed; the other components are byte-identical copies."
        ),
        unit="channel",
        usage=usage(),
        fitted=", fitted at the first denoising step",
        applied=" at every step",
    )


def license_of(source) -> str | None:
    """The base pipeline's license (its card)."""
    return base_license(source.path, {})


def usage() -> list[str]:
    """The card's Use section: plain diffusers."""
    return [
        "Quality on this pipeline was not measured by actmerge: check images before and after.",
        "",
        "## Use",
        "",
        "```python",
        "import torch",
        "from diffusers import DiffusionPipeline",
        f'pipe = DiffusionPipeline.from_pretrained("{REPO_PLACEHOLDER}", torch_dtype=torch.float16)',
        "```",
        "",
    ]
