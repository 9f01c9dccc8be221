"""Where ``torch.compile`` keeps what it compiled, so a requeued job or another node does not compile again.

Design decisions:

- **Only the directory is ours.** Inductor already caches on disk, keyed by graph, shapes, devices and
  versions: the FX graph cache (generated code) and the AOTAutograd cache (forward + backward graphs)
  are on by default in torch 2.11, and the Triton kernels they compiled sit beside them. Entries are
  written to a temporary name and renamed, so processes and nodes can share one directory. What a warm
  cache leaves is Dynamo's tracing (seconds per process); what it saves is code generation and Triton
  compilation (minutes for FlexAttention on a fresh host, docs/BENCHMARKS.md).
- **The directory follows the run**: ``compile.cache_dir`` if set; else ``TORCHINDUCTOR_CACHE_DIR``
  from the environment (``slurm/site.sh`` points every node of every job at one shared path); else
  ``<run_dir>/compile_cache``, which a requeued job finds again. Inductor's default, a per-user
  folder under /tmp, is lost with the node.
- **Set before anything compiles**: Inductor and Triton read ``TORCHINDUCTOR_CACHE_DIR`` and
  ``TRITON_CACHE_DIR`` when they first look a graph or kernel up, so the trainer calls
  :func:`configure_compile_cache` before the process group, the model and the first step.
- Torch's "mega-cache" (``torch.compiler.save_cache_artifacts`` / ``load_cache_artifacts``) bundles the
  same entries into bytes for hosts without a shared filesystem; with a directory that persists and
  can be shared it would only store them twice, so it is not used.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

INDUCTOR_ENV = "TORCHINDUCTOR_CACHE_DIR"
TRITON_ENV = "TRITON_CACHE_DIR"
RUN_SUBDIR = "compile_cache"


@dataclass(kw_only=True)
class CompileConfig:
    """Where compiled kernels are cached (torch.compile / Inductor / Triton)."""

    cache_dir: str = ""
    """Directory of the compile caches: Inductor's (TORCHINDUCTOR_CACHE_DIR: FX graph and AOTAutograd
    caches) and Triton's kernels (TRITON_CACHE_DIR = <dir>/triton). "" = TORCHINDUCTOR_CACHE_DIR from the
    environment when set (slurm/site.sh can point all nodes at one shared path), else
    <run_dir>/compile_cache. Set before anything compiles; a requeued job or another node using the same
    directory starts without recompiling (the log prints the time to the first step)."""


@dataclass(frozen=True)
class CompileCache:
    """The cache directory a process uses, and why."""

    path: Path
    origin: str
    """'compile.cache_dir', 'environment TORCHINDUCTOR_CACHE_DIR' or 'the run directory'."""
    warm: bool
    """Whether it already held entries when the process started."""

    def describe(self) -> str:
        state = "holds entries from earlier runs" if self.warm else "empty: this run compiles and fills it"
        return f"compile cache {self.path} (from {self.origin}; {state})"


def _site_inductor_dir() -> str | None:
    """TORCHINDUCTOR_CACHE_DIR as the site set it (Inductor writes its own default into the variable on
    first use: that one is not a choice)."""
    value = os.environ.get(INDUCTOR_ENV)
    if not value:
        return None
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir
        if os.path.abspath(value) == os.path.abspath(default_cache_dir()):
            return None
    except ImportError:  # another torch layout: take the variable as given
        pass
    return value


def configure_compile_cache(cfg: CompileConfig, run_dir: str | Path) -> CompileCache:
    """Point Inductor's and Triton's caches at the run's directory (see the module docstring); returns it.
    Every rank calls it with the same arguments and gets the same directory."""
    site = _site_inductor_dir()
    if cfg.cache_dir:
        path, origin = Path(cfg.cache_dir), "compile.cache_dir"
    elif site:
        path, origin = Path(site), f"environment {INDUCTOR_ENV}"
    else:
        path, origin = Path(run_dir) / RUN_SUBDIR, "the run directory"
    path = path.absolute()
    path.mkdir(parents=True, exist_ok=True)
    warm = any(path.iterdir())
    os.environ[INDUCTOR_ENV] = str(path)
    # The site's own Triton folder stays when the site chose the directory; otherwise the run's wins.
    if not (origin.startswith("environment") and os.environ.get(TRITON_ENV)):
        os.environ[TRITON_ENV] = str(path / "triton")
    return CompileCache(path=path, origin=origin, warm=warm)
