"""The notebook reads top-down: a stage's build reaches (by the cache's own `reached_code`) only the
Machinery, its own stage's section and the Training toolkit before stage 4, never another stage's
section. Only the definition cells run (no stage is built)."""

import ast
import linecache
import re

import nbformat
import pytest
from conftest import NOTEBOOK, assigned, definition_only

pytestmark = pytest.mark.fast  # definition cells only: `uv run pytest -m fast`

SHARED = {"Set-up", "Machinery", "Training toolkit"}
DATACLASS_MADE = (
    "__create_fn__",
    "_HAS_DEFAULT_FACTORY",
)  # what @dataclass writes: keyed, no section


@pytest.fixture(scope="module")
def notebook():
    """(namespace of every definition cell, {top-level name: its section}, {stage: (build, section)})."""
    namespace, section_of, builds, section = {"__name__": "__main__"}, {}, {}, None
    for cell in nbformat.read(NOTEBOOK, as_version=4).cells:
        if cell.cell_type == "markdown" and (heading := re.search(r"^## (.+)$", cell.source, re.M)):
            section = re.sub(
                r" — .*", "", heading[1].strip()
            )  # "Stage 1 — clean corpus" -> "Stage 1"
            continue
        if cell.cell_type != "code":
            continue
        for name, build in re.findall(r'run_stage\(\s*"(\w+)",\s*(\w+)', cell.source):
            builds[name] = (build, section)
        if cell.source.startswith("# Imports") or definition_only(cell.source):
            filename = f"<cell {len(linecache.cache)}: {cell.source.splitlines()[0]}>"
            linecache.cache[filename] = (len(cell.source), None, cell.source.splitlines(True), filename)  # fmt: skip
            exec(
                compile(cell.source, filename, "exec"), namespace
            )  # inspect finds the source: keys
            for node in ast.parse(cell.source).body:
                for name in [*assigned(node), getattr(node, "name", None)]:
                    section_of.setdefault(name, section) if name else None
    return namespace, section_of, builds


def test_every_stage_has_a_build_found(notebook):
    _, _, builds = notebook
    assert set(builds) == {"clean_corpus", "tokenizer", "dataset", "pretrain", "sft_data",
                           "base_answers", "sft_model"}  # fmt: skip


@pytest.mark.parametrize("stage", ["clean_corpus", "tokenizer", "dataset", "pretrain", "sft_data",
                                   "base_answers", "sft_model"])  # fmt: skip
def test_a_build_reaches_only_machinery_its_section_and_the_toolkit(notebook, stage):
    namespace, section_of, builds = notebook
    build, own = builds[stage]
    reached = namespace["reached_code"](namespace[build])
    notebook_names = [n for n in reached if not n.startswith(DATACLASS_MADE)]
    sections = {name: section_of.get(name.split(".")[0].split("@")[0]) for name in notebook_names}
    assert None not in sections.values(), [n for n, s in sections.items() if s is None]
    foreign = {name: s for name, s in sections.items() if s not in SHARED | {own}}
    assert not foreign, f"{stage} ({own}) reaches into other sections: {foreign}"


def test_every_section_the_text_calls_folded_is_folded_when_jupyterlab_opens_it():
    """JupyterLab opens a heading cell with `jp-MarkdownHeadingCollapsed` folded (up to the next
    heading of its level or higher): the reader sees the Configuration, then the pipeline."""
    cells = [c for c in nbformat.read(NOTEBOOK, as_version=4).cells if c.cell_type == "markdown"]
    heading = {id(c): m[1] for c in cells if (m := re.match(r"#+ (.+)", c.source))}
    folded = {heading[id(c)] for c in cells if c.metadata.get("jp-MarkdownHeadingCollapsed")}
    intro = cells[0].source
    said = re.findall(r"\*\*(.+?)\*\*", intro[intro.index("Folded in") :])
    assert said == ["Machinery", "Training toolkit", '"How …"'], said
    how = {title for title in heading.values() if title.startswith("How ")}
    assert folded == {"Machinery", "Training toolkit", *how} and len(how) == 8, folded
    for cell in cells[1:]:  # a section whose own text calls it folded is folded
        if re.search(r"\bfolded\b", cell.source):
            assert cell.metadata.get("jp-MarkdownHeadingCollapsed"), cell.source[:60]


def folded_code(cells) -> list:
    """The code cells JupyterLab hides on open: those under a folded heading, up to the next
    heading of its level or higher."""
    hidden, folded_at = [], None
    for cell in cells:
        level = (
            len(m[1])
            if cell.cell_type == "markdown" and (m := re.match(r"(#+) ", cell.source))
            else None
        )
        if level and folded_at and level <= folded_at:
            folded_at = None
        if level and folded_at is None and cell.metadata.get("jp-MarkdownHeadingCollapsed"):
            folded_at = level
        elif cell.cell_type == "code" and folded_at:
            hidden.append(cell)
    return hidden


def test_every_folded_cell_only_defines():
    """A folded cell only defines (functions, classes, constants, imports): an output or an error
    there would be hidden (JupyterLab's Run All stops at an error in a folded cell and shows no
    sign of it). (That none printed anything in the cold run: test_report_and_exports.)"""
    hidden = folded_code(nbformat.read(NOTEBOOK, as_version=4).cells)
    assert len(hidden) > 100, len(hidden)
    for cell in hidden:
        assert cell.source.startswith("# Imports") or definition_only(cell.source), cell.source[:80]


def test_every_cell_has_its_own_id():
    """nbformat 4.5 cells carry ids: without one a reader's JupyterLab invents it, and papermill
    and nbformat warn."""
    cells = nbformat.read(NOTEBOOK, as_version=4).cells
    ids = [cell.get("id") for cell in cells]
    assert None not in ids and len(set(ids)) == len(ids)
