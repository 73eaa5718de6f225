"""The notebook on Colab or Kaggle: it runs alone (the shared cold run is the notebook copied by
itself into an empty folder), keeps its cache on a filesystem without POSIX locks (Google Drive's
FUSE), and loads a cache made with other library releases (the library check: test_libraries)."""

import json
import subprocess
import sys

from conftest import (
    one_line_error,
    run_live,
    stage_dir,
    stage_keys,
    statuses,
)


def test_without_posix_locks_the_cache_locks_with_lock_files(live_kernel, tmp_path, cold_run):
    """fcntl.flock fails with ENOSYS, as on a FUSE mount: the build runs under a lock file, said in
    one line; a lock file left by a dead run here is removed, one from another machine is named."""
    workdir, _ = cold_run
    parameters = {
        "CORPUS_DIR": str(workdir / "data" / "corpus"),
        "faults": {"no_posix_locks": True},
    }
    first = run_live(live_kernel, tmp_path, "tokenizer", **parameters)
    assert first["error"] is None, first["error"]
    assert statuses(first) == {"clean_corpus": "built", "tokenizer": "built"}
    assert first["text"].count("has no POSIX file locks (Function not implemented)") == 1
    stage = tmp_path / "cache" / "clean_corpus"
    assert not list(stage.glob("*.lock")), "a lock file outlived its build"

    key = stage_keys(first)["clean_corpus"]
    (final,) = [p for p in stage.iterdir() if p.is_dir() and p.name.startswith(key)]
    lock, owner = (final.with_name(f"{final.name}.{s}") for s in ("lock", "owner.json"))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock.touch()  # what a run on this machine that died while building leaves
    owner.write_text(json.dumps({"pid": dead.pid, "host": host(), "started": "2026-12-02 12:03"}))
    again = run_live(live_kernel, tmp_path, "clean_corpus", FORCE=["clean_corpus"], **parameters)
    assert again["error"] is None, again["error"]
    assert f"removing {lock}, left by pid {dead.pid} (no longer running)" in again["text"]

    lock.touch()  # a VM that disconnected while it built, its cache on Drive
    owner.write_text(
        json.dumps({"pid": 4242, "host": "colab-vm-gone", "started": "2026-12-02 12:03"})
    )
    stuck = run_live(live_kernel, tmp_path, "clean_corpus", FORCE=["clean_corpus"], **parameters)
    assert one_line_error(stuck) == (
        f"[clean_corpus] {lock} was left by pid 4242 on colab-vm-gone (started 2026-12-02 12:03), "
        "which this machine cannot check: if no run there uses this cache any more (a "
        "disconnected VM), delete that file and run again"
    )


def host() -> str:
    import socket

    return socket.gethostname()


def test_the_notebook_runs_alone_in_an_empty_folder(cold_run):
    """The shared cold run: no pyproject.toml above its folder, paths at their defaults."""
    workdir, result = cold_run
    assert not any((folder / "pyproject.toml").exists() for folder in [workdir, *workdir.parents])
    assert set(statuses(result).values()) == {"built"} and len(result["stages"]) == 7
    assert (workdir / "cache" / "pretrain").is_dir() and (
        workdir / "artifacts" / "report.md"
    ).is_file()


def test_a_cache_made_with_another_torch_loads_saying_so_and_a_new_major_rebuilds(
    live_kernel, warm_copy
):
    """The runtime moved on since the cache was made (releases faked where the notebook reads
    them, after its Set-up check): every stage loads, its line naming both releases; FORCE
    rebuilds one with the new release; a build recorded with a release below the floor, or a
    new major of a keyed library, is built again, saying why."""
    cache = warm_copy / "cache"
    made = json.loads((stage_dir(cache, "pretrain") / "manifest.json").read_text())["libs"]
    newer = {"versions": {"torch": "2.13.0+cu130"}}
    moved = run_live(live_kernel, warm_copy, "sft_model", faults=newer)
    assert moved["error"] is None and set(statuses(moved).values()) == {"cached"}, moved["error"]
    for stage in ("pretrain", "base_answers", "sft_model"):
        assert f"with torch {made['torch']} (you have 2.13.0)" in moved["stages"][stage][1], stage
    assert "torch" not in moved["stages"]["dataset"][1]
    # FORCE rebuilds a stage with the releases of this runtime, which it records
    newer = {"versions": {"tokenizers": "0.24.0"}}
    forced = run_live(live_kernel, warm_copy, "tokenizer", FORCE=["tokenizer"], faults=newer)
    assert statuses(forced)["tokenizer"] == "built", forced["error"]
    made = json.loads((stage_dir(cache, "tokenizer") / "manifest.json").read_text())["libs"]
    assert made["tokenizers"] == "0.24.0"

    # recorded below the floor (its files may not load): built again, in one line why
    manifest = stage_dir(cache, "tokenizer") / "manifest.json"
    record = json.loads(manifest.read_text())
    manifest.write_text(json.dumps(record | {"libs": record["libs"] | {"tokenizers": "0.19.1"}}))
    old = run_live(live_kernel, warm_copy, "tokenizer")
    assert old["stages"]["tokenizer"][1].endswith(
        "because: it was made with tokenizers 0.19.1, older than this notebook runs with: built again"
    ), old["stages"]
    # a new major of a keyed library: built again, naming it
    major = run_live(
        live_kernel, warm_copy, "tokenizer", faults={"versions": {"transformers": "6.0.0"}}
    )
    assert "because: library transformers: '5' -> '6'" in major["stages"]["tokenizer"][1]
    # a data stage keys no release: one that writes other bytes rebuilds what is built on it
    other = run_live(live_kernel, warm_copy, "dataset", FORCE=["tokenizer"],
                     faults={"other_tokenizer_bytes": True})  # fmt: skip
    assert statuses(other) == {"clean_corpus": "cached", "tokenizer": "built", "dataset": "built"}
    assert "upstream output of tokenizer changed" in other["stages"]["dataset"][1]
