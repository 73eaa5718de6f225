"""The cache as a lab notebook: every pretraining build in the cache compared with this run's (the
knob it differs in, the best validation loss it saved), the curves overlaid, and the disk given
back: a dry run by default, never this run's stages nor an interrupted build unless asked."""

import json
import re
import socket

from conftest import (
    ALL_CELLS,
    STAGE_CELLS,
    LiveKernel,
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


HASHED = (  # what the tables, the report and the dry run hash once the run has loaded every stage
    "import json\n_hashed, _digest = [], digest_file\n"
    "digest_file = lambda path: _hashed.append(str(path)) or _digest(path)\n"
    "show_runs('pretrain', ARTIFACTS / 'runs.png'); runs_markdown(); reclaim_disk()\n"
    "digest_file = _digest\nprint('HASHED=' + json.dumps(_hashed))"
)
PID = "import os; print(f'PID={os.getpid()}')"


def cell(title: str) -> str:
    (source,) = [s for s in code_cells() if s.startswith(title)]
    return source


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
    # the run hashed each build once: the tables, the report and the dry run again hash nothing
    assert printed(live_kernel.run_cells([HASHED]), "HASHED") == []

    # a second kernel uses the WEIGHT_DECAY 0.0 build: deleting skips it and names that kernel
    second = LiveKernel()
    try:
        held = run_live(second, warm_copy, "pretrain", WEIGHT_DECAY=0.0, after=[PID])
        assert held["error"] is None and statuses(held)["pretrain"] == "cached", held["error"]
        freed = live_kernel.run_cells(["reclaim_disk(delete=True, partial=True)"])
        pid = printed(held, "PID")
        assert f"kept pretrain {other_key}, in use by pid {pid} on this machine" in freed["text"]
        assert sorted(p.name[:12] for p in cache.iterdir() if p.is_dir()) == sorted(
            [ours, other_key]
        )
        # ... and that kernel goes on with it, to the same results it had
        sources = list(code_cells())
        start = sources.index(cell(STAGE_CELLS["pretrain"])) + 1
        end = sources.index(cell("# Stage 4: export the model")) + 1
        exported = second.run_cells(sources[start:end])  # the cells after stage 4's, to its export
        (metrics,) = cache.glob(f"{other_key}*/metrics.json")
        best = json.loads(metrics.read_text())["best"]["eval_loss"]
        assert exported["error"] is None and f"**{best:.3f}**" in exported["text"], exported
    finally:
        second.close()
    assert not list(cache.glob(f"*.in-use.*.{pid}")), "an ended kernel's records stay behind"

    # a build whose file was changed: listed as damaged (what its manifest records, which file
    # failed), its files never read; the rest still shown
    (metrics,) = cache.glob(f"{other_key}*/metrics.json")
    metrics.write_text(metrics.read_text().replace("0", "1", 1))
    shown = live_kernel.run_cells([cell("# Runs in this cache: every pretraining"), SHOW])
    rows = {row["key"]: row for row in printed(shown, "RUNS")}
    assert rows[other_key]["best"] == "damaged: output file metrics.json changed since it was built"
    assert rows[other_key]["differs from this run in"] == "WEIGHT_DECAY 0.0 (this run 0.01)"
    assert len(rows) == 2 and rows[ours]["run"] == "▶ this run"

    # a kernel on another machine used it too (an earlier Colab session on this Drive folder):
    # kept and named, with the way out; once you say those have ended, deleted with its record
    (build,) = [p for p in cache.iterdir() if p.is_dir() and p.name.startswith(other_key)]
    elsewhere = build.with_name(f"{build.name}.in-use.ended-colab-session.4242")
    elsewhere.touch()
    kept = live_kernel.run_cells(["reclaim_disk(delete=True)"])
    assert (
        f"kept pretrain {other_key}, in use by pid 4242 on ended-colab-session (whether it still "
        "runs cannot be checked from here); if no notebook runs on those other machines any more "
        "(an ended Colab or Kaggle session), reclaim_disk(delete=True, other_machines_ended=True)"
    ) in kept["text"], kept
    assert (build / "metrics.json").is_file() and elsewhere.exists()

    # the other kernels have ended: deleting frees it, and a warm re-run still loads every stage
    freed = live_kernel.run_cells(["reclaim_disk(delete=True, other_machines_ended=True)"])
    assert re.search(r"freed [\d.]+ [KMG]iB; the cache now holds", freed["text"]), freed
    left = [p.name for p in cache.iterdir() if p.is_dir()]
    assert len(left) == 1 and left[0].startswith(ours) and "." not in left[0], left
    assert not elsewhere.exists(), "the record of a kernel that has ended stays behind"
    again = run_live(live_kernel, warm_copy, "sft_model", after=[PID])  # up to the last stage
    assert again["error"] is None and set(statuses(again).values()) == {"cached"}
    # ... and once more: the exported model's check, its export unchanged, generates nothing
    checked = run_live(live_kernel, warm_copy, "# Stage 4: the exported model reproduces")
    assert "; unchanged since)" in checked["text"], "the exported model was checked again"
    assert stage_keys(again) == stage_keys(cold)

    # a record of a build no longer in the cache (deleted by hand) holds nothing: listed, deleted
    orphan = cache / f"{'0' * 32}.in-use.{socket.gethostname()}.{printed(again, 'PID')}"
    orphan.touch()
    listed = live_kernel.run_cells(["reclaim_disk()"])
    assert "1 in-use record(s) of builds no longer in the cache" in listed["text"], listed
    deleted = live_kernel.run_cells(["reclaim_disk(delete=True)"])
    assert "deleted 1 in-use record(s)" in deleted["text"] and not orphan.exists(), deleted
