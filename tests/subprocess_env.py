"""Environment for child processes started by tests: the checkout first on ``PYTHONPATH``.

The checkout is prepended, never substituted: on the GPU hosts the dependencies themselves live on
``PYTHONPATH`` (a staged site folder), and a child that loses them fails on its first import.
"""
from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def repo_pythonpath() -> str:
    """``PYTHONPATH`` for a child: this checkout, then whatever the parent already had."""
    return os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)


def child_env(**extra: str) -> dict[str, str]:
    """``os.environ`` with :func:`repo_pythonpath` and the given overrides."""
    return {**os.environ, "PYTHONPATH": repo_pythonpath(), **extra}
