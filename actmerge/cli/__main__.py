"""`python -m actmerge.cli`: the CLI (the package's app, every verb registered)."""

from . import app

app()
