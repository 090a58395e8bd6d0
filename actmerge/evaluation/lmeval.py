"""lm-evaluation-harness scores of the base model and of baked checkpoints (optional extra
``actmerge[lmeval]``): each directory is loaded by lm-eval's own ``hf`` model — the same plain
transformers load a user gets, no actmerge code in between.

Hub tasks (``mmlu``, ``hellaswag`` …) download their data; ``include`` adds a directory of local task
YAMLs (lm-eval's ``--include_path``). lm-eval runs with that directory as the working directory, so a
local task's ``data_files`` are relative to it (``tests/data/lmeval/tinytask.yaml`` is an example).
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

from ..errors import ActmergeError

SECTION = "## lm-evaluation-harness"


def scores(
    path: str | Path,
    tasks: list[str],
    *,
    include: str | Path | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    batch_size: int = 8,
    limit: int | None = None,
) -> dict[str, float]:
    """{"<task>:<metric>": value} for one checkpoint directory (stderr entries left out)."""
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ActmergeError(
            "--lm-eval needs lm-evaluation-harness: pip install 'actmerge[lmeval]' (or pip install lm-eval)."
        ) from None
    include = Path(include).resolve() if include is not None else None
    if include is not None and not include.is_dir():
        raise ActmergeError(f"--lm-eval-include {include}: not a directory of lm-eval task YAMLs.")
    manager = TaskManager(include_path=str(include) if include else None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ActmergeError(
            f"lm-eval does not know task(s) {unknown}: check the names (`lm-eval ls tasks`), or pass the "
            "directory of your local task YAMLs with --lm-eval-include."
        )
    with _cwd(include):
        res = lm_eval.simple_evaluate(
            model="hf",
            model_args=f"pretrained={Path(path).resolve()},dtype={dtype}",
            tasks=list(tasks),
            task_manager=manager,
            device=device,
            batch_size=batch_size,
            limit=limit,
        )
    out: dict[str, float] = {}
    for task, metrics in res["results"].items():
        for key, value in metrics.items():
            name = key.split(",")[0]
            if "stderr" in name or not isinstance(value, int | float) or isinstance(value, bool):
                continue
            if name in ("sample_len",):
                continue
            out[f"{task}:{name}"] = float(value)
    return out


@contextlib.contextmanager
def _cwd(path: Path | None):
    old = os.getcwd()
    if path is not None:
        os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def card_section(values: dict[str, float], base: dict[str, float]) -> str:
    lines = [SECTION, "", "| task:metric | this checkpoint | base model |", "|---|---|---|"]
    for k, v in values.items():
        b = base.get(k)
        lines.append(f"| {k} | {v:.4g} | {'-' if b is None else f'{b:.4g}'} |")
    lines.append("")
    lines.append("Measured with lm-evaluation-harness (`hf` model) by `actmerge eval --lm-eval`.")
    return "\n".join(lines) + "\n"


def with_section(text: str, section: str) -> str:
    """A card with its lm-evaluation-harness section put (or replaced) before `## Use`."""
    text = re.sub(rf"{re.escape(SECTION)}\n.*?(?=\n## |\Z)", "", text, flags=re.S).rstrip("\n") + "\n"
    if "\n## Use\n" in text:
        head, tail = text.split("\n## Use\n", 1)
        text = head.rstrip("\n") + "\n\n" + section + "\n## Use\n" + tail
    else:
        text = text + "\n" + section
    return text


def add_to_card(checkpoint: Path, section: str, log=print) -> bool:
    """The lm-eval section into the card of a checkpoint actmerge wrote (through the output rule:
    atomically, never through a link); any other directory is left as it is (False)."""
    from ..io.output import rewrite_in_output

    readme = Path(checkpoint) / "README.md"
    try:
        text = readme.read_text() if readme.is_file() and not readme.is_symlink() else ""
        done = rewrite_in_output(Path(checkpoint), "README.md", with_section(text, section).encode(), log=log)
        why = "actmerge did not write this checkpoint (no actmerge/bake.json), or its card is a link"
    except (OSError, UnicodeDecodeError, ActmergeError) as exc:  # the scores are safe in the report
        done, why = False, str(exc)
    if not done:
        log(f"lm-eval scores of {checkpoint} are in the report only, not its card: {why}")
    return done


def add_rows(report, base_path, model, tasks, baked, include, limit, log) -> None:
    """lm-eval ``tasks`` on the base model (``base_path``) and on each ``baked`` directory: the scores
    join the base row (or λ = 0) and the baked rows of ``report``, and the card of each baked
    checkpoint actmerge wrote (``add_to_card``)."""
    from ..placement import input_device
    from .sweep import add_baselines

    kw = dict(
        include=include,
        device=str(input_device(model)),
        dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
        limit=limit,
    )
    log(f"lm-eval {', '.join(tasks)}: base model")
    base = scores(base_path, tasks, **kw)
    first = report.rows[0]
    if first.kind == "base" or first.strength == 0:  # the base model, or λ = 0 (the identity)
        first.metrics |= base
    for row, path in zip([r for r in report.rows if r.kind == "baked"], baked, strict=True):
        log(f"lm-eval {', '.join(tasks)}: {Path(path).name}")
        got = scores(path, tasks, **kw)
        row.metrics |= got
        add_to_card(Path(path), card_section(got, base), log=log)
    add_baselines(report.rows)
