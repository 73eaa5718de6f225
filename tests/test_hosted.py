"""The notebook on Colab or Kaggle: it runs alone (the shared cold run is the notebook copied by
itself into an empty folder), says in one line which libraries a hosted runtime lacks and how to
install them, and keeps its cache on a filesystem without POSIX locks (Google Drive's FUSE)."""

import importlib.metadata
import json
import subprocess
import sys
import tomllib
from types import SimpleNamespace

import pytest
from conftest import (
    ROOT,
    code_cells,
    definitions,
    one_line_error,
    run_live,
    stage_dir,
    stage_keys,
    statuses,
)


@pytest.fixture(scope="module")
def nb():
    return definitions(
        "# Libraries: the versions",
        "# Libraries: a version within",
        "# Libraries: a hosted",
        "# Libraries: each one",
        "# Libraries: what to do",
    )


def as_host(monkeypatch, versions: dict, real=importlib.metadata.version) -> None:
    """importlib.metadata.version answers as a host with these versions (None: not installed)."""

    def version_of(name: str) -> str:
        if versions.get(name, real(name)) is None:
            raise importlib.metadata.PackageNotFoundError(name)
        return versions.get(name, real(name))

    monkeypatch.setattr(importlib.metadata, "version", version_of)


SET_UP = "# Libraries: checked before"  # the Set-up cell that checks the libraries


def set_up_cell(nb) -> None:
    """The Set-up cell itself, run in the definitions' namespace."""
    (check,) = [s for s in code_cells() if s.startswith(SET_UP)]
    exec(check, nb)


def test_the_project_environment_passes_and_a_hosted_one_gets_one_line_with_the_fix(
    nb, monkeypatch
):
    assert nb["library_problems"]() == [], "the uv environment itself is out of range"
    assert nb["in_project_environment"]()
    monkeypatch.setitem(nb, "in_project_environment", lambda: False)  # Colab's or Kaggle's Python
    colab = {"trl": None, "torch": "2.9.1+cu126"}  # trl missing; a CUDA torch in range
    as_host(monkeypatch, colab)
    with pytest.raises(nb["UserError"]) as stopped:
        set_up_cell(nb)  # the Set-up cell itself stops, in one line
    message = str(stopped.value)
    assert message.startswith("Libraries this notebook needs: trl missing (needs >=1.0,<2). Run ")
    assert "`%pip install -q trl==1.16.0 torch==2.9.1+cu126`" in message, "torch is not kept"
    assert "Runtime → Restart session" in message and "\n" not in message
    as_host(monkeypatch, colab | {"trl": "1.16.0", "transformers": "4.57.3"})
    message = nb["library_error"](nb["library_problems"]())
    assert "transformers 4.57.3 (needs >=5.0,<6)" in message
    assert "`%pip install -q transformers==5.24.0 torch==2.9.1+cu126`" in message
    as_host(monkeypatch, {"torch": "2.8.0+cu126"})  # below the floor: the lock's torch, then
    assert "`%pip install -q torch==2.10.0`" in nb["library_error"](nb["library_problems"]())


def test_a_plain_python_without_torch_or_anything_gets_the_one_line(nb, monkeypatch):
    """A plain Python with papermill and ipykernel only: no torch, no library at all."""
    monkeypatch.setitem(nb, "in_project_environment", lambda: False)
    as_host(monkeypatch, dict.fromkeys(nb["LIBRARIES"]))
    with pytest.raises(nb["UserError"]) as stopped:
        set_up_cell(nb)
    pins = " ".join(f"{name}=={pinned}" for name, (_, pinned) in nb["LIBRARIES"].items())
    assert str(stopped.value).startswith("Libraries this notebook needs: torch missing (needs ")
    assert f"`%pip install -q {pins}`" in str(stopped.value)


def test_a_hosts_newer_torch_is_kept_with_one_line_and_left_out_of_the_pip_line(
    nb, monkeypatch, capsys
):
    monkeypatch.setitem(nb, "in_project_environment", lambda: False)  # Colab's or Kaggle's Python
    as_host(monkeypatch, {"torch": "2.13.0+cu130", "trl": None})
    assert nb["library_problems"]() == [("trl", None, ">=1.0,<2")], "torch 2.13 not kept"
    message = nb["library_error"](nb["library_problems"]())
    assert "`%pip install -q trl==1.16.0`" in message, message  # torch left out: kept as it is
    as_host(monkeypatch, {"torch": "2.13.0+cu130"})
    set_up_cell(nb)  # the Set-up cell itself: passes, with one line
    assert capsys.readouterr().out == (
        "torch 2.13.0+cu130 is newer than this notebook was tested with (2.10–2.11); keeping it\n"
    )
    # the project's own environment keeps uv.lock's torch: `uv sync`
    monkeypatch.setitem(nb, "in_project_environment", lambda: True)
    as_host(monkeypatch, {"torch": "2.13.0+cu130", "trl": None})
    assert [name for name, *_ in nb["library_problems"]()] == ["torch", "trl"]


def test_the_versions_are_pyproject_ranges_and_the_lock_pins(nb):
    ranges = {}
    for line in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]:
        name = line.split(">")[0].split("<")[0].split("=")[0]
        ranges[name] = line[len(name) :]
    lock = tomllib.loads((ROOT / "uv.lock").read_text())["package"]
    pins = {package["name"]: package["version"] for package in lock}
    for name, (needed, pinned) in nb["LIBRARIES"].items():
        assert (needed, pinned) == (ranges[name], pins[name]), name
        assert nb["in_range"](pinned, needed), name
    assert nb["in_range"]("2.11.0+cu130", ">=2.9,<2.12") and not nb["in_range"]("2.12", "<2.12")


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


def test_installing_asks_for_a_restart_only_when_a_changed_library_was_imported(nb, monkeypatch):
    """INSTALL_LIBRARIES on a hosted runtime: the %pip line runs (faked here: no download); a
    library it changed that this process had imported already means a restart, in one line."""
    asked = []
    monkeypatch.setitem(
        nb, "get_ipython", lambda: SimpleNamespace(run_line_magic=lambda *a: asked.append(a))
    )
    versions = iter(
        [[("trl", "0.9.6"), ("xxhash", "4.1.0")], [("trl", "1.16.0"), ("xxhash", "4.1.0")]]
    )
    monkeypatch.setattr(
        importlib.metadata,
        "distributions",
        lambda: [SimpleNamespace(name=n, version=v) for n, v in next(versions)],
    )
    monkeypatch.setattr(importlib.metadata, "packages_distributions", lambda: {"trl": ["trl"]})
    problems = [("trl", "0.9.6", ">=1.0,<2")]
    monkeypatch.delitem(sys.modules, "trl", raising=False)
    nb["install_libraries"](problems)  # trl not imported yet: the run goes on
    assert asked == [
        ("pip", f"install -q trl==1.16.0 torch=={importlib.metadata.version('torch')}")
    ]
    versions = iter([[("trl", "0.9.6")], [("trl", "1.16.0")]])
    monkeypatch.setitem(sys.modules, "trl", SimpleNamespace())
    with pytest.raises(nb["UserError"], match="had already imported trl: restart it"):
        nb["install_libraries"](problems)


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
