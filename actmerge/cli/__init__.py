"""Command line: parse, build the request, call one verb of ``actmerge.pipeline``, render the result
(``render.py``). Library errors become one-line messages and exit codes here, and only here (set
ACTMERGE_DEBUG=1 for tracebacks); SIGTERM and SIGHUP are handled like Ctrl-C.

``app.py`` holds the one Typer app; each verb module registers its commands on it when imported,
in the order ``actmerge --help`` lists them: ``model`` (fit, bake, push, verify, sites), ``eval``,
``tools`` (export-gguf, export-control-vector, compose), ``tune``, ``recipes``. Shared options and
the error handling are in ``options.py``, every table and verdict in ``render.py``."""

from . import model  # noqa: F401  (first: fit, bake, push, verify, sites)

# isort: split
from . import eval, recipes, tools, tune  # noqa: F401  (eval; recipes; export-gguf, …, compose; tune)
from .app import app

__all__ = ["app"]
