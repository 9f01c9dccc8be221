"""Input manifests: the list of source videos with their conditions.

Format: CSV (header row) or JSONL (one object per line), chosen by the file suffix. Columns:
``path`` (required; relative paths resolve against the manifest's directory), ``caption`` and/or
``label`` (integer class id; at least one of the two), optional ``start`` / ``end`` (seconds) and
``fps`` (override of the container's frame rate). Unknown columns are an error, so a typo such as
``lable`` cannot silently drop the conditions of a whole corpus.
"""
from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from videoar_common.exit_codes import InputError

COLUMNS = ("path", "caption", "label", "start", "end", "fps")


class ManifestError(InputError, ValueError):
    """A manifest row is malformed; the message names the file, the line and the column."""


@dataclass(frozen=True)
class VideoRecord:
    path: str
    caption: str = ""
    label: int = -1
    """Class id, -1 when the corpus is caption-only."""
    start: float | None = None
    end: float | None = None
    fps: float | None = None


def _parse_optional_float(value, where: str, column: str) -> float | None:
    if value in (None, ""):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ManifestError(f"{where}: column '{column}' must be a number, got {value!r}") from None


def _record_from_row(row: dict, where: str, root: Path) -> VideoRecord:
    unknown = set(row) - set(COLUMNS)
    if unknown:
        raise ManifestError(f"{where}: unknown column(s) {sorted(unknown)}; allowed: {list(COLUMNS)}")
    path = row.get("path")
    if not path:
        raise ManifestError(f"{where}: column 'path' is required and empty")
    caption = row.get("caption") or ""
    label_raw = row.get("label")
    if label_raw in (None, ""):
        label = -1
    else:
        try:
            label = int(label_raw)
        except (TypeError, ValueError):
            raise ManifestError(f"{where}: column 'label' must be an integer, got {label_raw!r}") from None
        if label < 0:
            raise ManifestError(f"{where}: column 'label' must be >= 0, got {label}")
    if not caption and label < 0:
        raise ManifestError(f"{where}: each row needs a 'caption' or a 'label'")
    full = Path(path)
    if not full.is_absolute():
        full = root / full
    return VideoRecord(path=str(full), caption=str(caption), label=label,
                       start=_parse_optional_float(row.get("start"), where, "start"),
                       end=_parse_optional_float(row.get("end"), where, "end"),
                       fps=_parse_optional_float(row.get("fps"), where, "fps"))


def read_manifest(path: str | Path) -> list[VideoRecord]:
    """Read a CSV or JSONL manifest; rows keep their file order."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest not found: {path}")
    root = path.parent.resolve()
    records = []
    if path.suffix == ".jsonl":
        with open(path) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ManifestError(f"{path}:{lineno}: not valid JSON: {e}") from None
                records.append(_record_from_row(row, f"{path}:{lineno}", root))
    elif path.suffix == ".csv":
        with open(path, newline="") as f:
            for lineno, row in enumerate(csv.DictReader(f), 2):
                records.append(_record_from_row(row, f"{path}:{lineno}", root))
    else:
        raise ManifestError(f"{path}: manifest must end in .csv or .jsonl")
    return records


def write_manifest(path: str | Path, records: list[VideoRecord], relative_to: Path | None = None) -> Path:
    """Write records as CSV or JSONL (by suffix); paths under ``relative_to`` are stored relative."""
    from videoar_common.atomic import atomic_write_text
    path = Path(path)

    def row(r: VideoRecord) -> dict:
        d = asdict(r)
        if relative_to is not None:
            try:
                d["path"] = str(Path(r.path).resolve().relative_to(relative_to.resolve()))
            except ValueError:
                pass
        if d["label"] < 0:  # caption-only: the label column stays empty, as read_manifest expects
            d["label"] = None
        return {k: v for k, v in d.items() if v is not None}

    if path.suffix == ".jsonl":
        text = "".join(json.dumps(row(r)) + "\n" for r in records)
    elif path.suffix == ".csv":
        import io
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(COLUMNS), lineterminator="\n")
        writer.writeheader()
        for r in records:
            writer.writerow(row(r))
        text = buf.getvalue()
    else:
        raise ManifestError(f"{path}: manifest must end in .csv or .jsonl")
    return atomic_write_text(path, text)
