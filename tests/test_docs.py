"""docs/recipes.md is generated from the config docstrings: it must be current and complete."""
from __future__ import annotations

import importlib
import inspect

import pytest

from videoar_megatron.cli import SUBCOMMANDS
from videoar_common import recipe_docs
from videoar_common.recipe_docs import REGENERATE, REPO, STAGES, all_fields, load_class

CONFIG_STAGES = [s for s in STAGES if s.config]


def test_recipes_doc_is_current():
    path = REPO / recipe_docs.DOC_PATH
    assert path.is_file(), f"{recipe_docs.DOC_PATH} is missing; generate it with `{REGENERATE}` (or `make docs`)"
    assert path.read_text() == recipe_docs.render(), (
        f"{recipe_docs.DOC_PATH} is stale (a config docstring, field or recipe changed); regenerate it with "
        f"`{REGENERATE}` (or `make docs`) and commit the result")


@pytest.mark.parametrize("stage", CONFIG_STAGES, ids=lambda s: s.folder)
def test_every_config_field_has_a_docstring(stage):
    missing = [key for key, _tp, _default, doc in all_fields(load_class(stage.config)) if not doc.strip()]
    assert not missing, (f"{stage.config}: fields without a docstring (write one on the line under the "
                         f"field): {', '.join(missing)}")


def test_every_recipe_folder_is_a_stage():
    folders = {p.name for p in (REPO / "recipes").iterdir() if p.is_dir()}
    assert folders == {s.folder for s in STAGES}, "add the recipe folder to recipe_docs.STAGES"


@pytest.mark.parametrize("stage", STAGES, ids=lambda s: s.folder)
def test_stage_names_the_cli_that_loads_it(stage):
    # The stage table is hand-written; this keeps its command/config pairing honest.
    assert stage.cli_module in {module for module, _ in SUBCOMMANDS.values()}
    source = inspect.getsource(importlib.import_module(stage.cli_module))
    if stage.config:
        assert stage.config.split(":")[1] in source
    assert f"recipes/{stage.folder}/" in source
    assert (REPO / "docs" / stage.guide).is_file() or not stage.guide


def test_check_names_the_file_and_the_command(tmp_path, capsys):
    path = tmp_path / "recipes.md"
    path.write_text("stale\n")
    assert recipe_docs.main(["--check", str(path)]) == 1
    err = capsys.readouterr().err
    assert str(path) in err and f"recipe_docs --write {path}" in err
    assert recipe_docs.main(["--write", str(path)]) == 0
    assert recipe_docs.main(["--check", str(path)]) == 0


def test_cell_escapes_pipes_and_tags_but_not_code():
    text = "Prefix |Ψ| in <run_dir>/<its name>, see ``<run_dir>/x``\nand `a|b`.\n\nNext."
    assert recipe_docs.cell(text) == (r"Prefix \|Ψ\| in &lt;run_dir>/&lt;its name>, see ``<run_dir>/x`` "
                                      r"and `a\|b`.<br><br>Next.")


def test_labels():
    from typing import Literal
    assert recipe_docs.type_label(Literal["l1", "l2"]) == "'l1' | 'l2'"
    assert recipe_docs.type_label(tuple[int, int] | None) == "tuple[int, int] | None"
    assert recipe_docs.default_label((1.0, 5.0)) == "[1.0, 5.0]"
    assert recipe_docs.default_label("") == "''"
    assert recipe_docs.default_label(None) == "null"


def test_demo_recipes_name_the_stage_they_fill():
    demo = next(s for s in STAGES if s.folder == "demo")
    roots = {p.name: recipe_docs.root_folder(p) for p in recipe_docs.stage_recipes(demo)}
    assert roots["ar.yaml"] == "ar" and roots["tokenizer_image.yaml"] == "tokenizer"
    assert set(roots.values()) <= {s.folder for s in CONFIG_STAGES}


def test_the_demo_duration_is_stated_in_one_place():
    """Issue 23: the README, `videoar demo --help` and demo.py each gave their own minutes. The figure
    lives in docs/BENCHMARKS.md's CPU section; the others point there."""
    import re
    import subprocess
    import sys
    from videoar_megatron import demo
    doc, anchor = demo.TIMING_DOC.split("#")
    benchmarks = (REPO / doc).read_text()
    heading = next(line for line in benchmarks.splitlines() if line.startswith("## CPU"))
    assert re.sub(r"[^a-z0-9 -]", "", heading[3:].lower()).replace(" ", "-") == anchor
    section = benchmarks[benchmarks.index(heading):]
    assert re.search(r"`make demo` .*\d+ min", section, re.S), "the measured duration is missing"
    help_text = subprocess.run([sys.executable, "-m", "videoar_megatron.cli", "demo", "--help"], capture_output=True,
                               text=True, cwd=REPO, check=True).stdout
    sources = {"README.md": (REPO / "README.md").read_text(), "videoar demo --help": help_text,
               "videoar_megatron/demo.py": (REPO / "videoar_megatron" / "demo.py").read_text(),
               "videoar_megatron/cli/demo.py": (REPO / "videoar_megatron" / "cli" / "demo.py").read_text()}
    for name, text in sources.items():
        assert not re.search(r"\d+\s*min", text.split("## Benchmarks")[0] if name == "README.md" else text), name
    assert demo.TIMING_DOC in sources["README.md"] and demo.TIMING_DOC in help_text
