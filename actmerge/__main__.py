"""`python -m actmerge`: the CLI."""

from .cli import app

app()
