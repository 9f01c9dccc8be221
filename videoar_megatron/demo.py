"""The end-to-end demo: synthetic corpus → tokenizer → token shards → AR model → samples → report.

Design decision: the demo is a list of ``videoar`` command lines, run as subprocesses exactly as a user
would type them (same CLI, same recipes under ``recipes/demo/``), so it exercises the real entry
points rather than a parallel code path. Each stage writes a ``.done-<stage>`` marker in the output
directory when its command succeeded; re-running skips finished stages (and the stages' own
resume logic covers an interrupted one). Presets change sizes only (``--set`` overrides), never code.

A stage's output goes to its log file, so the console would be silent for minutes: while a training
stage runs, the demo reads its ``metrics.jsonl`` every few seconds and prints the step, the loss (or
PSNR) and an ETA. How long the whole demo takes is measured in docs/BENCHMARKS.md (section "CPU"), the
one place that states it.
"""
from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from videoar_common.atomic import atomic_write_json
from videoar_common.run_logging import plot_metrics, read_metrics

REPO = Path(__file__).resolve().parents[1]
CLASSES = 4


@dataclass(frozen=True)
class Preset:
    """Sizes of one demo run."""

    videos: int
    eval_videos: int
    tokenizer_image_steps: int
    tokenizer_steps: int
    ar_steps: int
    samples_per_class: int


TIMING_DOC = "docs/BENCHMARKS.md#cpu-2-cores-no-gpu-the-ci-machine"
"""Where the demo's measured duration is written (README and ``videoar demo --help`` point there)."""

PRESETS = {
    # the duration of each: TIMING_DOC
    "full": Preset(videos=64, eval_videos=8, tokenizer_image_steps=400, tokenizer_steps=300, ar_steps=1500,
                   samples_per_class=3),
    # the same code path at a fraction of the work, for CI
    "ci": Preset(videos=24, eval_videos=4, tokenizer_image_steps=150, tokenizer_steps=60, ar_steps=250,
                 samples_per_class=1),
}


class StageFailed(RuntimeError):
    """A stage's command exited non-zero (``returncode``: its exit code) or left out an expected file (1)."""

    def __init__(self, message: str, returncode: int = 1):
        super().__init__(message)
        self.returncode = returncode


@dataclass(frozen=True)
class Progress:
    """What to show on the console while a stage trains: read from its metrics file."""

    metrics: Path
    total_steps: int
    show: tuple[str, ...]
    """Metric keys printed with the step (the first record that has them all counts as a step)."""


@dataclass
class Stage:
    name: str
    commands: list[list[str]]
    outputs: list[Path] = field(default_factory=list)
    """Files the stage must have produced (checked after its commands)."""
    progress: Progress | None = None


def _videoar(*args: str) -> list[str]:
    return [sys.executable, "-m", "videoar_megatron.cli", *map(str, args)]


def stages(out: Path, preset: Preset) -> list[Stage]:
    corpus, held_out = out / "corpus", out / "corpus_eval"
    tok_image, tok, shards, ar, samples = (out / n for n in ("tokenizer_image", "tokenizer", "shards", "ar",
                                                             "samples"))
    data = ["--set", f"data.manifest={corpus / 'metadata.csv'}", "--set",
            f"eval.manifest={held_out / 'metadata.csv'}", "--set", "logging.progress_bar=false"]
    return [
        Stage("corpus", [
            _videoar("synth", "--out", corpus, "--num", preset.videos, "--classes", CLASSES, "--frames", 17,
                     "--size", "32x32", "--seed", 0),
            _videoar("synth", "--out", held_out, "--num", preset.eval_videos, "--classes", CLASSES,
                     "--frames", 17, "--size", "32x32", "--seed", 1000)],
            [corpus / "metadata.csv", held_out / "metadata.csv"]),
        Stage("tokenizer_image", [
            _videoar("tokenizer", "train", "--recipe", "recipes/demo/tokenizer_image.yaml", "--run-dir", tok_image,
                     *data, "--set", f"steps={preset.tokenizer_image_steps}")],
            [tok_image / "tokenizer" / "COMMITTED"],
            Progress(tok_image / "metrics.jsonl", preset.tokenizer_image_steps, ("psnr",))),
        Stage("tokenizer", [
            _videoar("tokenizer", "train", "--recipe", "recipes/demo/tokenizer.yaml", "--run-dir", tok, *data,
                     "--set", f"init.from_tokenizer={tok_image / 'tokenizer'}",
                     "--set", f"steps={preset.tokenizer_steps}"),
            _videoar("tokenizer", "eval", "--run", tok, "--manifest", held_out / "metadata.csv",
                     "--compare-untrained", "--out", out / "tokenizer_eval")],
            [tok / "tokenizer" / "COMMITTED", out / "tokenizer_eval" / "trained" / "eval.json"],
            Progress(tok / "metrics.jsonl", preset.tokenizer_steps, ("psnr",))),
        Stage("shards", [
            _videoar("pretokenize", "--recipe", "recipes/demo/pretokenize.yaml",
                     "--set", f"tokenizer={tok / 'tokenizer'}", "--set", f"input_manifest={corpus / 'metadata.csv'}",
                     "--set", f"output_dir={shards}")],
            [shards / "COMMITTED"]),
        Stage("ar", [
            _videoar("train", "--recipe", "recipes/demo/ar.yaml", "--run-dir", ar, "--set", f"data.path={shards}",
                     "--set", f"train.steps={preset.ar_steps}", "--set", "logging.progress_bar=false")],
            [ar / "metrics.jsonl"], Progress(ar / "metrics.jsonl", preset.ar_steps, ("loss", "bit_accuracy"))),
        Stage("samples", [
            _videoar("sample", "--ckpt", ar / "checkpoints", "--tokenizer", tok / "tokenizer",
                     "--recipe", "recipes/demo/sample.yaml", "--class", ",".join(map(str, range(CLASSES))),
                     "--num", preset.samples_per_class, "--out", samples)],
            [samples / "index.json"]),
    ]


def _last_step(progress: Progress) -> dict | None:
    """The newest training record of the stage's metrics file (``None`` before the first one)."""
    if not progress.metrics.is_file():
        return None
    records = [r for r in read_metrics(progress.metrics) if "step" in r and all(k in r for k in progress.show)]
    return records[-1] if records else None


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}m{secs:02d}s"


class _ProgressLine:
    """``step 300/1500, loss 0.412, bit_accuracy 0.81, 1m05s, ETA 4m20s`` from successive reads; the
    rate counts only steps trained since the stage (re)started, so a resumed stage gets a true ETA."""

    def __init__(self, progress: Progress):
        self.progress, self.start, self.first, self.shown = progress, time.monotonic(), None, None

    def update(self) -> str | None:
        record = _last_step(self.progress)
        if record is None or record["step"] == self.shown:
            return None
        step, now = record["step"], time.monotonic()
        if self.first is None:
            self.first = (step, now)
        self.shown = step
        values = ", ".join(f"{k} {record[k]:.3f}" for k in self.progress.show)
        done, seconds = step - self.first[0], now - self.first[1]
        eta = f", ETA {_clock(seconds / done * (self.progress.total_steps - step))}" if done > 0 else ""
        return f"step {step}/{self.progress.total_steps}, {values}, {_clock(now - self.start)}{eta}"


def _run_command(cmd: list[str], log_file, progress: Progress | None, report, every: float) -> int:
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log_file, stderr=subprocess.STDOUT)
    line = _ProgressLine(progress) if progress else None
    try:
        while True:
            try:
                return proc.wait(timeout=every)
            except subprocess.TimeoutExpired:
                text = line.update() if line else None
                if text:
                    report(text)
    except BaseException:  # Ctrl-C: a trainer saves on SIGTERM (and exits 75); a rerun resumes the stage
        proc.terminate()
        proc.wait()
        raise


def run_stage(stage: Stage, out: Path, log=print, progress_every: float = 15.0) -> float:
    """Run a stage's commands (output to ``out/logs/<stage>.log``, training progress to ``log`` every
    ``progress_every`` seconds); returns seconds taken."""
    (out / "logs").mkdir(parents=True, exist_ok=True)
    log_path = out / "logs" / f"{stage.name}.log"
    start = time.monotonic()
    with open(log_path, "a") as log_file:
        for cmd in stage.commands:
            log_file.write(f"\n$ {' '.join(cmd)}\n")
            log_file.flush()
            returncode = _run_command(cmd, log_file, stage.progress, lambda text: log(f"[demo] {stage.name}: {text}"),
                                      progress_every)
            if returncode != 0:
                tail = log_path.read_text(errors="replace")[-3000:]
                raise StageFailed(f"demo stage '{stage.name}' failed (exit {returncode}): "
                                  f"{' '.join(cmd)}\n--- last lines of {log_path} ---\n{tail}", returncode)
    missing = [str(p) for p in stage.outputs if not p.exists()]
    if missing:
        raise StageFailed(f"demo stage '{stage.name}' finished but did not write {missing}; see {log_path}")
    return time.monotonic() - start


def run_demo(out: Path, preset_name: str = "full", log=print, progress_every: float = 15.0) -> dict:
    """Run (or resume) every stage, then write the report; returns the report's metrics."""
    preset = PRESETS[preset_name]
    out.mkdir(parents=True, exist_ok=True)
    timings = _read_json(out / "timings.json")
    plan = stages(out, preset)
    log(f"[demo] {out}: " + ", ".join(s.name + (f" ({s.progress.total_steps} steps)" if s.progress else "")
                                      for s in plan) + f", then report/; measured duration: {TIMING_DOC}")
    start = time.monotonic()
    for stage in plan:
        marker = out / f".done-{stage.name}"
        if marker.exists():
            log(f"[demo] {stage.name}: done earlier, skipped")
            continue
        log(f"[demo] {stage.name}: running (log: {out / 'logs' / (stage.name + '.log')})")
        timings[stage.name] = round(run_stage(stage, out, log, progress_every), 1)
        atomic_write_json(out / "timings.json", timings)
        marker.write_text(json.dumps({"seconds": timings[stage.name]}))
        log(f"[demo] {stage.name}: finished in {timings[stage.name]:.0f} s")
    metrics = write_report(out, preset_name, timings)
    log(f"[demo] report: {out / 'report'} (metrics.json, recon_grid.png, loss_curves.png, samples.gif, "
        f"sample_frames.png); this run {_clock(time.monotonic() - start)}, the stages "
        f"{_clock(sum(timings.values()))} in all")
    return metrics


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _mean(records: list[dict], key: str) -> float:
    return statistics.fmean(r[key] for r in records)


def ar_summary(metrics_path: Path, window: int = 20) -> dict:
    """Loss and bit accuracy at the start and end of AR training (means over ``window`` steps)."""
    records = [r for r in read_metrics(metrics_path) if isinstance(r.get("loss"), (int, float))]
    first, last = records[:window], records[-window:]
    scales = sorted(int(k[len("acc_scale"):]) for k in records[-1] if k.startswith("acc_scale"))
    return {"ar_steps": records[-1]["step"],
            "ar_loss_start": _mean(first, "loss"), "ar_loss_end": _mean(last, "loss"),
            "ar_bit_accuracy_start": _mean(first, "bit_accuracy"), "ar_bit_accuracy_end": _mean(last, "bit_accuracy"),
            "ar_bit_accuracy_per_scale_end": [_mean(last, f"acc_scale{k}") for k in scales]}


def write_report(out: Path, preset_name: str, timings: dict) -> dict:
    """``out/report``: metrics.json, recon_grid.png, loss_curves.png, samples.gif, sample_frames.png."""
    report = out / "report"
    report.mkdir(exist_ok=True)
    trained = _read_json(out / "tokenizer_eval" / "trained" / "eval.json")
    untrained = _read_json(out / "tokenizer_eval" / "untrained" / "eval.json")
    index = _read_json(out / "samples" / "index.json")
    metrics = {"preset": preset_name,
               "tokenizer_psnr_db": trained["psnr"], "tokenizer_ssim": trained["ssim"],
               "tokenizer_psnr_untrained_db": untrained.get("psnr"),
               **ar_summary(out / "ar" / "metrics.jsonl"),
               "samples": len(index["samples"]), "sample_frames": index["samples"][0]["frames"],
               "stage_seconds": timings}
    atomic_write_json(report / "metrics.json", metrics)
    shutil.copyfile(out / "tokenizer_eval" / "trained" / "recon_grid.png", report / "recon_grid.png")
    shutil.copyfile(out / "samples" / "grid.gif", report / "samples.gif")
    shutil.copyfile(out / "samples" / "frames.png", report / "sample_frames.png")
    plot_metrics(out / "ar" / "metrics.jsonl", report / "loss_curves.png",
                 keys=["loss", "bit_accuracy", *(f"loss_scale{k}" for k in range(4))],
                 title="VideoAR demo: AR training (tokenizer curves: tokenizer/loss_curves.png)")
    return metrics
