"""A finished training is never lost between its last step and its publishing. The notebook's own
run_stage, build_and_publish and publish run a miniature training (three checkpoints the way the
Trainer writes, rotates and marks them, then the model and its files) in a forked process that is
killed with SIGKILL at each step that changes the disk from the end of training on (a rename, a
file deleted, a folder removed), or gets a second stop there; the re-run then loads the build,
publishes it, or resumes from an intact checkpoint: never from scratch, never a traceback."""

import itertools
import os
import re
import shutil
import signal
import sys
import traceback
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import definitions

MINIATURE_TRAINING = '''
def build_miniature(out, settings):
    """Steps 1-3 as the Trainer saves them (each marked complete by the notebook's callback, the
    oldest deleted past two), then the finished model and its files, as finish_training does."""
    found = newest_checkpoint(out)
    first = int(found.name.split("-")[1]) + 1 if found else 1
    print(f"training from step {first}")
    for step in range(first, 4):
        folder = out / "checkpoints" / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(bytes(range(256)) * 64)
        (folder / "optimizer.pt").write_bytes(b"moments" * 100)
        write_json(folder / "trainer_state.json", {"global_step": step, "max_steps": 3})
        args, state = SimpleNamespace(output_dir=str(out / "checkpoints")), SimpleNamespace(global_step=step)
        MarkComplete().on_save(args, state, None)
        if step > 2:  # save_total_limit=2: the Trainer deletes the oldest, file by file
            shutil.rmtree(out / "checkpoints" / f"checkpoint-{step - 2}")
    settings["finished"]()  # the end of training: from here on every step is tried
    (out / "model").mkdir(exist_ok=True)
    (out / "model" / "model.safetensors").write_bytes(bytes(range(256)) * 64)
    for name in ("metrics", "log_history", "sessions"):
        write_json(out / f"{name}.json", {"name": name})
'''


@pytest.fixture(scope="module")
def nb():
    namespace = definitions(
        "# The assignment's prompts",
        "# Defaults",
        "# Settings",
        "# Stage cache",
        "# Signals",
        "# JSON files",
        "# Training: a checkpoint is complete",
        "# Training: where a re-run resumes",
    )
    exec(MINIATURE_TRAINING, namespace)
    namespace.update(SimpleNamespace=SimpleNamespace, GIVEN={}, STAGES={}, VERIFIED={})
    return namespace


STEPS = ("replace", "rename", "unlink", "remove", "rmdir")  # what changes the disk


def watch_steps(on_step) -> list[int]:
    """Call on_step(n, what) before the n-th change of the disk; returns [how many so far]."""
    count = [0]
    for name in STEPS:
        real = getattr(os, name)

        def step(*args, _real=real, _name=name, **kwargs):
            count[0] += 1
            on_step(count[0], _name)
            return _real(*args, **kwargs)

        setattr(os, name, step)
    return count


def in_child(work, *args) -> int:
    """work(*args) in a forked process; its exit status (-9: killed)."""
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:
        try:
            work(*args)
        except BaseException as err:  # what the student would see, for the parent
            print(f"CHILD: {type(err).__name__}: {err}", flush=True)
            if type(err).__name__ != "Stopped":
                traceback.print_exc()
            os._exit(1)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def run(nb, cache: Path, stage: str, finished=lambda: None):
    nb["CFG"] = {"CACHE_DIR": str(cache), "FORCE": [], "SFT_BASE_MODEL": "a base model"}
    return nb["run_stage"](
        stage, nb["build_miniature"], config={"lr": 1}, runtime={"finished": finished}
    )


def assert_whole_and_go_on(nb, cache: Path, stage: str, capfd, said: str = "") -> str:
    """The cache after a kill or a stop: each folder is a published build, a finished one waiting
    to be published, a resumable one, or a leftover start-up deletes; the re-run goes on from it,
    never from scratch, and leaves one complete build."""
    (final,) = {
        p.with_name(p.name.split(".")[0]) for p in (cache / stage).glob("*") if p.is_dir()
    } or {None}
    partial = final.with_name(final.name + ".partial") if final else None
    if re.search(r"published as it finished|it is complete and published", said):
        assert (final / "manifest.json").exists(), said
    if "kept whole" in said:
        assert (partial / "manifest.json").exists(), said
    if match := re.search(r"(checkpoint-\d+) \(step", said):
        assert nb["checkpoint_complete"](partial / "checkpoints" / match[1]), said
    nb["remove_stale_builds"](cache)  # the next run's start-up
    capfd.readouterr()
    stage_of = run(nb, cache, stage)
    out = capfd.readouterr().out
    assert "training from step 1" not in out, f"a finished training was thrown away: {out}"
    assert nb["check_manifest"](stage_of.folder, stage_of.manifest["key"])[0], out
    left = sorted(p.name for p in (cache / stage).iterdir() if p.is_dir())
    assert left == [stage_of.folder.name], left  # no partial, no leftover
    assert (
        not (stage_of.folder / "checkpoints").exists()
        and not (stage_of.folder / "build.json").exists()
    )
    return out


def killed_at_step(nb, cache: Path, stage: str, at: int) -> None:
    """The training killed (SIGKILL) before the at-th change of the disk after its last step."""
    finished = []

    def kill(n, what):
        if finished and n - finished[0] == at:
            print(f"KILLED before os.{what}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

    steps_so_far = watch_steps(kill)
    run(nb, cache, stage, finished=lambda: finished.append(steps_so_far[0]))


def stopped_twice_at_step(nb, cache: Path, stage: str, at: int) -> None:
    """The stop button at the first change of the disk while the build is published (publishing
    goes on), and again at the at-th (that one aborts)."""
    seen = []

    def stop(n, what):
        if getattr(signal.getsignal(signal.SIGINT), "__name__", "") != "handle":
            return  # not publishing (SignalCatcher's handler)
        seen.append(n)
        if len(seen) == 1:
            os.kill(os.getpid(), signal.SIGINT)  # the first: publishing goes on
        if len(seen) == at:
            os.kill(os.getpid(), signal.SIGINT)  # the second: aborts here

    watch_steps(stop)
    run(nb, cache, stage)


def every_step(fault, nb, tmp_path: Path, stage: str, capfd):
    """(step, its cache, the child's exit status, what it printed) for `fault` at step 1, 2, …"""
    for step in itertools.count(1):
        cache = tmp_path / f"{fault.__name__}-{step}"
        status = in_child(fault, nb, cache, stage, step)
        yield step, cache, status, capfd.readouterr().out


@pytest.mark.parametrize("stage", ["pretrain", "sft_model"])
def test_a_kill_at_any_step_of_finishing_and_publishing_never_loses_the_training(
    nb, tmp_path, stage, capfd
):
    ways = set()
    for steps, cache, status, out in every_step(killed_at_step, nb, tmp_path, stage, capfd):
        if status == 0:  # more steps than there are: every one was tried
            break
        assert status == -signal.SIGKILL, (steps, out)
        ways |= set(re.findall(r"KILLED before os\.(\w+)", out))
        went_on = assert_whole_and_go_on(nb, cache, stage, capfd)
        assert "training from step" not in went_on or "training from step 4" in went_on, went_on
    assert steps > 10 and {"replace", "unlink", "rmdir"} <= ways, (steps, ways)


@pytest.mark.parametrize("stage", ["pretrain", "sft_model"])
def test_a_second_stop_at_any_step_of_publishing_says_what_was_kept_and_it_is_so(
    nb, tmp_path, stage, capfd
):
    """The stop button once while the finished build is published (it waits), then again at a
    step of publishing: one line, true to what the cache holds, and the cell run again goes on."""
    said = set()
    for steps, cache, status, out in every_step(stopped_twice_at_step, nb, tmp_path, stage, capfd):
        (line,) = re.findall(r"^CHILD: (\w+): (.*)$", out, re.M) or [(None, None)]
        assert status == 1 and line[0] == "Stopped", (steps, out)
        message = line[1]
        said.add(
            re.sub(r"\S+\.partial|checkpoint-\d+ \(step \d+ of \d+\)|\w+ in \w+", "…", message)
        )
        assert_whole_and_go_on(nb, cache, stage, capfd, said=message)
        if "stopped by SIGINT as it finished" in message:  # no step left for the second stop
            break
    assert steps > 5, steps
    assert any("kept whole" in s for s in said) and any(
        "published as it finished" in s for s in said
    ), said


def test_a_checkpoint_is_complete_only_while_every_file_it_listed_is_there(nb, tmp_path):
    folder = tmp_path / "checkpoints" / "checkpoint-7"
    folder.mkdir(parents=True)
    for name in ("model.safetensors", "optimizer.pt", "trainer_state.json"):
        (folder / name).write_text(name)
    assert not nb["checkpoint_complete"](folder), "complete before it was marked"
    args, state = (
        SimpleNamespace(output_dir=str(tmp_path / "checkpoints")),
        SimpleNamespace(global_step=7),
    )
    nb["MarkComplete"]().on_save(args, state, None)
    assert nb["checkpoint_complete"](folder) and nb["newest_checkpoint"](tmp_path) == folder
    (folder / "optimizer.pt").unlink()  # a kill while the Trainer deleted it, file by file
    assert not nb["checkpoint_complete"](folder) and nb["newest_checkpoint"](tmp_path) is None
    shutil.rmtree(folder)
