"""What a run writes besides its checkpoints: the output folder, ``metrics.jsonl`` (a record per step),
a progress bar or a line every ``log_every`` steps, and ``curves.png``; every file atomically."""

from __future__ import annotations

import io
import json
import os
import sys
import tempfile
from pathlib import Path

from tqdm.auto import tqdm

from .._files import write_atomically
from .config import TrainConfig

__all__ = ["METRICS_NAME", "PLOT_NAME", "ensure_writable", "write_bytes_atomically", "plot_metrics",
           "Progress"]

METRICS_NAME = "metrics.jsonl"
PLOT_NAME = "curves.png"


def ensure_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as error:
        raise PermissionError(f"output folder {str(folder)!r} is not writable: {error}") from error


def write_bytes_atomically(path: Path, data: bytes) -> None:
    write_atomically(path, lambda temp: Path(temp).write_bytes(data))


def plot_metrics(metrics_path: str | os.PathLike, png_path: str | os.PathLike,
                 validation: dict | None = None) -> None:
    """Loss, accuracy and learning rate against the step, from a metrics JSONL file; a dashed line at
    every step a run resumed from (records with ``"resumed"``); ``validation`` (the validation numbers,
    with the ``step`` they were measured at) as points: classification's ``loss`` and ``top1`` on the
    loss and accuracy panels, segmentation's pixel accuracy ``aAcc`` on the accuracy panel (the training
    accuracy is pixel accuracy too) with its ``mIoU`` in the label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    if not records:
        return
    steps = [r["step"] for r in records]
    resumes = [r["step"] for r in records if r.get("resumed")]
    points = {}
    if validation is not None:
        accuracy = validation.get("top1", validation.get("aAcc"))
        points = {key: value for key, value in (("loss", validation.get("loss")), ("accuracy", accuracy))
                  if value is not None}
    label = "validation"
    if validation is not None and validation.get("mIoU") is not None:
        label = f"validation (mIoU {validation['mIoU']:.3f})"
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, key, title in zip(axes, ("loss", "accuracy", "lr"), ("loss", "accuracy", "learning rate")):
        ax.plot(steps, [r[key] for r in records], linewidth=1, label="training")
        for i, step in enumerate(resumes):
            ax.axvline(step, color="grey", linestyle="--", linewidth=0.8, label="resumed" if i == 0 else None)
        if key in points:
            value = points[key]
            ax.plot([validation["step"]], [value], "o", color="tab:red", label=label)
            ax.annotate(f"{value:.3f}", (validation["step"], value), textcoords="offset points",
                        xytext=(-4, 6), ha="right", color="tab:red")
        if resumes or key in points:
            ax.legend(fontsize=8)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    write_bytes_atomically(Path(png_path), buffer.getvalue())


class Progress:
    """The records, messages and curves of a run on ``output``; only the main rank (``is_main``) shows or
    writes anything."""

    def __init__(self, output: Path, name: str, config: TrainConfig, is_main: bool):
        self.metrics_path = output / METRICS_NAME
        self.plot_path = output / PLOT_NAME
        self.name, self.config, self.is_main = name, config, is_main
        self.plotting = True  # until matplotlib turns out to be missing
        self.bar = None

    def log(self, message: str) -> None:
        if self.is_main:
            tqdm.write(message, file=sys.stdout)  # above a progress bar if there is one
            sys.stdout.flush()

    def start_metrics(self, step: int) -> None:
        """Keep the records up to the resumed ``step`` (a killed run may have logged steps past it); the
        record of that step gets ``"resumed": true`` (the plot marks it)."""
        if not self.is_main:
            return
        kept = []
        if step > 0 and self.metrics_path.exists():
            kept = [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line.strip()]
            kept = [record for record in kept if record["step"] <= step]
            if kept and kept[-1]["step"] == step:
                kept[-1]["resumed"] = True
        write_bytes_atomically(self.metrics_path, "".join(json.dumps(r) + "\n" for r in kept).encode())

    def open_bar(self, step: int, resumed: bool) -> None:
        c = self.config
        desc = self.name if not resumed else f"{self.name} (resumed at {step})"
        self.bar = tqdm(total=c.steps, initial=step, disable=not (c.progress and self.is_main),
                        desc=desc, dynamic_ncols=True)

    def write(self, record: dict) -> None:
        """A step's record: appended to the metrics, shown on the bar or, every ``log_every`` steps, in a
        line."""
        c, step, lr = self.config, record["step"], record["lr"]
        if self.is_main:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{record['accuracy']:.3f}", lr=f"{lr:.2e}",
                             img_s=f"{record['images_per_s']:.0f}")
        if not c.progress and c.log_every and (step % c.log_every == 0 or step == c.steps):
            self.log(f"{self.name} step {step}/{c.steps}: loss {record['loss']:.4f}, accuracy "
                     f"{record['accuracy']:.3f}, lr {lr:.2e}, {record['images_per_s']:.0f} images/s, "
                     f"{record['elapsed_s']:.0f} s")

    def plot(self) -> None:
        if not (self.is_main and self.plotting):
            return
        try:
            plot_metrics(self.metrics_path, self.plot_path)
        except ImportError as error:  # matplotlib is optional (the data extra); the metrics have the numbers
            self.plotting = False
            self.log(f"{PLOT_NAME} is not drawn: matplotlib cannot be imported ({error}); {METRICS_NAME} has "
                     f"every number (pip install matplotlib for the plot)")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
