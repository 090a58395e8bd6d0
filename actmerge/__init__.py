"""actmerge: bake activation steering into model weights."""

__version__ = "0.1.0"
