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

pytestmark = pytest.mark.fast  # definition cells only: `uv run pytest -m fast`

MINIATURE_TRAINING = '''
def build_miniature(out, settings):
    """Steps 1-4 as the Trainer saves them (its own files, never synced; each then marked complete
    by the notebook's callback, which deletes the others but the best, step 1), sessions.json as
    the meter writes it, then the finished model and its files, as finish_training does."""
    found, sessions = newest_checkpoint(out), read_json(out / "sessions.json", [])
    first = int(found.name.split("-")[1]) + 1 if found else 1
    print(f"training from step {first}")
    for step in range(first, 5):
        folder = out / "checkpoints" / f"checkpoint-{step}"
        folder.mkdir(parents=True, exist_ok=True)  # (a save cut short left it)
        (folder / "model.safetensors").write_bytes(bytes(range(256)) * 64)
        (folder / "optimizer.pt").write_bytes(b"moments" * 100)
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step, "max_steps": 4}))
        best = str(out / "checkpoints" / "checkpoint-1")
        args = SimpleNamespace(output_dir=str(out / "checkpoints"))
        MarkComplete().on_save(args, SimpleNamespace(global_step=step, best_model_checkpoint=best), None)
        settings["complete"](step)
        write_json(out / "sessions.json", [*sessions, {"steps": step}])
    settings["finished"]()  # the end of training: from here on every step is tried
    (out / "model").mkdir(exist_ok=True)
    (out / "model" / "model.safetensors").write_bytes(bytes(range(256)) * 64)
    for name in ("metrics", "log_history"):
        write_json(out / f"{name}.json", {"name": name})


def build_data(out, settings):
    """A data stage: files written by a library (never synced), then published."""
    print("building the data stage")
    (out / "table.parquet").write_bytes(bytes(range(256)) * 32)
    (out / "hf").mkdir()
    (out / "hf" / "tokenizer.json").write_text(json.dumps({"vocab": list(range(100))}))
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
        "# Checks",
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


def run(nb, cache: Path, stage: str, finished=lambda: None, complete=lambda step: None, force=()):
    nb["CFG"] = {"CACHE_DIR": str(cache), "FORCE": list(force), "SFT_BASE_MODEL": "a base model"}
    build = nb["build_miniature"] if stage in nb["RESUMABLE"] else nb["build_data"]
    runtime = {"finished": finished, "complete": complete}
    return nb["run_stage"](stage, build, config={"lr": 1}, runtime=runtime)


def assert_whole_and_go_on(nb, cache: Path, stage: str, capfd, said: str = "", first=None) -> str:
    """The cache after a kill or a stop: each folder is a published build, a finished one waiting
    to be published, a resumable one, or a leftover start-up deletes; the re-run goes on from it,
    never from scratch, and leaves one complete build. `first`: when the build FORCE rebuilt was
    made; the re-run keeps FORCE unless the line said to take the stage out of it, and the build
    it leaves is the rebuild."""
    (final,) = {
        p.with_name(p.name.split(".")[0]) for p in (cache / stage).glob("*") if p.is_dir()
    } or {None}
    partial = final.with_name(final.name + ".partial") if final else None
    if re.search(r"published as it finished|it is complete and published", said):
        assert nb["read_json"](final / "manifest.json", {}).get("created_at", "") > (first or ""), (
            said
        )
    if "kept whole" in said:
        assert (partial / "manifest.json").exists(), said
    if match := re.search(r"(checkpoint-\d+) \(step", said):
        assert nb["checkpoint_complete"](partial / "checkpoints" / match[1]), said
    nb["remove_stale_builds"](cache)  # the next run's start-up
    capfd.readouterr()
    forced = [stage] if first and "out of FORCE" not in said else []
    stage_of = run(nb, cache, stage, force=forced)
    out = capfd.readouterr().out
    assert "training from step 1" not in out, f"a finished training was thrown away: {out}"
    assert stage_of.manifest["created_at"] > (first or ""), f"the rebuild was lost: {out}"
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


def stopped_twice_at_step(nb, cache: Path, stage: str, at: int, force=()) -> None:
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
    run(nb, cache, stage, force=force)


def stopped_twice_under_force(nb, cache: Path, stage: str, at: int) -> None:
    """The same in a rebuild that FORCE asked for, over a published build."""
    print(f"FIRST BUILT {run(nb, cache, stage).manifest['created_at']}", flush=True)
    stopped_twice_at_step(nb, cache, stage, at, force=[stage])


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
        assert "training from step" not in went_on or "training from step 5" in went_on, went_on
    assert steps > 10 and {"replace", "unlink", "rmdir"} <= ways, (steps, ways)


@pytest.mark.parametrize("force", [False, True], ids=["", "FORCE"])
@pytest.mark.parametrize("stage", ["pretrain", "sft_model"])
def test_a_second_stop_at_any_step_of_publishing_says_what_was_kept_and_it_is_so(
    nb, tmp_path, stage, force, capfd
):
    """The stop button once while the finished build is published (it waits), then again at a
    step of publishing: one line, true to what the cache holds, and the cell run again goes on;
    under FORCE (a published build there already) too, and the rebuild is never thrown away."""
    said, fault = set(), stopped_twice_under_force if force else stopped_twice_at_step
    for steps, cache, status, out in every_step(fault, nb, tmp_path, stage, capfd):
        (line,) = re.findall(r"^CHILD: (\w+): (.*)$", out, re.M) or [(None, None)]
        assert status == 1 and line[0] == "Stopped", (steps, out)
        message = line[1]
        said.add(
            re.sub(r"\S+\.partial|checkpoint-\d+ \(step \d+ of \d+\)|\w+ in \w+", "…", message)
        )
        first = re.search(r"^FIRST BUILT (\S+)$", out, re.M)
        assert_whole_and_go_on(nb, cache, stage, capfd, said=message, first=first and first[1])
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
        SimpleNamespace(global_step=7, best_model_checkpoint=None),
    )
    nb["MarkComplete"]().on_save(args, state, None)
    assert nb["checkpoint_complete"](folder) and nb["newest_checkpoint"](tmp_path) == folder
    (folder / "optimizer.pt").unlink()  # a kill while the Trainer deleted it, file by file
    assert not nb["checkpoint_complete"](folder) and nb["newest_checkpoint"](tmp_path) is None
    shutil.rmtree(folder)


# A power cut: what the kernel wrote and did not fsync is lost (ext4's delayed allocation leaves such
# a file empty), while every create, rename and delete is kept (the journal). The killed process
# records, at each fsync, the file's inode, size and time: a file that is not as some fsync left it
# is emptied. Files written by the Trainer or any library count as not synced unless the notebook
# synced them.
RECORD_FSYNCS = """
def _fsync(fd, _real=os.fsync, _log=LOG):
    _real(fd)
    st = os.fstat(fd)
    if stat.S_ISREG(st.st_mode):
        with open(_log, "a") as log:
            log.write(f"synced {st.st_ino} {st.st_size} {st.st_mtime_ns}\\n")
"""
WRITES = ("w", "a", "x", "+")


def power_cut(cache: Path, log: Path) -> list[str]:
    """Empty every file under `cache` that no fsync left as it is now; the emptied ones."""
    lines = log.read_text().splitlines() if log.exists() else []
    synced = {tuple(map(int, line.split()[1:])) for line in lines if line.startswith("synced")}
    emptied = []
    for path in sorted(p for p in cache.rglob("*") if p.is_file()):
        st = path.stat()
        if st.st_size and (st.st_ino, st.st_size, st.st_mtime_ns) not in synced:
            os.truncate(path, 0)
            emptied.append(path.relative_to(cache).as_posix())
    return emptied


def cut_power_at_step(nb, cache: Path, stage: str, at: int, log: Path) -> None:
    """The whole build with fsyncs recorded, the process killed before its at-th change of the disk
    (a file opened to write, a folder made, a rename, a delete, an fsync)."""
    import io
    import stat

    count = [0]

    def step(what):
        count[0] += 1
        if count[0] == at:
            print(f"POWER CUT before {what}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

    space = {"os": os, "stat": stat, "LOG": str(log)}
    exec(RECORD_FSYNCS, space)
    real_open, real_mkdir, recording_fsync = io.open, os.mkdir, space["_fsync"]

    def fsync(fd):
        step("os.fsync")
        return recording_fsync(fd)

    def open_(file, mode="r", *args, **kwargs):
        if set(mode) & set(WRITES):
            step(f"open({Path(file).name!r}, {mode!r})")
        return real_open(file, mode, *args, **kwargs)

    def mkdir(*args, **kwargs):
        step("os.mkdir")
        return real_mkdir(*args, **kwargs)

    os.fsync, io.open, os.mkdir = fsync, open_, mkdir
    watch_steps(lambda n, what: step(f"os.{what}"))

    def complete(n):
        with open(log, "a") as record:
            record.write(f"complete {n}\n")

    run(nb, cache, stage, complete=complete)


def power_cut_sweep(nb, tmp_path: Path, stage: str, capfd):
    """For a power cut before each change of the disk in turn: (the step, what the re-run printed,
    the checkpoint complete at the cut or None, whether the build was published, files emptied)."""
    for at in itertools.count(1):
        cache, log = tmp_path / f"{stage}-{at}" / "cache", tmp_path / f"{stage}-{at}" / "fsyncs"
        status = in_child(cut_power_at_step, nb, cache, stage, at, log)
        out = capfd.readouterr().out
        if status == 0:  # more steps than there are: every one was tried
            return
        assert status == -signal.SIGKILL, (at, out)
        lines = log.read_text().splitlines() if log.exists() else []
        done = [int(line.split()[1]) for line in lines if line.startswith("complete")]
        published = (cache / stage).is_dir() and any(
            p.is_dir() and "." not in p.name for p in (cache / stage).iterdir()
        )
        emptied = power_cut(cache, log)
        nb["remove_stale_builds"](cache)  # the next run's start-up
        capfd.readouterr()
        run(nb, cache, stage)  # never a traceback: an exception fails the test
        again = capfd.readouterr().out
        yield (
            at,
            out.split("POWER CUT before ")[-1].strip(),
            again,
            max(done, default=None),
            published,
            emptied,
        )


def lost(again: str, complete: int | None, published: bool) -> str | None:
    """What the re-run threw away, if anything: a published build, or checkpoints that were complete."""
    trained = re.search(r"training from step (\d+)|building the data stage", again)
    if published and trained:
        return f"the published build was built again ({trained[0]})"
    if complete and trained and trained[1] and int(trained[1]) <= complete:
        return f"{trained[0]}, though checkpoint-{complete} was complete"
    return None


@pytest.mark.parametrize("stage", ["tokenizer", "pretrain", "sft_model"])
def test_a_power_cut_at_any_step_keeps_what_was_finished(nb, tmp_path, stage, capfd):
    """A data stage's publish, every checkpoint's save (its rotation included) and a training's
    publish: after a power cut before any step, the published build loads, or training resumes
    from the newest checkpoint that was complete; never from scratch, never a traceback."""
    steps, losses, cuts = 0, [], set()
    for at, cut, again, complete, published, emptied in power_cut_sweep(nb, tmp_path, stage, capfd):
        steps, cuts = at, cuts | {cut.split("(")[0]}
        if why := lost(again, complete, published):
            losses.append(f"power cut before step {at} ({cut}), emptied {emptied}: {why}")
    assert steps > (15 if stage == "tokenizer" else 80), steps
    tried = {"os.fsync", "os.replace", "open", "os.mkdir"}  # (and a training's rotation:)
    assert tried | ({"os.unlink", "os.rmdir"} if stage in nb["RESUMABLE"] else set()) <= cuts, cuts
    assert not losses, "\n".join(losses)


def test_the_power_cut_test_catches_a_cache_that_does_not_sync(nb, tmp_path, capfd, monkeypatch):
    """The same sweep with the notebook's fsync helper made a no-op: finished work is lost."""
    monkeypatch.setitem(nb, "sync", lambda path: None)
    losses = [
        lost(again, complete, published)
        for _, _, again, complete, published, _ in power_cut_sweep(nb, tmp_path, "pretrain", capfd)
    ]
    assert any(losses), "a power cut lost nothing although nothing was synced"


def test_in_use_records_of_killed_kernels_go_at_start_up(nb, tmp_path):
    """A kernel that ended removed its own records (atexit: test_runs); one that was killed could
    not: the next start-up removes them, and keeps those of kernels still running."""
    nb["CFG"] = {"CACHE_DIR": str(tmp_path), "FORCE": []}
    child = os.fork()
    if child == 0:  # a kernel that holds a build, then is killed
        nb["hold_build"](tmp_path / "pretrain" / "abc")
        os.kill(os.getpid(), signal.SIGKILL)
    os.waitpid(child, 0)
    nb["hold_build"](tmp_path / "pretrain" / "abc")  # this process: alive
    records = sorted(p.name.rsplit(".", 1)[1] for p in tmp_path.glob("pretrain/abc.in-use.*"))
    assert records == sorted([str(child), str(os.getpid())]), records
    nb["remove_stale_builds"](tmp_path)
    left = [p.name.rsplit(".", 1)[1] for p in tmp_path.glob("pretrain/abc.in-use.*")]
    assert left == [str(os.getpid())], left


def killed_after_checkpoint(nb, cache: Path, stage: str, at: int) -> None:
    """The training killed once checkpoint `at` is complete."""

    def complete(step):
        if step == at:
            os.kill(os.getpid(), signal.SIGKILL)

    run(nb, cache, stage, complete=complete)


def test_json_and_weights_a_crash_damaged_are_named_and_the_training_goes_on(nb, tmp_path, capfd):
    """Empty, cut-short or garbage JSON files and a short weight file, anywhere a crash could leave
    them: each named in one line and read as absent; training resumes from the newest intact
    checkpoint; a damaged manifest rebuilds, saying so. Never a traceback."""
    for case in ("json", "weights"):
        cache = tmp_path / case / "cache"
        assert in_child(killed_after_checkpoint, nb, cache, "pretrain", 3) == -signal.SIGKILL
        (partial,) = (cache / "pretrain").glob("*.partial")
        checkpoints = sorted(p.name for p in (partial / "checkpoints").iterdir())
        assert checkpoints == ["checkpoint-1", "checkpoint-3"], checkpoints  # the best, the newest
        newest = partial / "checkpoints" / "checkpoint-3"
        damaged = {  # read on resume: each named
            newest / "complete.json": "",
            partial / "sessions.json": '[{"steps": 3',
        }
        rewritten = {  # read only by the runs table and by a run that waits: written anew
            partial / "build.json": "\0\0\0\0",
            partial.with_name(partial.name.split(".")[0] + ".owner.json"): "{",
        }
        if case == "weights":
            damaged, rewritten = {}, {newest / "optimizer.pt": "short"}
        for path, text in (damaged | rewritten).items():
            path.write_text(text)
        capfd.readouterr()
        assert in_child(lambda c=cache: run(nb, c, "pretrain")) == 0  # a child: each named once
        out = capfd.readouterr().out
        assert "training from step 2" in out, out  # from checkpoint-1, intact
        for path in damaged:
            assert f"{path} is damaged (empty or cut short: a crash?): read as absent" in out, path
    (final,) = [p for p in (cache / "pretrain").iterdir() if p.is_dir()]
    (final / "manifest.json").write_text('{"key": "')
    assert in_child(lambda: run(nb, cache, "pretrain")) == 0
    out = capfd.readouterr().out
    assert "because: its manifest.json is unreadable (empty or cut short" in out, out


def test_a_check_runs_once_while_what_it_checked_is_unchanged(nb, tmp_path):
    """The exported-model check on a warm re-run: its verdict is said again, nothing generated."""
    runs, record = [], tmp_path / "check.json"

    def check():
        runs.append(1)
        return "the export generates the same text"

    said = [nb["checked_once"](record, {"model": [("m", 1, 2)]}, check) for _ in range(2)]
    assert runs == [1] and said[0] == "the export generates the same text", said
    assert re.fullmatch(
        r"the export generates the same text \(checked [\d-]+ [\d:]+; unchanged since\)", said[1]
    )
    nb["checked_once"](record, {"model": [("m", 1, 3)]}, check)  # the file changed: checked again
    assert runs == [1, 1]
