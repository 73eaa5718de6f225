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
    stage_keys,
    statuses,
)


@pytest.fixture(scope="module")
def nb():
    return definitions(
        "# Libraries: the versions",
        "# Libraries: a hosted",
        "# Libraries: each one",
        "# Libraries: what to do",
    )


def faked(versions: dict, real=importlib.metadata.version):
    """importlib.metadata.version as a host with these versions answers (None: not installed)."""

    def version_of(name: str) -> str:
        if versions.get(name, real(name)) is None:
            raise importlib.metadata.PackageNotFoundError(name)
        return versions.get(name, real(name))

    return version_of


def test_the_project_environment_passes_and_a_hosted_one_gets_one_line_with_the_fix(
    nb, monkeypatch
):
    assert nb["library_problems"]() == [], "the uv environment itself is out of range"
    assert nb["in_project_environment"]()
    monkeypatch.setitem(nb, "in_project_environment", lambda: False)  # Colab's or Kaggle's Python
    host = {"trl": None, "torch": "2.9.1+cu126"}  # trl missing; a CUDA torch in range
    missing = faked(host)
    message = nb["library_error"](nb["library_problems"](missing), missing)
    assert message.startswith("Libraries this notebook needs: trl missing (needs >=1.0,<2). Run ")
    assert "`%pip install -q trl==1.16.0 torch==2.9.1+cu126`" in message, "torch is not kept"
    assert "Runtime → Restart session" in message and "\n" not in message
    old = faked(host | {"trl": "1.16.0", "transformers": "4.57.3"})
    message = nb["library_error"](nb["library_problems"](old), old)
    assert "transformers 4.57.3 (needs >=5.0,<6)" in message
    assert "`%pip install -q transformers==5.24.0 torch==2.9.1+cu126`" in message
    older = faked({"torch": "2.8.0+cu126"})  # below the floor: the lock's torch, then
    assert "`%pip install -q torch==2.10.0`" in nb["library_error"](nb["library_problems"](older))


def test_a_hosts_newer_torch_is_kept_with_one_line_and_left_out_of_the_pip_line(
    nb, monkeypatch, capsys
):
    newer = faked({"torch": "2.13.0+cu130", "trl": None})
    monkeypatch.setitem(nb, "in_project_environment", lambda: False)  # Colab's or Kaggle's Python
    assert nb["library_problems"](newer) == [("trl", None, ">=1.0,<2")], "torch 2.13 not kept"
    message = nb["library_error"](nb["library_problems"](newer), newer)
    assert "`%pip install -q trl==1.16.0`" in message, message  # torch left out: kept as it is
    monkeypatch.setattr(importlib.metadata, "version", faked({"torch": "2.13.0+cu130"}))
    (check,) = [s for s in code_cells() if s.startswith("# Libraries: checked before")]
    exec(check, nb)  # the Set-up cell itself: passes, with one line
    assert capsys.readouterr().out == (
        "torch 2.13.0+cu130 is newer than this notebook was tested with (2.10–2.11); keeping it\n"
    )
    # the project's own environment keeps uv.lock's torch: `uv sync`
    monkeypatch.setitem(nb, "in_project_environment", lambda: True)
    assert [name for name, *_ in nb["library_problems"](newer)] == ["torch", "trl"]


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
