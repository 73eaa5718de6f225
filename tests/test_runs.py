"""The cache as a lab notebook: every pretraining build in the cache compared with this run's (the
knob it differs in, the best validation loss it saved), the curves overlaid, and the disk given
back: a dry run by default, never this run's stages nor an interrupted build unless asked."""

import json
import re

from conftest import (
    ALL_CELLS,
    code_cells,
    one_line_error,
    run_live,
    stage_keys,
    statuses,
)

SHOW = (
    "import json\n"
    "print('RUNS=' + json.dumps(runs_table('pretrain', builds_of('pretrain'))))\n"
    "print('UNUSED=' + json.dumps([[b.stage, b.key, b.state] for b in unused_builds(False)]))\n"
    "print('PARTIAL=' + json.dumps([[b.stage, b.key, b.state] for b in unused_builds(True)]))"
)


def printed(result, name: str):
    return json.loads(re.search(rf"^{name}=(.*)$", result["text"], re.M).group(1))


def test_three_pretraining_builds_compared_then_the_unused_ones_deleted(
    live_kernel, cold_run, warm_copy
):
    _, cold = cold_run
    cache = warm_copy / "cache" / "pretrain"
    # WEIGHT_DECAY 0.0: a second complete build; 0.1: interrupted, left as <key>.partial
    other = run_live(live_kernel, warm_copy, "pretrain", WEIGHT_DECAY=0.0)
    assert other["error"] is None and statuses(other)["pretrain"] == "built", other["error"]
    other_key = stage_keys(other)["pretrain"]
    paused = run_live(live_kernel, warm_copy, "pretrain", WEIGHT_DECAY=0.1,
                      faults={"signal_at_step": ["SIGINT", 3]})  # fmt: skip
    assert one_line_error(paused).startswith("[pretrain] paused by SIGINT at step 3")

    # this run (WEIGHT_DECAY 0.01, the default): every stage cached, to the end of the notebook
    run = run_live(live_kernel, warm_copy, ALL_CELLS, after=[SHOW])
    assert run["error"] is None, run["error"]
    assert set(statuses(run).values()) == {"cached"}
    rows = {row["key"]: row for row in printed(run, "RUNS")}
    ours = stage_keys(cold)["pretrain"]
    assert len(rows) == 3 and rows[ours]["run"] == "▶ this run"
    assert rows[ours]["differs from this run in"] == "—"
    assert rows[other_key]["differs from this run in"] == "WEIGHT_DECAY 0.0 (this run 0.01)"
    (interrupted,) = [r for k, r in rows.items() if k not in (ours, other_key)]
    assert interrupted["differs from this run in"] == "WEIGHT_DECAY 0.1 (this run 0.01)"
    assert re.fullmatch(r"interrupted at step 3 of \d+", interrupted["best"]), interrupted
    for key in (ours, other_key):  # each best validation loss as the build saved it
        (folder,) = cache.glob(f"{key}*/metrics.json")
        best = json.loads(folder.read_text())["best"]
        assert f"val loss {best['eval_loss']:.4f}" in rows[key]["best"], rows[key]
    assert "WEIGHT_DECAY 0.0 (this run 0.01)" in run["text"], "the table is not shown"
    assert (warm_copy / "artifacts" / "runs_pretrain.png").stat().st_size > 1000
    assert "## Runs in this cache" in (warm_copy / "artifacts" / "report.md").read_text()
    # the dry run: exactly the build this run does not use; the interrupted one only when asked
    assert [k[:12] for _, k, _ in printed(run, "UNUSED")] == [other_key]
    assert sorted(s for *_, s in printed(run, "PARTIAL")) == ["complete", "interrupted"]
    assert "1 build this run does not use" in run["text"]
    assert len(list(cache.glob("*/manifest.json"))) == 2, "the dry run deleted something"

    # a build whose file was changed: listed as damaged, never read; the rest still shown
    (metrics,) = cache.glob(f"{other_key}*/metrics.json")
    metrics.write_text(metrics.read_text().replace("0", "1", 1))
    (table,) = [s for s in code_cells() if s.startswith("# Runs in this cache: every pretraining")]
    shown = live_kernel.run_cells([table, SHOW])
    rows = {row["key"]: row for row in printed(shown, "RUNS")}
    assert rows[other_key]["best"] == "damaged: output file metrics.json changed since it was built"
    assert len(rows) == 3 and rows[ours]["run"] == "▶ this run"

    # deleting frees them both, and a warm re-run still loads every stage
    freed = live_kernel.run_cells(["reclaim_disk(delete=True, partial=True)"])
    assert re.search(r"freed [\d.]+ [KMG]iB; the cache now holds", freed["text"]), freed
    left = [p.name for p in cache.iterdir() if p.is_dir()]
    assert len(left) == 1 and left[0].startswith(ours) and "." not in left[0], left
    again = run_live(live_kernel, warm_copy, "sft_model")  # up to the last stage
    assert again["error"] is None and set(statuses(again).values()) == {"cached"}
    assert stage_keys(again) == stage_keys(cold)
