"""The notebook as a student uses it: one JupyterLab kernel (nbclient here), cells edited and re-run
in any order. No stage cell builds or loads, and no result cell shows, what older settings made: a
knob edited in the Knobs cell, a typo added in a second "Run All", an upstream knob changed each
stop with one line. The stage keys are the recipe, not the card: a cache loads under any card."""

import json
import re

import pytest
from conftest import (
    ALL_CELLS,
    RESET,
    SHOW_SETTINGS,
    STAGE_CELLS,
    apply_edits,
    code_cells,
    insert_statement,
    one_line_error,
    replace,
    shown_settings,
    smoke,
    stage_dir,
    stage_keys,
    statuses,
)

STAGES = list(STAGE_CELLS)  # in pipeline order
THIS_RUN = "# This run"


def cell(title: str) -> str:
    """The notebook's code cell whose first line starts with `title` (or a stage's name)."""
    title = STAGE_CELLS.get(title, title)
    (source,) = [s for s in code_cells() if s.startswith(title)]
    return source


def knobs_cell(workdir, delete=(), add: str = "", **knobs) -> str:
    """The Knobs cell as a student fills it in: the smoke profile on `workdir`, plus `knobs`; the
    lines of `delete` removed, the line `add` added at the end."""
    source = cell("# Knobs")
    edits = [replace(f"\n{k} = None", f"\n{k} = {v!r}") for k, v in smoke(workdir, **knobs).items()]
    edits += [(re.compile(rf"\n{k} = [^\n]*"), lambda m: "", 1) for k in delete]
    return apply_edits([source], edits)[0] + (f"\n{add}" if add else "")


def cells_until(title: str, knobs: str) -> list[str]:
    """The notebook's code cells up to the one titled `title`, its Knobs cell replaced: "Run All"."""
    sources = list(code_cells())
    stop = next(i for i, s in enumerate(sources) if s.startswith(STAGE_CELLS.get(title, title)))
    return [knobs, *sources[1 : stop + 1]]


def builds(cache, stage: str) -> int:
    return len(list((cache / stage).glob("*/manifest.json")))


def test_a_knob_edited_or_an_upstream_knob_changed_stops_the_cells_re_run(live_kernel, warm_copy):
    cache = warm_copy / "cache"
    first = live_kernel.run_cells([RESET, *cells_until(ALL_CELLS, knobs_cell(warm_copy))])
    assert first["error"] is None, first["error"]
    assert statuses(first) == dict.fromkeys(STAGES, "cached")

    # EPOCHS edited in the Knobs cell, then only that cell and stage 4's cell re-run
    edited = live_kernel.run_cells([knobs_cell(warm_copy, EPOCHS=3), cell("pretrain")])
    assert one_line_error(edited) == (
        "EPOCHS is 3 in the Knobs cell but the settings were resolved with 2, which the pretrain "
        "stage was made with: run the notebook from 'This run' (cached stages load in seconds)"
    )
    # ... and a result cell re-run does not show what the older settings made either
    shown = live_kernel.run_cells([cell("# Stage 4: export the model")])
    assert one_line_error(shown).startswith("EPOCHS is 3 in the Knobs cell")
    # a typo added and only a stage cell re-run: also caught
    typo = live_kernel.run_cells([knobs_cell(warm_copy, add="SEEED = 3"), cell("dataset")])
    assert one_line_error(typo).startswith("SEEED is not a knob (did you mean SEED?)")

    # VOCAB_SIZE changed: stage 4 re-run alone names the stage that VOCAB_SIZE made
    upstream = live_kernel.run_cells([knobs_cell(warm_copy, VOCAB_SIZE=300), cell("pretrain")])
    assert one_line_error(upstream).startswith(
        "VOCAB_SIZE is 300 in the Knobs cell but the settings were resolved with 400, which the "
        "tokenizer stage was made with"
    )
    # ... and with the settings resolved again ('This run'), it still will not build on stage 2
    upstream = live_kernel.run_cells([cell(THIS_RUN), cell("pretrain")])
    assert one_line_error(upstream) == (
        "the tokenizer stage in this kernel was made with VOCAB_SIZE = 400, but the settings now "
        "say 300: run the notebook from stage 2 (cached stages load in seconds)"
    )
    # ... and neither will stage 3's own cell, whose key reads the stale stage's output
    assert one_line_error(live_kernel.run_cells([cell("dataset")])).startswith(
        "the tokenizer stage in this kernel was made with VOCAB_SIZE = 400"
    )
    assert [builds(cache, s) for s in ("tokenizer", "dataset", "pretrain")] == [1, 1, 1]

    # the Knobs cell as it was, 'This run' and stage 4's cell: the cached stage loads again
    back = live_kernel.run_cells([knobs_cell(warm_copy), cell(THIS_RUN), cell("pretrain")])
    assert back["error"] is None and statuses(back) == {"pretrain": "cached"}, back["error"]

    # a knob the plan turns into a key part ("auto" chose AdamW): the result cell checks the part
    optimizer = [knobs_cell(warm_copy, OPTIMIZER="adafactor"), cell(THIS_RUN)]
    shown = live_kernel.run_cells([*optimizer, cell("# Stage 4: export the model")])
    assert one_line_error(shown) == (
        "the pretrain stage in this kernel was made with optimizer 'adamw', but the settings now "
        "say OPTIMIZER = 'adafactor', which gives 'adafactor': run the notebook from stage 4 "
        "(cached stages load in seconds)"
    )
    # ... while one that gives the same part (AdamW set by hand) is the same build: shown
    same = [knobs_cell(warm_copy, OPTIMIZER="adamw"), cell(THIS_RUN)]
    shown = live_kernel.run_cells([*same, cell("# Stage 4: export the model")])
    assert shown["error"] is None, shown["error"]


def test_a_typo_is_caught_in_any_kernel_and_a_deleted_knob_line_goes_back_to_its_default(
    live_kernel, tmp_path
):
    knobs = knobs_cell(tmp_path, EPOCHS=3)
    first = live_kernel.run_cells([RESET, *cells_until(THIS_RUN, knobs), SHOW_SETTINGS])
    assert shown_settings(first)["EPOCHS"] == [3, "set by you"]

    # a second "Run All" in the same kernel, a typo added to the Knobs cell: one line
    typo = knobs_cell(tmp_path, EPOCHS=3, add="EPOCS = 4")
    second = live_kernel.run_cells(cells_until(THIS_RUN, typo))
    assert one_line_error(second) == (
        "EPOCS is not a knob (did you mean EPOCHS?): the Knobs cell lists every knob"
    )
    assert "Stage 1" not in "".join(second["cells"]), "something ran after the typo"

    # fixed and re-run, the typo is gone; the EPOCHS line deleted, EPOCHS is the profile's again
    fixed = knobs_cell(tmp_path, delete=["EPOCHS"])
    third = live_kernel.run_cells([*cells_until(THIS_RUN, fixed), SHOW_SETTINGS])
    assert shown_settings(third)["EPOCHS"] == [2, "profile smoke"]


CARDS = {  # (device, name, compute capability, GiB): as tests/test_plan.py simulates them
    "T4": ("cuda", "Tesla T4", (7, 5), 14.7),
    "H100": ("cuda", "NVIDIA H100 80GB HBM3", (9, 0), 79.1),
}


def test_the_keys_are_the_recipe_not_the_card(live_kernel, cold_run, warm_copy):
    """A cache made on the CPU loads every stage under a simulated T4 and H100, with the same keys,
    and says where each training stage was made."""
    _, cold = cold_run
    keys = stage_keys(cold)
    simulated = [
        replace("CARD = detect_card()", f"CARD = Card{CARDS['T4']!r}"),
        # the exported model is checked where the GPU would be: here, the CPU
        replace('_check = {"device": CARD.device,', '_check = {"device": "cpu",'),
    ]  # fmt: skip
    sources = apply_edits(list(cells_until(ALL_CELLS, knobs_cell(warm_copy))), simulated)
    on_t4 = live_kernel.run_cells([RESET, *sources])
    assert on_t4["error"] is None, on_t4["error"]
    assert "Tesla T4" in on_t4["text"], "the simulated card was not used"
    assert statuses(on_t4) == dict.fromkeys(STAGES, "cached")
    assert stage_keys(on_t4) == keys
    assert "trained on CPU" in on_t4["stages"]["pretrain"][1]
    assert "answered on CPU" in on_t4["stages"]["base_answers"][1]

    on_h100 = live_kernel.run_cells(
        [f"CARD = Card{CARDS['H100']!r}", *(cell(STAGE_CELLS[s]) for s in STAGES)]
    )
    assert on_h100["error"] is None, on_h100["error"]
    assert stage_keys(on_h100) == keys
    manifest = json.loads(
        (stage_dir(warm_copy / "cache", "sft_model") / "manifest.json").read_text()
    )
    assert manifest["made_on"].startswith("trained on CPU") and "precision" not in json.dumps(
        manifest["parts"]["config"]
    )


# What you set wins; a bad value or a build reading outside its key stops, in a kernel
def settings(live_kernel, parameters: dict, edits=()) -> dict:
    result = live_kernel.run(parameters, until=THIS_RUN, edits=edits, after=[SHOW_SETTINGS])
    return shown_settings(result)


def set_in_parameters_cell(assignments: dict) -> list:
    """Edits of the parameters cell as a user makes them: `EPOCHS = None` becomes `EPOCHS = 1`."""
    return [
        replace(f"\n{name} = None", f"\n{name} = {value!r}") for name, value in assignments.items()
    ]


def test_what_you_set_wins_over_the_profile_both_ways(live_kernel):
    # papermill -p (the injected cell) and an edit of the parameters cell both win over the profile
    cfg = settings(live_kernel, {"PROFILE": "smoke", "EPOCHS": 1, "LEARNING_RATE": 0.01})
    assert cfg["EPOCHS"] == [1, "set by you"] and cfg["LEARNING_RATE"] == [0.01, "set by you"]
    edits = set_in_parameters_cell({"PROFILE": "cpu", "EPOCHS": 5, "SFT_MAX_STEPS": 4})
    cfg = settings(live_kernel, {}, edits=edits)
    assert cfg["PROFILE"][0] == "cpu" and cfg["EPOCHS"] == [5, "set by you"]
    assert cfg["SFT_MAX_STEPS"] == [4, "set by you"] and cfg["SFT_MICRO_BATCH"][0] == 2
    # papermill's value lands after the parameters cell: it wins over an edit of that cell
    cfg = settings(live_kernel, {"EPOCHS": 1}, edits)
    assert cfg["EPOCHS"] == [1, "set by you"] and cfg["PROFILE"][0] == "cpu"


def test_a_bad_value_stops_the_notebook_before_any_stage_runs(live_kernel, tmp_path):
    cache = tmp_path / "cache"
    result = live_kernel.run(
        {"PROFILE": "smoke", "CACHE_DIR": str(cache), "EPOCHS": 0}, until=THIS_RUN
    )
    error = result["error"]
    assert error and error["ename"] == "UserError" and len(error["traceback"]) == 1, error
    assert error["evalue"].startswith("EPOCHS = 0 (set by you): expected an integer >= 1")
    assert not cache.exists(), "something was built before the settings were checked"


@pytest.mark.parametrize(
    ("function", "statement", "expected"),
    [  # a build reading a knob its run_stage call does not key, through settings or a global
        ("build_tokenizer", '_ = cfg["EPOCHS"]', "stage 'tokenizer' read 'EPOCHS', which its "
         "run_stage call neither keys (config=) nor passes as a runtime setting (runtime=)"),
        ("training_texts", "_ = VOCAB_SIZE", "training_texts reads the global 'VOCAB_SIZE', data "
         "of this run: pass it to the build through run_stage(config=/runtime=)"),
        ("training_texts", "_ = CFG", "training_texts reads the global 'CFG'"),
    ],
)  # fmt: skip
def test_a_build_reading_a_setting_outside_its_key_is_caught(
    live_kernel, cold_run, tmp_path, function, statement, expected
):
    workdir, _ = cold_run
    parameters = {"PROFILE": "smoke", "CORPUS_DIR": str(workdir / "data" / "corpus"),
                  "CACHE_DIR": str(tmp_path / "cache"), "ARTIFACTS_DIR": str(tmp_path / "art")}  # fmt: skip
    result = live_kernel.run(parameters, until="# Stage 2: train the tokenizer",
                             edits=[insert_statement(function, statement)])  # fmt: skip
    assert result["error"] and expected in result["error"]["evalue"], result["error"]
    assert not list((tmp_path / "cache" / "tokenizer").glob("*/manifest.json"))
