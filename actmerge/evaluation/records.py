"""What an evaluation keeps: its settings (``EvalConfig``), its rows (``Row``) and the report
(``Report``: report.json); what a tuning run keeps (``TuneResult``: tune.json, and the record
``bake --strength auto`` reads). ``Report.save`` and ``TuneResult.save`` write into the temporary directory that
``io.output.write_report_dir`` fills and renames into place: never into a user's path directly."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .. import __version__
from .budget import Budget
from .search import Point


@dataclass(frozen=True)
class EvalConfig:
    prompts: list[str]
    neutral: list[str] = field(default_factory=list)
    metrics: tuple[str, ...] = ("toxicity", "perplexity")
    scorer: str = "profanity"
    keywords: tuple[str, ...] = ()
    max_new_tokens: int = 24
    sample: bool = False  # False: greedy; True: T=1, top_p=0.3, repetition_penalty=1.2
    seed: int = 0
    chat: str = "off"  # off | auto (the chat template where the model has one) | on (prompts are user turns)
    n_samples: int = 3  # generations shown per row
    batch_size: int = 16
    threshold: float = 0.5
    # further held-out prompt sets, e.g. {"hard": [...]}: generation metrics get the suffix _<name>
    splits: dict[str, list[str]] = field(default_factory=dict)
    kl: bool = True  # with perplexity: KL(base ‖ steered) on the neutral text and neutral prompts


@dataclass
class Row:
    label: str
    kind: str  # base | hooked | clamped | baked
    strength: float | None
    metrics: dict[str, float]
    samples: list[dict[str, str]]
    seconds: float
    texts: list[str] = field(default_factory=list, repr=False)
    baseline: dict[str, float] = field(default_factory=dict)  # the base row's value of each metric
    ratio: dict[str, float] = field(default_factory=dict)  # metric / baseline (where the baseline ≠ 0)


@dataclass
class Report:
    model: str
    config: EvalConfig
    rows: list[Row]
    version: str = __version__

    def to_dict(self) -> dict:
        cfg = asdict(self.config)
        cfg["n_prompts"], cfg["n_neutral"] = len(cfg.pop("prompts")), len(cfg.pop("neutral"))
        cfg["n_prompts_split"] = {k: len(v) for k, v in cfg.pop("splits").items()}
        rows = [{k: v for k, v in asdict(r).items() if k != "texts"} for r in self.rows]
        data = {"actmerge_version": self.version, "model": self.model, "settings": cfg, "rows": rows}
        return json.loads(json.dumps(data))  # plain JSON types (tuples → lists)

    def save(self, path: Path) -> Path:
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path


@dataclass
class TuneResult:
    model: str
    recipe: str
    recipe_hash: str
    budget: Budget
    metric: str  # the behaviour metric, e.g. toxic_fraction
    strength: float  # the chosen λ (0 when nothing above 0 meets the budget)
    met: bool  # False: even the smallest strength tried is over the budget
    points: list[Point]
    base_behaviour: float | None = None
    note: str = ""
    n_tune_prompts: int = 0
    n_tune_neutral: int = 0
    version: str = __version__
    maps: object = field(default=None, repr=False)  # the fitted MapSet (not saved)

    @property
    def chosen(self) -> Point:
        return next(p for p in self.points if p.strength == self.strength)

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k != "maps"}
        d["budget"] = {**asdict(self.budget), "key": self.budget.key(), "text": self.budget.describe()}
        d["chosen"] = asdict(self.chosen)
        return json.loads(json.dumps(d))

    def save(self, path: Path) -> Path:
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path
