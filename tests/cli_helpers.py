"""Checks shared by the CLI tests."""
from __future__ import annotations

import re

from videoar_common.exit_codes import EXIT_CONFIG


def assert_refused(capsys, code: int, pattern: str) -> str:
    """A ``videoar`` command refused an input the documented way: exit 2 and, as the last line on stderr,
    ``videoar COMMAND: <message>`` matching ``pattern``. Returns that line."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == EXIT_CONFIG, (code, err)
    assert lines and lines[-1].startswith("videoar ") and re.search(pattern, lines[-1]), err
    return lines[-1]
