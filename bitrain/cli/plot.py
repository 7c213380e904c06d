"""``bitrain plot``: loss, top-1 and learning-rate curves of one or more runs, as a PNG.

Reads each run's ``metrics.csv`` (columns ``split,epoch,step,samples,loss,acc1,acc5,lr,
samples_per_sec,epoch_time``; ``split`` is ``batch``, ``train`` or ``val``). Three panels against
epoch: loss (train dashed, val solid), top-1 in % (same), and the learning rate, drawn from the
log-interval rows too so warmup and steps show inside an epoch. Runs are overlaid, one colour each;
a run in stages (a ``stage`` column) gets a dotted line, named, where each later stage begins.
``--x time`` draws against minutes of training instead (the running sum of each epoch's ``epoch_time``,
inside an epoch in proportion to its steps): runs of different recipes compared at equal wall time.
matplotlib is optional (``pip install bitrain[plot]``); it is imported only here.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bitrain.errors import UserError

DEFAULT_NAME = "curves.png"
FIGSIZE = (15.0, 4.5)  # inches; at DPI 100 a 1500 x 450 px PNG
DPI = 100


@dataclass
class RunCurves:
    """The curves of one run, x in epochs (epoch-end rows sit at epoch + 1)."""

    name: str
    train: dict[str, list[float]] = field(default_factory=lambda: {"x": [], "loss": [], "acc1": []})
    val: dict[str, list[float]] = field(default_factory=lambda: {"x": [], "loss": [], "acc1": []})
    lr: dict[str, list[float]] = field(default_factory=lambda: {"x": [], "lr": []})
    stages: list[tuple[float, str]] = field(default_factory=list)  # a run in stages: (x where each starts, name)
    minutes: list[float] = field(default_factory=list)  # training minutes at the end of epoch 0, 1, ... (epoch_time)

    def to_minutes(self, x: Sequence[float]) -> list[float]:
        """Epoch positions as minutes of training: linear inside each epoch; an epoch without its time (the
        one in progress) takes the last one's."""
        if not self.minutes:
            raise UserError(f"{self.name}: metrics.csv has no epoch_time, so there is no time axis (use --x epoch)")
        ends = [0.0, *self.minutes]
        last = ends[-1] - ends[-2]
        out = []
        for v in x:
            e = min(int(v), len(ends) - 1)
            step = ends[e + 1] - ends[e] if e + 1 < len(ends) else last
            out.append(ends[e] + (v - e) * step)
        return out


def _float(value: str | None) -> float:
    try:
        return float(value) if value not in (None, "") else math.nan
    except ValueError:
        return math.nan


def read_metrics(run_dir: str | Path) -> RunCurves:
    """Parse ``run_dir/metrics.csv`` into curves; UserError if it is missing or has no epoch rows."""
    run_dir = Path(run_dir)
    path = run_dir / "metrics.csv" if run_dir.is_dir() else run_dir
    if not path.is_file():
        raise UserError(f"{run_dir}: no metrics.csv (is it a bitrain run directory?)")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = {"split", "epoch", "step", "loss", "acc1", "lr"} - set(reader.fieldnames or ())
        if missing:
            raise UserError(f"{path}: not a bitrain metrics.csv (missing columns {', '.join(sorted(missing))})")
        # a resumed run may log a row twice (after a kill between log and checkpoint): last one wins
        rows = {(r["split"], r["epoch"], r["step"]): r for r in reader}.values()
    epoch_rows = sorted((r for r in rows if r["split"] in ("train", "val")), key=lambda r: int(r["step"]))
    if not epoch_rows:
        raise UserError(f"{path}: no finished epoch yet (no train/val rows)")
    # steps per epoch from the epoch-end rows: step count at the end of epoch e is (e + 1) * spe
    ends = {int(r["epoch"]): int(r["step"]) for r in epoch_rows if r["split"] == "train"}
    spe = max(1.0, max(s / (e + 1) for e, s in ends.items())) if ends else 1.0
    curves = RunCurves(name=run_dir.name if run_dir.is_dir() else run_dir.parent.name)
    for r in epoch_rows:
        side = curves.train if r["split"] == "train" else curves.val
        side["x"].append(int(r["epoch"]) + 1)
        side["loss"].append(_float(r["loss"]))
        side["acc1"].append(100.0 * _float(r["acc1"]))
    for r in epoch_rows:  # a run in stages (its stage column): where each stage begins
        name = r.get("stage") or ""
        if name and (not curves.stages or curves.stages[-1][1] != name):
            curves.stages.append((float(int(r["epoch"])), name))
    total = 0.0
    for r in epoch_rows:  # training minutes at each epoch's end, while every epoch has its time
        if r["split"] == "train":
            seconds = _float(r.get("epoch_time"))
            if math.isnan(seconds) or int(r["epoch"]) != len(curves.minutes):
                break
            total += seconds / 60.0
            curves.minutes.append(total)
    lr_rows = sorted((r for r in rows if r["split"] in ("batch", "train")), key=lambda r: int(r["step"]))
    for r in lr_rows:
        curves.lr["x"].append(int(r["step"]) / spe)
        curves.lr["lr"].append(_float(r["lr"]))
    return curves


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise UserError(
            "bitrain plot needs matplotlib, an optional dependency: "
            "pip install 'bitrain[plot]' (or pip install matplotlib)"
        ) from None
    matplotlib.use("Agg")  # files only: works without a display
    import matplotlib.pyplot as plt

    return plt


X_AXES = ("epoch", "time")


def plot_runs(run_dirs: Sequence[str | Path], out: str | Path | None = None, *, x: str = "epoch") -> Path:
    """Draw the runs' curves into one PNG; default path ``<first run dir>/curves.png``. Returns it.
    ``x``: ``epoch``, or ``time`` (minutes of training, from each epoch's ``epoch_time``)."""
    if not run_dirs:
        raise UserError("bitrain plot: give at least one run directory")
    if x not in X_AXES:
        raise UserError(f"--x: unknown value {x!r}; valid: {', '.join(X_AXES)}")
    runs = [read_metrics(d) for d in run_dirs]
    pos = (lambda run, v: run.to_minutes(v)) if x == "time" else (lambda run, v: list(v))
    for run in runs:
        pos(run, [0.0])  # no time axis for a run: the one line now, before any drawing
    names = [r.name for r in runs]
    if len(set(names)) < len(names):  # same folder name in different places: show the paths
        for r, d in zip(runs, run_dirs):
            r.name = str(d)
    out = (
        Path(out)
        if out
        else (Path(run_dirs[0]) if Path(run_dirs[0]).is_dir() else Path(run_dirs[0]).parent) / DEFAULT_NAME
    )
    if out.suffix.lower() != ".png":
        raise UserError(f"--out {out}: the plot is a PNG; give a file name ending in .png")
    plt = _pyplot()
    fig, (ax_loss, ax_acc, ax_lr) = plt.subplots(1, 3, figsize=FIGSIZE, dpi=DPI)
    try:
        for i, run in enumerate(runs):
            color = f"C{i % 10}"
            for side, style, label in ((run.train, "--", "train"), (run.val, "-", "val")):
                if side["x"]:
                    at = pos(run, side["x"])
                    ax_loss.plot(at, side["loss"], style, color=color, marker=".", label=f"{run.name} {label}")
                    ax_acc.plot(at, side["acc1"], style, color=color, marker=".", label=f"{run.name} {label}")
            ax_lr.plot(pos(run, run.lr["x"]), run.lr["lr"], "-", color=color, label=run.name)
            for start, name in run.stages[1:]:  # a dotted line where each later stage begins
                (at,) = pos(run, [start])
                for ax in (ax_loss, ax_acc, ax_lr):
                    ax.axvline(at, color=color, linestyle=":", linewidth=1)
                ax_acc.annotate(name, (at, 1.0), xycoords=("data", "axes fraction"), fontsize="x-small", va="top")
        for ax, title, ylabel in (
            (ax_loss, "loss", "cross-entropy"),
            (ax_acc, "top-1 accuracy", "%"),
            (ax_lr, "learning rate", "lr"),
        ):
            ax.set_title(title)
            ax.set_xlabel("epoch" if x == "epoch" else "minutes of training (epoch_time; validation not counted)")
            ax.set_ylabel(ylabel)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize="small")
        fig.tight_layout()
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        fig.savefig(tmp, format="png", dpi=DPI)  # fixed size in pixels: no bbox_inches="tight"
        tmp.replace(out)
    finally:
        plt.close(fig)
    return out


def main(argv: Sequence[str]) -> int:
    """``bitrain plot RUN_DIR [RUN_DIR ...] [--out FILE.png]``: write the PNG and print its path."""
    from bitrain.cli.args import ArgParser

    p = ArgParser(
        prog="bitrain plot",
        description="Loss, top-1 and lr against epoch from each run's metrics.csv; several runs are overlaid.",
    )
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directory (holding metrics.csv)")
    p.add_argument("--out", help=f"PNG to write (default: FIRST_RUN_DIR/{DEFAULT_NAME})")
    p.add_argument(
        "--x",
        default="epoch",
        choices=X_AXES,
        help="x axis: epoch (default) or time, minutes of training (each epoch's epoch_time summed): "
        "recipes compared at equal wall time",
    )
    ns = p.parse_args(list(argv))
    print(plot_runs(ns.run_dirs, ns.out, x=ns.x))
    return 0
