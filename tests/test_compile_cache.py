"""The compile cache follows the run (videoar_common/compile_cache.py): which directory wins, and that a
second process using it loads what the first compiled instead of compiling again (Inductor on CPU, a
real torch.compile in two subprocesses)."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from tests.subprocess_env import child_env
from videoar_common.compile_cache import INDUCTOR_ENV, TRITON_ENV, CompileConfig, configure_compile_cache


@pytest.fixture
def clean_env(monkeypatch):
    """The variables as a fresh process without a site file has them; restored after the test."""
    monkeypatch.delenv(INDUCTOR_ENV, raising=False)
    monkeypatch.delenv(TRITON_ENV, raising=False)
    return monkeypatch


def test_default_is_under_the_run_directory(clean_env, tmp_path):
    cache = configure_compile_cache(CompileConfig(), tmp_path / "run")
    assert cache.path == (tmp_path / "run" / "compile_cache").absolute() and cache.path.is_dir()
    assert cache.origin == "the run directory" and not cache.warm
    import os
    assert os.environ[INDUCTOR_ENV] == str(cache.path) and os.environ[TRITON_ENV] == str(cache.path / "triton")


def test_a_site_directory_beats_the_default_and_the_knob_beats_both(clean_env, tmp_path):
    import os
    shared = tmp_path / "shared"
    clean_env.setenv(INDUCTOR_ENV, str(shared))
    clean_env.setenv(TRITON_ENV, str(tmp_path / "site_triton"))
    cache = configure_compile_cache(CompileConfig(), tmp_path / "run")
    assert cache.path == shared and cache.origin == f"environment {INDUCTOR_ENV}"
    assert os.environ[TRITON_ENV] == str(tmp_path / "site_triton")      # the site's Triton folder stays
    assert not (tmp_path / "run").exists()
    (shared / "fxgraph").mkdir()
    assert configure_compile_cache(CompileConfig(), tmp_path / "run").warm
    mine = configure_compile_cache(CompileConfig(cache_dir=str(tmp_path / "mine")), tmp_path / "run")
    assert mine.path == tmp_path / "mine" and mine.origin == "compile.cache_dir"
    assert os.environ[INDUCTOR_ENV] == str(mine.path) and os.environ[TRITON_ENV] == str(mine.path / "triton")


def test_inductors_own_default_in_the_environment_is_not_a_site_choice(clean_env, tmp_path):
    """Inductor writes its /tmp default into TORCHINDUCTOR_CACHE_DIR on first use; that must not pass for a
    site's shared path (the run directory would lose its cache to /tmp)."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    clean_env.setenv(INDUCTOR_ENV, default_cache_dir())
    assert configure_compile_cache(CompileConfig(), tmp_path / "run").origin == "the run directory"


CHILD = textwrap.dedent("""
    import json, sys
    from videoar_common.compile_cache import CompileConfig, configure_compile_cache
    cache = configure_compile_cache(CompileConfig(cache_dir=sys.argv[1]), "unused")
    import torch
    from torch._dynamo.utils import counters

    @torch.compile(dynamic=False)
    def f(x):
        return torch.nn.functional.gelu(x @ x.T).sum(dim=0) * 3
    f(torch.randn(16, 8))
    print(json.dumps({"warm": cache.warm, "hit": counters["inductor"]["fxgraph_cache_hit"],
                      "miss": counters["inductor"]["fxgraph_cache_miss"]}))
""")


def run_child(cache_dir) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, str(cache_dir)], capture_output=True, text=True,
                          timeout=300, env=child_env(OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_a_second_process_loads_what_the_first_compiled(tmp_path):
    """Cold (a fresh directory, the control): Inductor compiles and writes its FX graph cache into the
    configured directory. Warm: a new process with the same directory takes the graph from it (a hit,
    no miss)."""
    cold = run_child(tmp_path / "cache")
    assert not cold["warm"] and cold["miss"] >= 1 and cold["hit"] == 0, cold
    assert any((tmp_path / "cache").rglob("*")), "nothing written where the run said"
    warm = run_child(tmp_path / "cache")
    assert warm["warm"] and warm["hit"] >= 1 and warm["miss"] == 0, warm
