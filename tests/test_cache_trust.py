"""A cache you can trust: derived code keys, concurrent runs, corrupted files, published stages."""

import json
import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nbformat
import xxhash
from conftest import NOTEBOOK, manifest, run_notebook, stage_dir


def statuses(result) -> dict:
    return {stage: status.split(" ")[0] for stage, (status, _) in result["stages"].items()}


def edited_notebook(folder: Path, function: str) -> Path:
    """A copy of the notebook whose `function` gains one statement (its behaviour is unchanged)."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    pattern = re.compile(rf"^(def {function}\(.*?\).*?:\n)", re.M | re.S)
    cells = [c for c in nb.cells if c.cell_type == "code" and pattern.search(c.source)]
    assert len(cells) == 1, f"def {function} not found once"
    cells[0].source = pattern.sub(r"\1    _edited = True\n", cells[0].source, count=1)
    path = folder / f"edited_{function}.ipynb"
    nbformat.write(nb, path)
    return path


def test_code_keys_follow_helpers_transitively(warm_copy):
    # roman_to_int <- repair_numerals <- REPAIRS <- clean_units <- build_clean_corpus: not listed
    # anywhere by hand, yet editing it rebuilds the stage (identical output: nothing downstream)
    notebook = edited_notebook(warm_copy, "roman_to_int")
    result = run_notebook(warm_copy, "edited-helper", notebook=notebook)
    assert statuses(result)["clean_corpus"] == "built"
    assert "code of roman_to_int changed" in result["stages"]["clean_corpus"][1]
    assert {s for s, v in statuses(result).items() if v == "built"} == {"clean_corpus"}

    notebook = edited_notebook(warm_copy, "epoch_table")  # display only: no stage reaches it
    result = run_notebook(warm_copy, "edited-display", notebook=notebook)
    assert set(statuses(result).values()) == {"cached"}, result["stages"]


def test_two_concurrent_runs_share_each_build(cold_run, tmp_path):
    workdir, _ = cold_run
    shutil.copytree(workdir / "data", tmp_path / "data")

    def run(name):
        return run_notebook(tmp_path, name)

    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(run, "first")
        time.sleep(4)  # the second starts while the first is building
        second = pool.submit(run, "second")
        results = [first.result(), second.result()]
    text = "\n".join(r["text"] for r in results)
    assert "waiting: another run is building" in text and "built by the other run" in text
    assert "removing stale build" not in text, "a live build was deleted"
    for stage in results[0]["stages"]:
        keys = [r["stages"][stage][1].split("(")[1][:12] for r in results]
        assert keys[0] == keys[1], stage
        assert len(list((tmp_path / "cache" / stage).glob("*/manifest.json"))) == 1, stage
    assert all(statuses(r)[s] in ("built", "cached") for r in results for s in r["stages"])


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01  # same size: only the content digest can notice
    path.write_bytes(bytes(data))


def test_corrupted_or_truncated_files_are_rebuilt_with_the_reason(warm_copy):
    cache = warm_copy / "cache"
    arrow = next((stage_dir(cache, "dataset") / "dataset" / "train").glob("*.arrow"))
    flip_byte(arrow, arrow.stat().st_size // 2)
    flip_byte(stage_dir(cache, "tokenizer") / "hf" / "tokenizer.json", 200)
    (stage_dir(cache, "clean_corpus") / "paragraphs.parquet").write_bytes(b"truncated")
    result = run_notebook(warm_copy, "corrupted")
    assert statuses(result)["clean_corpus"] == "built"
    assert "output file paragraphs.parquet changed" in result["stages"]["clean_corpus"][1]
    assert statuses(result)["tokenizer"] == "built"
    assert (
        "output file hf/tokenizer.json changed since it was built"
        in (result["stages"]["tokenizer"][1])
    )
    assert statuses(result)["dataset"] == "built"
    assert f"output file dataset/train/{arrow.name} changed" in result["stages"]["dataset"][1]
    assert statuses(result)["pretrain"] == "cached", "identical rebuilds must not retrain"


def folder_digests(cache: Path) -> dict:
    return {
        p.relative_to(cache).as_posix(): xxhash.xxh3_64_hexdigest(p.read_bytes())
        for p in sorted(cache.rglob("*"))
        if p.is_file()
    }


def test_published_stages_are_never_written_again(warm_copy):
    cache = warm_copy / "cache"
    upstream = ("clean_corpus", "tokenizer", "dataset", "sft_data", "base_answers")
    before = {s: folder_digests(stage_dir(cache, s)) for s in upstream}
    sft_key = manifest(cache, "sft_model")["key"]
    result = run_notebook(warm_copy, "rebuild-downstream", FORCE=["pretrain", "sft_model"])
    assert statuses(result)["pretrain"] == statuses(result)["sft_model"] == "built"
    for stage in upstream:
        folder = stage_dir(cache, stage)
        assert folder_digests(folder) == before[stage], f"{stage} was written"
        listed = set(json.loads((folder / "manifest.json").read_text())["files"])
        assert set(before[stage]) - {"manifest.json"} == listed, f"files added to {stage}"
    # the rebuilt stage holds exactly the files its manifest lists
    folder = stage_dir(cache, "sft_model")
    listed = set(json.loads((folder / "manifest.json").read_text())["files"])
    assert set(folder_digests(folder)) - {"manifest.json"} == listed
    assert manifest(cache, "sft_model")["key"] == sft_key
