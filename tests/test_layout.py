"""The notebook reads top-down: a stage's build reaches (by the cache's own `reached_code`) only the
Machinery, its own stage's section and the Training toolkit before stage 4, never another stage's
section. Only the definition cells run (no stage is built)."""

import ast
import linecache
import re

import nbformat
import pytest
from conftest import NOTEBOOK

SHARED = {"Machinery", "Training toolkit"}
DATACLASS_MADE = (
    "__create_fn__",
    "_HAS_DEFAULT_FACTORY",
)  # what @dataclass writes: keyed, no section


def definition_only(source: str) -> bool:
    """Cells that only define (functions, classes, constants, imports): safe to run alone."""
    allowed = (ast.FunctionDef, ast.ClassDef, ast.Import, ast.ImportFrom)
    for node in ast.parse(source).body:
        if isinstance(node, ast.With) and "get_ipython" in ast.unparse(node):
            continue  # the one-line errors' hook (a plain Python run keeps its tracebacks)
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        names = [t.id for t in targets if isinstance(t, ast.Name)]
        constant = isinstance(node, ast.Assign | ast.AnnAssign) and names and all(n.isupper() for n in names)  # fmt: skip
        if not (isinstance(node, allowed) or constant):
            return False
    return True


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
                for target in getattr(node, "targets", [node]):
                    name = getattr(target, "name", getattr(target, "id", None))
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
    assert folded == {"Machinery", "Training toolkit", *how} and len(how) == 7, folded
    for cell in cells[1:]:  # a section whose own text calls it folded is folded
        if re.search(r"\bfolded\b", cell.source):
            assert cell.metadata.get("jp-MarkdownHeadingCollapsed"), cell.source[:60]
