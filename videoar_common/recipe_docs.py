"""Generate ``docs/recipes.md``, the reference of every recipe key, from the config dataclasses.

Design decision: the reference is rendered from the field docstrings (``config.iter_fields``) and the
shipped ``recipes/<stage>/*.yaml`` files, never written by hand, so it cannot drift from the code;
``tests/test_docs.py`` fails when the committed file differs from this module's output.

    python -m videoar_common.recipe_docs --write docs/recipes.md   # regenerate (make docs)
    python -m videoar_common.recipe_docs --check docs/recipes.md   # exit 1 when stale

Stage config classes are named by import path and imported on use, so ``common`` keeps no import-time
dependency on the stage packages.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import re
import sys
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal, Union

import yaml

from videoar_common.config import BASE_KEY, config_to_dict, iter_fields

REPO = Path(__file__).resolve().parents[1]
DOC_PATH = "docs/recipes.md"
REGENERATE = f"python -m videoar_common.recipe_docs --write {DOC_PATH}"
_CODE_SPAN = re.compile(r"(`+)(.+?)\1", re.S)


@dataclass(frozen=True)
class Stage:
    """One recipe folder and the root config class its recipes are loaded into."""

    folder: str
    """Directory under ``recipes/``."""
    title: str
    """Section heading."""
    config: str
    """Root config class as ``module:Class``; empty for a folder of other stages' recipes."""
    cli_module: str
    """The ``videoar_megatron.cli`` module that loads these recipes (checked by tests/test_docs.py)."""
    commands: tuple[str, ...]
    """Command lines that take one of these recipes."""
    guide: str
    """The stage's guide under docs/ (empty: none)."""


STAGES: tuple[Stage, ...] = (
    Stage("tokenizer", "Tokenizer training", "tokenizer.train_config:TokenizerTrainConfig",
          "videoar_megatron.cli.tokenizer_cmd",
          ("videoar tokenizer train --recipe RECIPE", "videoar tokenizer inflate --recipe RECIPE ..."),
          "tokenizer.md"),
    Stage("pretokenize", "Pre-tokenization", "data_prep.pretokenize.config:PretokenizeConfig",
          "videoar_megatron.cli.pretokenize", ("videoar pretokenize --recipe RECIPE",), "pretokenize.md"),
    Stage("ar", "AR training", "videoar_megatron.training.config:TrainConfig", "videoar_megatron.cli.train",
          ("videoar train --recipe RECIPE",), "training.md"),
    Stage("sample", "Sampling", "videoar_megatron.sampling.config:SamplingConfig", "videoar_megatron.cli.sample",
          ("videoar sample --recipe RECIPE", "videoar eval fvd --sample-recipe RECIPE ..."), "sampling.md"),
    Stage("eval", "Evaluation", "videoar_megatron.evaluation.config:EvalConfig", "videoar_megatron.cli.eval",
          ("videoar eval {fvd,rfvd,real-stats} --recipe RECIPE ...",), "evaluation.md"),
    Stage("demo", "Demo", "", "videoar_megatron.cli.demo", ("videoar demo",), ""),
)


def load_class(spec: str) -> type:
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


# ----------------------------------------------------------------------------------------------
# Fields: every leaf key of a root config, including the item fields of lists of sections.
# ----------------------------------------------------------------------------------------------

def _list_item_class(tp: Any) -> type | None:
    """The dataclass of a ``list[Section]`` field (e.g. ``data.mix``), whose items have keys too."""
    if typing.get_origin(tp) in (list, tuple):
        args = typing.get_args(tp)
        if len(args) == 1 and dataclasses.is_dataclass(args[0]):
            return args[0]
    return None


def all_fields(cls: type) -> Iterator[tuple[str, Any, Any, str]]:
    """``iter_fields`` plus ``key[].field`` rows for list-of-section fields."""
    for key, tp, default, doc in iter_fields(cls):
        yield key, tp, default, doc
        item_cls = _list_item_class(tp)
        if item_cls is not None:
            yield from iter_fields(item_cls, f"{key}[].")


# ----------------------------------------------------------------------------------------------
# Markdown rendering of one value.
# ----------------------------------------------------------------------------------------------

def type_label(tp: Any) -> str:
    """Short Python spelling of an annotation: ``int``, ``list[int]``, ``int | None``, ``'a' | 'b'``."""
    if tp is type(None):
        return "None"
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return " | ".join(type_label(a) for a in args)
    if origin is not None:
        inner = ", ".join("..." if a is Ellipsis else type_label(a) for a in args)
        return f"{getattr(origin, '__name__', str(origin))}[{inner}]"
    return getattr(tp, "__name__", str(tp))


def default_label(default: Any) -> str:
    """The default as it would be written in a recipe (YAML flow style)."""
    if default is dataclasses.MISSING:
        return "required"
    text = yaml.safe_dump(config_to_dict(default), default_flow_style=True, width=1 << 30)
    return text.removesuffix("...\n").strip()


def _escape_prose(text: str) -> str:
    """Escape ``<`` outside code spans: ``<its name>`` would be read as an HTML tag and vanish, while
    inside backticks it already shows literally (and ``&lt;`` would not)."""
    parts = _CODE_SPAN.split(text)
    # split() with two groups yields [prose, fence, code, prose, fence, code, ..., prose]
    out = []
    for i in range(0, len(parts), 3):
        out.append(parts[i].replace("<", "&lt;"))
        if i + 2 < len(parts):
            out.append(parts[i + 1] + parts[i + 2] + parts[i + 1])
    return "".join(out)


def cell(text: str) -> str:
    """Prose for one table cell: wrapped lines joined, paragraphs split by ``<br><br>``, ``|`` escaped
    (GFM unescapes ``\\|`` inside code spans too)."""
    paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", text.strip())]
    return "<br><br>".join(_escape_prose(p) for p in paragraphs if p).replace("|", r"\|")


def code(text: str) -> str:
    """A code span for a table cell (``|`` escaped; GFM strips the backslash inside the span)."""
    return f"`{text}`".replace("|", r"\|")


# ----------------------------------------------------------------------------------------------
# Recipe files.
# ----------------------------------------------------------------------------------------------

def recipe_comment(path: Path) -> list[str]:
    """The recipe's leading ``#`` comment block (its description), one entry per line, ``#`` removed."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line[1:].removeprefix(" ").rstrip())
    return lines


def recipe_summary(path: Path) -> str:
    """The comment block as one table cell: prose lines joined, indented lines (commands, file lists)
    kept as one code span per line."""
    blocks: list[str] = []
    prose: list[str] = []
    for line in recipe_comment(path) + [""]:
        if line.startswith(" ") or not line:
            if prose:
                blocks.append(cell(" ".join(prose)))
                prose = []
            if line.strip():
                blocks.append(code(line.strip()))
        else:
            prose.append(line)
    return "<br>".join(blocks)


def recipe_base(path: Path) -> str | None:
    data = yaml.safe_load(path.read_text()) or {}
    base = data.get(BASE_KEY)
    return base if isinstance(base, str) else None


def root_folder(path: Path) -> str:
    """Folder under recipes/ of the end of the recipe's ``base:`` chain: the stage whose config it fills."""
    seen = set()
    while (base := recipe_base(path)) is not None and path not in seen:
        seen.add(path)
        path = (path.parent / base).resolve()
    return path.parent.name


def stage_recipes(stage: Stage) -> list[Path]:
    return sorted((REPO / "recipes" / stage.folder).glob("*.yaml"))


def _rel(path: Path) -> str:
    """Link target from docs/ to a repository file."""
    return "../" + path.resolve().relative_to(REPO).as_posix()


def recipes_table(stage: Stage) -> list[str]:
    titles = {s.folder: s.title for s in STAGES}
    demo = not stage.config  # a folder of other stages' recipes: say which config each one fills
    head = "| recipe | base | loaded as | description |" if demo else "| recipe | base | description |"
    rows = [head, "|---|---|---|---|" if demo else "|---|---|---|"]
    for path in stage_recipes(stage):
        base = recipe_base(path)
        cols = [f"[{code(path.name)}]({_rel(path)})", code(base) if base else "—"]
        if demo:
            folder = root_folder(path)
            cols.append(f"[{titles.get(folder, folder)}](#{slug(titles.get(folder, folder))})")
        cols.append(recipe_summary(path))
        rows.append("| " + " | ".join(cols) + " |")
    return rows


# ----------------------------------------------------------------------------------------------
# Sections and the whole document.
# ----------------------------------------------------------------------------------------------

def slug(title: str) -> str:
    """GitHub's heading anchor for the simple titles used here."""
    return re.sub(r"[^a-z0-9 -]", "", title.lower()).replace(" ", "-")


def fields_table(cls: type) -> list[str]:
    rows = ["| key | type | default | description |", "|---|---|---|---|"]
    for key, tp, default, doc in all_fields(cls):
        rows.append(f"| {code(key)} | {code(type_label(tp))} | {code(default_label(default))} | {cell(doc)} |")
    return rows


def stage_section(stage: Stage) -> list[str]:
    folder = f"recipes/{stage.folder}/"
    commands = ", ".join(code(c) for c in stage.commands)
    guide = f" Guide: [docs/{stage.guide}]({stage.guide})." if stage.guide else ""
    lines = [f"## {stage.title}", "", f"Command: {commands}. Recipes: [`{folder}`](../{folder}).{guide}", ""]
    if stage.config:
        cls = load_class(stage.config)
        lines += [f"Config: `{cls.__module__}.{cls.__name__}`: {cell(cls.__doc__ or '')}", ""]
    else:
        lines += ["No config of its own: `videoar demo` runs each stage's own command with one of these "
                  "recipes (the folder that its `base:` chain ends in decides the config it fills), and "
                  "`--preset` changes sizes through `--set` overrides only.", ""]
    lines += [f"### Recipes in `{folder}`", "", *recipes_table(stage), ""]
    if stage.config:
        lines += [f"### Keys of `{cls.__name__}`", "", *fields_table(cls), ""]
    return lines


def intro() -> list[str]:
    toc = [f"- [{s.title}](#{slug(s.title)}): `recipes/{s.folder}/`" for s in STAGES]
    return [
        "# Recipes reference", "",
        f"<!-- Generated from the config dataclasses' field docstrings by `{REGENERATE}` "
        "(or `make docs`). Do not edit by hand: tests/test_docs.py fails when this file is stale. -->", "",
        "A recipe is a YAML file loaded into its stage's config dataclass "
        "(`videoar_common.config.load_config`). `base: other.yaml` (relative to the recipe) names a "
        "parent that the recipe is deep-merged over; `--set KEY.PATH=VALUE` overrides any key (value parsed "
        "as YAML); an unknown key or a wrong type is an error naming the key and its file. Every run writes "
        "the resolved recipe to its directory as `config.yaml`. A key `a[].b` is field `b` of each item of "
        "the list `a`.", "",
        *toc, "",
    ]


def render() -> str:
    lines = intro()
    for stage in STAGES:
        lines += stage_section(stage)
    return "\n".join(lines).rstrip() + "\n"


# ----------------------------------------------------------------------------------------------
# Command line.
# ----------------------------------------------------------------------------------------------

def check(path: Path) -> int:
    current = path.read_text() if path.is_file() else None
    if current == render():
        return 0
    state = "is missing" if current is None else "is out of date with the config docstrings and recipes"
    print(f"{path} {state}; regenerate it with:\n  python -m videoar_common.recipe_docs --write {path}",
          file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m videoar_common.recipe_docs", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--write", type=Path, metavar="PATH", help="write the reference to PATH")
    mode.add_argument("--check", type=Path, metavar="PATH", help="exit 1 when PATH differs from the output")
    args = p.parse_args(argv)
    if args.check:
        return check(args.check)
    if args.write:
        args.write.write_text(render())
        print(f"wrote {args.write}")
        return 0
    sys.stdout.write(render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
