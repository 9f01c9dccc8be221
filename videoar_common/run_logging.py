"""Run directory, console logging and metric sinks.

Every run writes metrics to ``metrics.jsonl`` in its run directory (always on: it is what tests,
audits and the plotting helper read). wandb (offline unless configured) and TensorBoard are optional
sinks fed the same records. The wandb run id is created once and stored in the run directory, so a
resumed job logs into the same wandb run. Only rank 0 writes metrics; every rank may log to console
at WARNING, rank 0 at INFO.
"""
from __future__ import annotations

import json
import logging
import math
import os
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from videoar_common.atomic import atomic_write_text

RUN_ID_FILE = "logger_run_id.txt"
METRICS_FILE = "metrics.jsonl"
LOGGER_NAME = "videoar"


@dataclass(kw_only=True)
class LoggingConfig:
    """Where metrics go besides ``metrics.jsonl`` (which is always written)."""

    log_every: int = 1
    """Log metrics every this many steps."""
    wandb: bool = False
    """Also log to Weights & Biases."""
    wandb_mode: str = "offline"
    """wandb mode: offline (default, never needs network), online or disabled."""
    wandb_project: str = "videoar-megatron"
    """wandb project name."""
    wandb_entity: str = ""
    """wandb entity (team); empty for the default."""
    tensorboard: bool = False
    """Also write TensorBoard event files to ``<run_dir>/tensorboard``."""
    progress_bar: bool = True
    """Show a tqdm progress bar on rank 0."""

    def __post_init__(self) -> None:
        if self.log_every < 1:
            raise ValueError(f"log_every must be >= 1, got {self.log_every}")
        if self.wandb_mode not in ("offline", "online", "disabled"):
            raise ValueError(f"wandb_mode must be offline, online or disabled, got {self.wandb_mode!r}")


def setup_console_logging(rank: int = 0, level: int = logging.INFO) -> logging.Logger:
    """Rank-tagged console logging: rank 0 at ``level``, other ranks at WARNING."""
    logger = logging.getLogger(LOGGER_NAME)
    logger.handlers.clear()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"%(asctime)s [rank {rank}] %(levelname)s %(message)s",
                                           datefmt="%H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(level if rank == 0 else logging.WARNING)
    logger.propagate = False
    return logger


def get_logger() -> logging.Logger:
    return logging.getLogger(LOGGER_NAME)


def load_or_create_run_id(run_dir: str | Path, run_id: str | None = None) -> str:
    """The logger run id stored in ``run_dir`` (created on first use). A checkpoint may hand in
    the id it recorded, which then wins."""
    path = Path(run_dir) / RUN_ID_FILE
    if run_id is None and path.is_file():
        run_id = path.read_text().strip()
    run_id = run_id or uuid.uuid4().hex[:12]
    if not path.is_file() or path.read_text().strip() != run_id:
        atomic_write_text(path, run_id + "\n")
    return run_id


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item") and callable(value.item):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class RunLogger:
    """Metric sink for one run: JSONL always; wandb and TensorBoard when configured. Rank 0 only."""

    def __init__(self, run_dir: str | Path, cfg: LoggingConfig, *, rank: int = 0,
                 run_id: str | None = None, config_dict: Mapping[str, Any] | None = None):
        self.run_dir = Path(run_dir)
        self.cfg = cfg
        self.enabled = rank == 0
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.run_id = load_or_create_run_id(self.run_dir, run_id) if self.enabled else (run_id or "")
        self._jsonl = open(self.run_dir / METRICS_FILE, "a") if self.enabled else None
        self._wandb = self._start_wandb(config_dict) if self.enabled and cfg.wandb else None
        self._tb = self._start_tensorboard() if self.enabled and cfg.tensorboard else None

    def _start_wandb(self, config_dict: Mapping[str, Any] | None):
        os.environ.setdefault("WANDB_SILENT", "true")
        import wandb
        return wandb.init(project=self.cfg.wandb_project, entity=self.cfg.wandb_entity or None,
                          id=self.run_id, resume="allow", mode=self.cfg.wandb_mode,
                          dir=str(self.run_dir), config=dict(config_dict or {}))

    def _start_tensorboard(self):
        from torch.utils.tensorboard import SummaryWriter
        return SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _jsonable(v) for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        numeric = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        if self._wandb is not None:
            self._wandb.log(numeric, step=int(step))
        if self._tb is not None:
            for key, value in numeric.items():
                self._tb.add_scalar(key, value, int(step))

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_metrics(path: str | Path) -> list[dict]:
    """All records of a ``metrics.jsonl`` file (a torn last line from a crash is ignored)."""
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def plot_metrics(jsonl_path: str | Path, png_path: str | Path, keys: Iterable[str] | None = None,
                 title: str = "") -> Path:
    """Plot metric curves (one panel per key, x = step) from a metrics JSONL file into a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(jsonl_path)
    if keys is None:
        keys = sorted({k for r in records for k, v in r.items()
                       if k != "step" and isinstance(v, (int, float))})
    keys = list(keys)
    if not keys:
        raise ValueError(f"{jsonl_path}: no numeric metrics to plot")
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, lw=1.2)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path
