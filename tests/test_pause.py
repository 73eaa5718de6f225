"""Interrupt means pause: SIGINT (Jupyter's stop button) or SIGTERM (a VM shutting down) saves a
checkpoint at the next optimizer step and stops with one line; the re-run resumes there, to the
same log history as a run that never stopped. A second signal while saving aborts at once."""

import json
import re
import shutil

from conftest import assert_resumed_like, one_line_error, run_live, stage_dir


def without(workdir, *stages):
    for stage in stages:
        shutil.rmtree(workdir / "cache" / stage)


def checkpoints(cache, stage) -> dict:
    """checkpoint step -> complete? (the files a resume needs are all there)."""
    partial = next((cache / stage).glob("*.partial"))
    need = ("trainer_state.json", "optimizer.pt")
    return {
        int(p.name.split("-")[1]): all((p / f).exists() for f in need)
        for p in (partial / "checkpoints").glob("checkpoint-*")
    }


def test_pretraining_pauses_on_sigint_and_sigterm_and_resumes_exactly(
    live_kernel, cold_run, warm_copy
):
    workdir, _ = cold_run
    without(warm_copy, "pretrain")
    paused = run_live(live_kernel, warm_copy, "pretrain", faults={"signal_at_step": ["SIGINT", 5]})
    message = one_line_error(paused)
    assert re.match(r"pretrain paused by SIGINT at step 5 of \d+: ", message), message
    assert "re-run the notebook to resume" in message
    assert checkpoints(warm_copy / "cache", "pretrain")[5], "no checkpoint at the step it stopped"
    assert not list((warm_copy / "cache" / "pretrain").glob("*/manifest.json"))

    paused = run_live(
        live_kernel, warm_copy, "pretrain", faults={"signal_at_step": ["SIGTERM", 13]}
    )
    assert "resuming from checkpoint-5" in paused["text"]
    assert one_line_error(paused).startswith("pretrain paused by SIGTERM at step 13")

    # a second signal while that checkpoint is written aborts at once; the previous one stays valid
    aborted = run_live(live_kernel, warm_copy, "pretrain",
                       faults={"signal_at_step": ["SIGINT", 17], "second_signal_in_save": True})  # fmt: skip
    assert aborted["error"]["ename"] == "KeyboardInterrupt", aborted["error"]
    saved = checkpoints(warm_copy / "cache", "pretrain")
    assert saved[13] and not saved.get(17), saved  # 17 never became a complete checkpoint

    resumed = run_live(live_kernel, warm_copy, "pretrain")
    assert resumed["error"] is None, resumed["error"]
    assert "resuming from checkpoint-13" in resumed["text"]
    assert_resumed_like(warm_copy / "cache", workdir / "cache", "pretrain", 5, 13)
    ours, theirs = (stage_dir(c, "pretrain") for c in (warm_copy / "cache", workdir / "cache"))
    generations = [json.loads((f / "generations.json").read_text()) for f in (ours, theirs)]
    assert generations[0] == generations[1]
    # sessions with a checkpoint count: the aborted one saved none, so its time is not reported
    assert len(json.loads((ours / "sessions.json").read_text())) == 3


def test_sft_pauses_on_sigterm_and_resumes_exactly(live_kernel, cold_run, warm_copy):
    workdir, _ = cold_run
    without(warm_copy, "sft_model")
    paused = run_live(
        live_kernel, warm_copy, "sft_model", faults={"signal_at_step": ["SIGTERM", 3]}
    )
    assert one_line_error(paused).startswith("sft_model paused by SIGTERM at step 3")
    resumed = run_live(live_kernel, warm_copy, "sft_model")
    assert "resuming from checkpoint-3" in resumed["text"], resumed["error"]
    assert_resumed_like(warm_copy / "cache", workdir / "cache", "sft_model", 3)
    ours, theirs = (stage_dir(c, "sft_model") for c in (warm_copy / "cache", workdir / "cache"))
    answers = [json.loads((f / "answers.json").read_text()) for f in (ours, theirs)]
    assert answers[0] == answers[1]
