"""Interrupt means pause: SIGINT (Jupyter's stop button) or SIGTERM (a VM shutting down) saves a
checkpoint at the next optimizer step and stops with one line; the re-run resumes there, to the
same log history as a run that never stopped. A second signal while saving aborts at once, in one
line too. The stop button outside training (a stage's answers) also ends in one line, and the
cell re-run goes on from there."""

import json
import re
import shutil

from conftest import (
    STAGE_CELLS,
    assert_resumed_like,
    code_cells,
    one_line_error,
    run_live,
    stage_dir,
    stop_button,
)


def without(workdir, *stages):
    for stage in stages:
        shutil.rmtree(workdir / "cache" / stage)


def cell(stage: str) -> str:
    (source,) = [s for s in code_cells() if s.startswith(STAGE_CELLS[stage])]
    return source


def checkpoints(cache, stage) -> dict:
    """checkpoint step -> complete? (the files a resume needs are all there, and marked so)."""
    partial = next((cache / stage).glob("*.partial"))
    need = ("trainer_state.json", "optimizer.pt", "complete.json")
    return {
        int(p.name.split("-")[1]): all((p / f).exists() for f in need)
        for p in (partial / "checkpoints").glob("checkpoint-*")
    }


def test_pretraining_pauses_on_the_stop_button_and_sigterm_and_the_cell_resumes_exactly(
    live_kernel, cold_run, warm_copy, tmp_path
):
    workdir, _ = cold_run
    without(warm_copy, "pretrain")
    # the stop button as soon as the first checkpoint exists (one every step: SAVE_MINUTES=0)
    press = stop_button(live_kernel, tmp_path) | {"at_checkpoint": 1}
    paused = run_live(
        live_kernel, warm_copy, "pretrain", SAVE_MINUTES=0, faults={"await_interrupt": press}
    )
    message = one_line_error(paused)
    assert re.fullmatch(
        r"\[pretrain\] paused by SIGINT at step 2 of \d+: checkpoint-2 is kept in \S+\.partial; "
        r"run this cell again \(or the notebook\) to resume there",
        message,
    ), message
    assert checkpoints(warm_copy / "cache", "pretrain")[2], "no checkpoint at the step it stopped"
    assert not list((warm_copy / "cache" / "pretrain").glob("*/manifest.json"))

    # the same cell re-run in the same kernel resumes; a VM's SIGTERM at step 13 pauses it again
    sigterm = '_test_faults["_SPEC"].update(signal_at_step=["SIGTERM", 13])'
    paused = live_kernel.run_cells([sigterm, cell("pretrain")])
    assert "resuming from checkpoint-2" in paused["text"]
    assert one_line_error(paused).startswith("[pretrain] paused by SIGTERM at step 13")

    # a second signal while that checkpoint is written aborts at once; the one this session saved
    # before it (a checkpoint every step again) stays valid, the older ones deleted once it was
    aborted = run_live(live_kernel, warm_copy, "pretrain", SAVE_MINUTES=0,
                       faults={"signal_at_step": ["SIGINT", 17], "second_signal_in_save": True})  # fmt: skip
    assert re.fullmatch(
        r"\[pretrain\] stopped at once by a second signal in \w+: nothing is published; "
        r"checkpoint-16 \(step 16 of \d+\) is kept in \S+\.partial: run this cell again \(or "
        r"the notebook\) to resume there",
        one_line_error(aborted),
    ), aborted["error"]
    saved = checkpoints(warm_copy / "cache", "pretrain")
    assert saved == {16: True}, saved  # 13 deleted once 16 was on disk; 17 never written

    resumed = run_live(live_kernel, warm_copy, "pretrain")
    assert resumed["error"] is None, resumed["error"]
    assert "resuming from checkpoint-16" in resumed["text"]
    assert_resumed_like(warm_copy / "cache", workdir / "cache", "pretrain", 2, 13, 16)
    ours, theirs = (stage_dir(c, "pretrain") for c in (warm_copy / "cache", workdir / "cache"))
    generations = [json.loads((f / "generations.json").read_text()) for f in (ours, theirs)]
    assert generations[0] == generations[1]
    # each session that saved a checkpoint counts, the aborted one (up to checkpoint-16) too
    assert len(json.loads((ours / "sessions.json").read_text())) == 4


def test_the_stop_button_in_the_answers_and_sigterm_in_sft_then_the_cells_go_on(
    live_kernel, cold_run, warm_copy, tmp_path
):
    workdir, _ = cold_run
    without(warm_copy, "base_answers", "sft_model")
    # stage 6: the stop button while the base model answers; nothing is kept, the cell rebuilds
    press = stop_button(live_kernel, tmp_path / "6") | {"in": "chat_answers"}
    (tmp_path / "6").mkdir()
    stopped = run_live(live_kernel, warm_copy, "base_answers", faults={"await_interrupt": press})
    assert one_line_error(stopped) == (
        "[base_answers] stopped (KeyboardInterrupt) in chat_answers: nothing is published; run "
        "this cell again to build it (what it was built on loads from the cache)"
    )
    assert not list((warm_copy / "cache" / "base_answers").glob("*/manifest.json"))
    again = live_kernel.run_cells([cell("base_answers")])
    assert again["error"] is None and again["stages"]["base_answers"][0].startswith("built")

    # stage 7: SIGTERM at step 3, then the stop button while the tuned model answers
    press = stop_button(live_kernel, tmp_path / "7") | {"in": "chat_answers"}
    (tmp_path / "7").mkdir()
    paused = run_live(live_kernel, warm_copy, "sft_model",
                      faults={"signal_at_step": ["SIGTERM", 3], "await_interrupt": press})  # fmt: skip
    assert one_line_error(paused).startswith("[sft_model] paused by SIGTERM at step 3")
    stopped = live_kernel.run_cells([cell("sft_model")])
    assert "resuming from checkpoint-3" in stopped["text"]
    assert re.fullmatch(
        r"\[sft_model\] stopped \(KeyboardInterrupt\) in chat_answers: nothing is published; "
        r"checkpoint-(\d+) \(step \1 of \1\) is kept in \S+: run this cell again \(or the "
        r"notebook\) to resume there",
        one_line_error(stopped),
    ), stopped["error"]
    resumed = live_kernel.run_cells([cell("sft_model")])
    assert resumed["error"] is None, resumed["error"]
    assert_resumed_like(warm_copy / "cache", workdir / "cache", "sft_model", 3)
    for stage in ("base_answers", "sft_model"):
        ours, theirs = (stage_dir(c, stage) for c in (warm_copy / "cache", workdir / "cache"))
        answers = [json.loads((f / "answers.json").read_text()) for f in (ours, theirs)]
        assert answers[0] == answers[1], stage

    # any other cell stopped (here one that waits, as a long result cell would): one line too
    (tmp_path / "cell").mkdir()
    press = stop_button(live_kernel, tmp_path / "cell")
    waiting = f'_test_faults["_WAITED"].clear(); _test_faults["_await_interrupt"]({press!r})'
    assert one_line_error(live_kernel.run_cells([waiting])) == (
        "stopped before this cell finished: run it again (finished stages load from the cache)"
    )
