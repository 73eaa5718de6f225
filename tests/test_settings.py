"""Settings you can trust: what you set wins, typos and bad values stop at once, and a build can
read only the settings its key holds."""

import re

import nbformat
import pytest
from conftest import (
    NOTEBOOK,
    definitions,
)

pytestmark = pytest.mark.fast  # definition cells only: `uv run pytest -m fast`


# Pure rules: the settings cells alone, in this process (no kernel, no notebook run)
@pytest.fixture(scope="module")
def nb():
    return definitions("# The assignment's prompts", "# Defaults", "# Settings")


def resolve(nb, **given) -> tuple[dict, dict]:
    return nb["resolve_settings"](given, False)


def test_nothing_set_takes_the_profile_and_the_table_says_where_from(nb):
    cfg, sources = resolve(nb, PROFILE="cpu")
    assert (cfg["EPOCHS"], sources["EPOCHS"]) == (3, "profile cpu") and cfg["TRAIN_BLOCKS"] == 2400
    assert (cfg["WEIGHT_DECAY"], sources["WEIGHT_DECAY"]) == (0.01, "default")
    assert resolve(nb)[0]["PROFILE"] == "cpu", "no CUDA: the cpu profile"
    assert nb["resolve_settings"]({}, True)[0]["PROFILE"] == "full"
    cfg, sources = resolve(nb, PROFILE="cpu", EPOCHS=1, DEV={"SFT_PACKING": True})
    assert cfg["DEV"]["SFT_PACKING"] is True and cfg["DEV"]["SFT_LEAN_LOSS"] is True
    table = nb["settings_table"](cfg, sources).to_string()
    assert re.search(r"EPOCHS\s+1\s+set by you\s+10", table), table
    assert re.search(r"TRAIN_BLOCKS\s+2400\s+profile cpu\s+'all'", table), table
    assert "WEIGHT_DECAY" not in table, "a knob at its plain default is listed"


def stops(nb, **given) -> str:
    """The one line a bad setting stops the run with."""
    with pytest.raises(nb["UserError"]) as caught:
        resolve(nb, **given)
    return str(caught.value)


def test_a_misspelled_knob_stage_or_switch_stops_with_the_closest_name(nb):
    assert stops(nb, EPOCS=1).startswith("EPOCS is not a knob (did you mean EPOCHS?)")
    message = stops(nb, FORCE=["tokeniser"])
    assert "FORCE: 'tokeniser' is not a stage (did you mean tokenizer?)" in message
    assert "DEV: 'SFT_PACKIN' is not a developer switch (did you mean SFT_PACKING?)" in stops(
        nb, DEV={"SFT_PACKIN": True}
    )


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ({"VAL_FRACTION": "lots"}, "VAL_FRACTION = 'lots' (set by you): expected a number > 0 and <= 0.5"),
        ({"VAL_FRACTION": 1.5}, "VAL_FRACTION = 1.5 (set by you): expected a number > 0 and <= 0.5"),
        ({"VAL_FRACTION": 0}, "VAL_FRACTION = 0 (set by you): expected a number > 0"),
        ({"EPOCHS": -1}, "EPOCHS = -1 (set by you): expected an integer >= 1"),
        ({"EPOCHS": 2.5}, "EPOCHS = 2.5 (set by you): expected an integer >= 1"),
        ({"MAX_STEPS": 0}, "MAX_STEPS = 0 (set by you): expected -1 or an integer >= 1"),
        ({"TORCH_COMPILE": "yes"}, "TORCH_COMPILE = 'yes' (set by you): expected 'auto' or True or False"),
        ({"LR_SCHEDULER": "wavy"}, "LR_SCHEDULER = 'wavy' (set by you): expected 'linear' or 'cosine' or"),
        ({"PROFILE": "gpu"}, "PROFILE = 'gpu' (set by you): expected 'auto' or 'full' or 'cpu' or 'smoke'"),
        ({"SFT_QUESTIONS": []}, "SFT_QUESTIONS = [] (set by you): expected a non-empty list"),
        ({"DEV": {"SFT_PACKING": "yes"}}, "DEV = {'SFT_PACKING': 'yes'} (set by you): expected a dict"),
        ({"MODEL_HIDDEN": 65}, "MODEL_HIDDEN = 65 must be a multiple of MODEL_HEADS = 2"),
    ],
)  # fmt: skip
def test_a_bad_value_stops_with_what_the_knob_accepts(nb, given, expected):
    assert stops(nb, **({"PROFILE": "smoke"} | given)).startswith(expected)


def code_cells():
    return [c for c in nbformat.read(NOTEBOOK, as_version=4).cells if c.cell_type == "code"]


def test_no_value_made_in_a_display_cell_is_used_later():
    """Display cells keep their values to themselves (`_names`); only definitions, settings and
    stage cells make names for later cells, so re-running any cell cannot change another's."""
    import ast

    for cell in code_cells():
        tree = ast.parse(cell.source)
        names = [n for n in ast.walk(tree) if isinstance(n, ast.Name)]
        stored = {n.id for n in names if isinstance(n.ctx, ast.Store)}
        title = cell.source.splitlines()[0]
        for name in {n.id for n in names if isinstance(n.ctx, ast.Load)}:
            assert not name.startswith("_") or name in stored, f"{title!r} reads {name}"
        defines = any(isinstance(n, ast.FunctionDef | ast.ClassDef) for n in tree.body)
        if not defines and "run_stage(" not in cell.source:
            made = {n.id for n in names if isinstance(n.ctx, ast.Store) and n.col_offset == 0}
            shared = {n for n in made if not n.startswith("_") and not n.isupper()}
            assert not shared, f"{title!r} makes {sorted(shared)} for later cells"


def test_cells_are_short_and_titled():
    """Every code cell opens with a `# title`; one over 30 lines holds a single definition (no
    function boundary to split it at) or says why in its title."""
    import ast

    for cell in code_cells():
        lines = cell.source.splitlines()
        assert lines[0].startswith("# "), lines[0]
        if len(lines) > 30:
            tree = ast.parse(cell.source)
            defined = [n for n in tree.body if isinstance(n, ast.FunctionDef | ast.ClassDef)]
            assert "(long:" in lines[0] or len(defined) == 1, f"{lines[0]!r}: {len(lines)} lines"


def test_ruff_formats_the_code_with_few_exceptions():
    """`ruff format` lays out the code; `fmt: skip`/`off` only where columns carry meaning."""
    markers = [
        (cell.source.splitlines()[0], line.strip())
        for cell in code_cells()
        for line in cell.source.splitlines()
        if re.search(r"# fmt: (skip|off)", line)
    ]
    assert len(markers) <= 10, markers
    assert {title.split(" ")[1] for title, _ in markers} <= {"Defaults", "Inputs:", "Hardware:"}
