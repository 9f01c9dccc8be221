"""UCF-101 input manifests from the official layout and split files.

Layout (as distributed)::

    UCF-101/<ClassName>/v_<ClassName>_gXX_cYY.avi
    ucfTrainTestlist/classInd.txt          "1 ApplyEyeMakeup" (1-based ids)
    ucfTrainTestlist/trainlist0{1,2,3}.txt "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1"
    ucfTrainTestlist/testlist0{1,2,3}.txt  "ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi"

The label (0-based) comes from the video's folder, looked up in classInd.txt case-insensitively
(the official folder ``HandStandPushups`` is ``HandstandPushups`` in classInd.txt); a train-list label
that disagrees with the folder is an error naming the line. The caption is the class name in words
("ApplyEyeMakeup" → "apply eye makeup"). Listed files that are missing stay in the manifest, so that
pre-tokenization reports them in rejects.jsonl rather than losing them silently; their count is
returned.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from data_prep.manifest import ManifestError, VideoRecord, write_manifest

SUBSETS = ("train", "test", "all")


def class_caption(name: str) -> str:
    """CamelCase class name → lower-case words."""
    return " ".join(w.lower() for w in re.findall(r"[A-Z][a-z]*|[a-z]+|\d+", name))


def read_class_index(path: Path) -> dict[str, tuple[int, str]]:
    """lower-cased class name → (0-based label, official name)."""
    classes = {}
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            idx, name = line.split()
            classes[name.lower()] = (int(idx) - 1, name)
        except ValueError:
            raise ManifestError(f"{path}:{lineno}: expected '<id> <ClassName>', got {line!r}") from None
    return classes


def _split_entries(path: Path, classes: dict, with_label: bool) -> list[tuple[str, int, str]]:
    entries = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        rel = parts[0].replace("\\", "/")
        folder = rel.split("/")[0]
        if folder.lower() not in classes:
            raise ManifestError(f"{path}:{lineno}: class folder {folder!r} is not in classInd.txt")
        label, name = classes[folder.lower()]
        if with_label and len(parts) > 1 and int(parts[1]) - 1 != label:
            raise ManifestError(f"{path}:{lineno}: label {parts[1]} disagrees with folder {folder!r} "
                                f"(classInd.txt says {label + 1})")
        entries.append((rel, label, name))
    return entries


def build_ucf101_manifest(root: str | Path, splits_dir: str | Path, out: str | Path, *, split: int = 1,
                          subset: str = "train") -> tuple[Path, int, int]:
    """Write a manifest for one official split; returns (path, rows, missing files)."""
    root, splits_dir, out = Path(root), Path(splits_dir), Path(out)
    if split not in (1, 2, 3):
        raise ValueError(f"split must be 1, 2 or 3, got {split}")
    if subset not in SUBSETS:
        raise ValueError(f"subset must be one of {SUBSETS}, got {subset!r}")
    if not root.is_dir():
        raise FileNotFoundError(f"UCF-101 video root not found: {root}")
    classes = read_class_index(splits_dir / "classInd.txt")
    entries = []
    if subset in ("train", "all"):
        entries += _split_entries(splits_dir / f"trainlist0{split}.txt", classes, with_label=True)
    if subset in ("test", "all"):
        entries += _split_entries(splits_dir / f"testlist0{split}.txt", classes, with_label=False)
    out.parent.mkdir(parents=True, exist_ok=True)
    records, missing = [], 0
    for rel, label, name in entries:
        path = (root / rel).resolve()
        missing += not path.is_file()
        # relative to the manifest's directory, so the manifest (and sample ids) move with the data
        records.append(VideoRecord(path=os.path.relpath(path, out.parent.resolve()),
                                   caption=class_caption(name), label=label))
    return write_manifest(out, records), len(records), missing
