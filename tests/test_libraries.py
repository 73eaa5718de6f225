"""The library check, on Colab, Kaggle or a plain Python: one line that says which libraries are
missing or out of range and the `%pip` line that installs them, before any of them is imported."""

import importlib.metadata
import json
import subprocess
import sys
import tomllib
from types import SimpleNamespace

import pytest
from conftest import ROOT, code_cells, definitions

pytestmark = pytest.mark.fast  # definition cells only: `uv run pytest -m fast`


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


# A plain Python (not the project's .venv) where the libraries can neither be imported nor found:
# the notebook's cells run in order, as a kernel would, up to the library check. A cell before it
# that imported one (torch, say) would stop on ModuleNotFoundError instead of the one line.
PLAIN_PYTHON = """
import importlib.abc, importlib.metadata, json, sys
BLOCKED, CELLS = json.loads(sys.argv[1]), json.load(sys.stdin)


class Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)


def version(name, _real=importlib.metadata.version):
    if name in BLOCKED:
        raise importlib.metadata.PackageNotFoundError(name)
    return _real(name)


sys.meta_path.insert(0, Blocked())
importlib.metadata.version, sys.prefix = version, "/usr/local"
namespace = {"__name__": "__main__"}
for cell in CELLS:
    try:
        exec(compile(cell, cell.splitlines()[0], "exec"), namespace)
    except Exception as err:
        print(f"{type(err).__name__}: {err}")
        break
"""


def test_a_plain_python_without_torch_or_anything_gets_the_one_line(nb):
    """A plain Python with papermill and ipykernel only: no torch, no library at all."""
    blocked = [name for name in nb["LIBRARIES"] if name not in ("papermill", "ipykernel")]
    sources = list(code_cells())
    check = next(i for i, source in enumerate(sources) if source.startswith(SET_UP))
    ran = subprocess.run(
        [sys.executable, "-c", PLAIN_PYTHON, json.dumps(blocked)],
        input=json.dumps(sources[: check + 1]),
        capture_output=True,
        text=True,
        timeout=120,
    )
    pins = " ".join(f"{n}=={pinned}" for n, (_, pinned) in nb["LIBRARIES"].items() if n in blocked)
    said = ran.stdout.strip()
    assert said.startswith("UserError: Libraries this notebook needs: torch missing (needs "), said
    assert f"`%pip install -q {pins}`" in said and "\n" not in said, said


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
