"""Data of tokenizer training: the manifests (or a synthetic corpus), each rank's clip streams, held-out batches.

Design decisions:
- Decoding, clip sampling, per-rank sharding and exact resume belong to ``data_prep.clip_dataset``; this
  module only decides *which* streams a run has and which one an optimizer step reads: with
  ``data.image_every = k`` every k-th step is an image step, decided by the applied-step counter, so the
  choice is replayed exactly on resume.
- The synthetic corpus (``data.synth``) is written once into the run directory and committed with a
  marker, so a resumed or re-run job reuses it instead of regenerating it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from data_prep.clip_dataset import (ClipStream, RejectLog, VideoSource, eval_batches, read_sources,
                                    source_for)
from data_prep.manifest import ManifestError
from tokenizer.train_config import TokenizerTrainConfig
from videoar_common.atomic import is_committed, mark_committed
from videoar_common.distributed import DistContext
from videoar_common.exit_codes import InputError
from videoar_common.run_logging import get_logger


class DataSourcesChanged(InputError, RuntimeError):
    """A checkpoint's data positions belong to other streams (video and/or image) than this recipe's."""


@dataclass
class DataPaths:
    video_manifest: str
    image_manifest: str
    eval_manifest: str


def prepare_data(cfg: TokenizerTrainConfig, run_dir: Path, ctx: DistContext) -> DataPaths:
    """Manifests to train and evaluate on; writes the synthetic corpus first when the recipe asks. A
    manifest that is not there is refused here, naming its knob, before any engine is built."""
    if not cfg.data.synth.enabled:
        for knob, path in (("data.manifest", cfg.data.manifest), ("data.image_manifest", cfg.data.image_manifest),
                           ("eval.manifest", cfg.eval.manifest)):
            if path and not Path(path).is_file():
                raise ManifestError(f"{knob}={path}: manifest not found")
        return DataPaths(cfg.data.manifest, cfg.data.image_manifest, cfg.eval.manifest)
    s, clip = cfg.data.synth, cfg.data.clip
    out = {}
    for split, num, seed in (("train", s.num_train, s.seed), ("eval", s.num_eval, s.seed + 1000)):
        root = run_dir / "synth" / split
        if ctx.is_main and not is_committed(root):
            from data_prep.synth import make_corpus
            get_logger().info("writing synthetic %s corpus (%d videos) to %s", split, num, root)
            make_corpus(root, num=num, classes=s.classes, codec=s.codec, frames=s.frames,
                        size=(clip.height, clip.width), seed=seed)
            mark_committed(root, {"num": num, "seed": seed})
        out[split] = str(root / "metadata.csv")
    ctx.barrier()
    return DataPaths(out["train"], out["train"] if cfg.data.image_every else "", out["eval"])


def decode_device(cfg: TokenizerTrainConfig, ctx: DistContext) -> str:
    """DALI decode device: data.decode_device, or NVDEC when training on CUDA (auto)."""
    want = cfg.data.decode_device
    return ("gpu" if ctx.device.type == "cuda" else "cpu") if want == "auto" else want


class TrainStreams:
    """This rank's video and/or image clip streams, and which one each optimizer step reads."""

    def __init__(self, cfg: TokenizerTrainConfig, paths: DataPaths, ctx: DistContext, rejects: RejectLog):
        d = cfg.data
        self.image_every = d.image_every
        self._device, self._device_id = decode_device(cfg, ctx), max(ctx.device.index or 0, 0)
        self._common = dict(rank=ctx.rank, world_size=ctx.world_size, seed=d.seed, rejects=rejects)
        self.video = self._video(cfg, paths.video_manifest) if paths.video_manifest else None
        self.image = self._image(cfg, paths.image_manifest) if paths.image_manifest else None

    def _video(self, cfg: TokenizerTrainConfig, manifest: str) -> ClipStream:
        d = cfg.data
        src = VideoSource(d.clip, device=self._device, device_id=self._device_id, num_threads=d.decode_threads,
                          batch_size=d.micro_batch_size)
        return ClipStream(read_sources(manifest), src, batch_size=d.micro_batch_size, name="video",
                          origin=manifest, **self._common)

    def _image(self, cfg: TokenizerTrainConfig, manifest: str) -> ClipStream:
        d = cfg.data
        records = read_sources(manifest)
        src = source_for(records, dataclasses.replace(d.clip, num_frames=1), device=self._device,
                         device_id=self._device_id, num_threads=d.decode_threads,
                         batch_size=d.image_micro_batch_size, origin=manifest)
        return ClipStream(records, src, batch_size=d.image_micro_batch_size, name="image", origin=manifest,
                          **self._common)

    def is_image_step(self, step: int) -> bool:
        """Whether the optimizer step after ``step`` applied steps reads images."""
        if self.video is None:
            return True
        if self.image is None:
            return False
        k = self.image_every
        return k > 0 and step % k == k - 1

    def for_step(self, step: int) -> tuple[ClipStream, bool]:
        """(the stream the next optimizer step reads, whether it is an image step)."""
        image_step = self.is_image_step(step)
        return (self.image if image_step else self.video), image_step

    def state_dict(self) -> dict:
        return {"video_stream": self.video.state_dict() if self.video else None,
                "image_stream": self.image.state_dict() if self.image else None}

    def load_state_dict(self, state: dict) -> None:
        """Restore both positions; :class:`DataSourcesChanged` when the saved streams differ from these."""
        for stream, key in ((self.video, "video_stream"), (self.image, "image_stream")):
            if (stream is None) != (state[key] is None):
                raise DataSourcesChanged(f"the data sources changed ({key}) since the checkpoint")
            if stream is not None:
                stream.load_state_dict(state[key])


def held_out_batches(cfg: TokenizerTrainConfig, manifest: str, ctx: DistContext, rejects: RejectLog):
    """The held-out clips of eval.manifest (centre clip of each source, file order), batched."""
    e, d = cfg.eval, cfg.data
    records = read_sources(manifest)
    source = source_for(records, d.clip, device=decode_device(cfg, ctx), device_id=max(ctx.device.index or 0, 0),
                        num_threads=d.decode_threads, batch_size=e.batch_size, origin=manifest)
    return eval_batches(records, source, batch_size=e.batch_size, limit=e.num_clips, rejects=rejects)
