"""The report directories, the one place evaluation writes: ``eval``'s report.json + sweep.png and
``tune``'s tune.json + tune.png, each filled inside ``io.output.write_report_dir`` (a temporary
directory renamed into place, the sources never written over, ``--force`` to replace a report)."""

from __future__ import annotations

from pathlib import Path

from ..io.output import Sources, write_report_dir
from .plot import plot, plot_tradeoff
from .records import Report, TuneResult


def eval_dir(out: Path, report: Report, *, source: Sources = None, force: bool = False, log=print) -> Path:
    """``out``/report.json and ``out``/sweep.png."""

    def fill(tmp: Path) -> None:
        report.save(tmp / "report.json")
        plot(report, tmp / "sweep.png")

    return write_report_dir(out, "eval", fill, source=source, force=force, log=log)


def tune_dir(
    out: Path, result: TuneResult, *, source: Sources = None, force: bool = False, log=print
) -> Path:
    """``out``/tune.json and ``out``/tune.png."""

    def fill(tmp: Path) -> None:
        result.save(tmp / "tune.json")
        plot_tradeoff(result, tmp / "tune.png")

    return write_report_dir(out, "tune", fill, source=source, force=force, log=log)
