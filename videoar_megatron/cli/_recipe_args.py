"""Recipe arguments shared by the recipe-driven subcommands (pretokenize, train, sample, eval, tokenizer).

``add_recipe_args`` adds ``--recipe`` and ``--set KEY=VALUE`` (collected in ``args.overrides``) and,
given the recipe's config dataclass, an epilog listing every knob with its type, default and field
docstring (``knobs_epilog``). ``load_recipe`` resolves the recipe with those overrides.
"""
from __future__ import annotations

import argparse
import dataclasses
from typing import Collection, Sequence

from videoar_common.config import iter_fields, load_config


def _type_name(tp) -> str:
    """``int``, ``list[list[int]]``, ``Literal['a', 'b']``, ``int | None``."""
    return tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "")


def knobs_epilog(config_cls: type, required: Collection[str] = ()) -> str:
    """Every leaf knob of ``config_cls``: key, type, default (or required) and its docstring.

    ``required`` names knobs that have a placeholder default (e.g. ``""``) but must be set."""
    lines = ["recipe knobs (YAML keys; override any with --set KEY=VALUE):"]
    for key, tp, default, doc in iter_fields(config_cls):
        shown = "required" if default is dataclasses.MISSING or key in required else f"default {default!r}"
        lines.append(f"  {key}  ({_type_name(tp)}, {shown})")
        lines.extend(f"      {line}" for line in (doc or "(undocumented)").splitlines())
    return "\n".join(lines)


def add_recipe_args(parser: argparse.ArgumentParser, config_cls: type | None = None, *, recipe_help: str,
                    set_example: str, required: bool = True, required_knobs: Collection[str] = ()) -> None:
    """Add ``--recipe`` and ``--set`` to ``parser``; with ``config_cls``, also the knobs epilog (the parser
    is switched to ``RawDescriptionHelpFormatter`` so the epilog keeps its layout)."""
    parser.add_argument("--recipe", required=required, help=recipe_help)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help=f"override a recipe knob, value parsed as YAML (repeatable), e.g. --set {set_example}")
    if config_cls is not None:
        parser.formatter_class = argparse.RawDescriptionHelpFormatter
        parser.epilog = knobs_epilog(config_cls, required_knobs)


def load_recipe(args: argparse.Namespace, config_cls: type, extra_overrides: Sequence[str] = ()):
    """``config_cls`` from ``args.recipe`` (``None``: the defaults), then ``args.overrides``, then
    ``extra_overrides``. A ``ConfigError`` names the key and its source; the ``videoar`` dispatcher turns
    it into exit 2."""
    return load_config(config_cls, args.recipe, [*args.overrides, *extra_overrides])
