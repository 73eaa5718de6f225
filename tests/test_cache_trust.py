"""A cache you can trust: derived code keys, concurrent runs, corrupted files, published stages."""

import json
import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import xxhash
from conftest import manifest, run_live, run_notebook, stage_dir, statuses


def edit_function(function: str, statement: str = "_edited = True"):
    """An edit of the notebook: `function` (or method) gains one statement, its behaviour unchanged."""
    pattern = re.compile(rf"^( *)(def {function}\(.*?\).*?:\n)", re.M | re.S)

    def edit(source: str) -> str:
        return pattern.sub(rf"\1\2\1    {statement}\n", source, count=1)

    return edit


def edits(*functions: str, replace: tuple = ()):
    def edit(source: str) -> str:
        for function in functions:
            source = edit_function(function)(source)
        for old, new in replace:
            source = source.replace(old, new)
        return source

    return edit


def test_code_keys_follow_helpers_transitively(live_kernel, warm_copy):
    # roman_to_int <- repair_numerals <- REPAIRS <- clean_paragraphs <- build_clean_corpus: not
    # listed anywhere by hand, yet editing it rebuilds the stage (identical output: nothing else)
    result = run_live(live_kernel, warm_copy, "sft_model", edit=edits("roman_to_int"))
    assert statuses(result)["clean_corpus"] == "built"
    assert "code of roman_to_int changed" in result["stages"]["clean_corpus"][1]
    assert {s for s, v in statuses(result).items() if v == "built"} == {"clean_corpus"}


def test_code_that_only_records_or_shows_never_rebuilds(live_kernel, warm_copy):
    # the MFU peak table, a log-table column, the meters, the figures and the report formatting
    cosmetic = edits(
        "epoch_table", "md_table", "training_figures", "session_totals", "on_log",
        "peak_memory_gib", "write_json_atomic", "sessions",
        replace=[('"T4": 65,', '"T4": 65,\n    "B200": 2250,'),
                 ('"tokens/s", "eval loss"]', '"tokens/s", "eval loss", "memory"]')],
    )  # fmt: skip
    result = run_live(live_kernel, warm_copy, "sft_model", edit=cosmetic)
    assert result["error"] is None, result["error"]
    assert set(statuses(result).values()) == {"cached"}, result["stages"]


def test_editing_the_optimizer_or_the_loss_retrains(live_kernel, warm_copy):
    result = run_live(
        live_kernel, warm_copy, "sft_model", edit=edits("training_arguments", "training_step")
    )
    built = {s for s, v in statuses(result).items() if v == "built"}
    assert built == {"pretrain", "sft_model"}, result["stages"]
    assert "code of training_arguments changed" in result["stages"]["pretrain"][1]
    assert "MeteredSFTTrainer" in result["stages"]["sft_model"][1]


def test_two_concurrent_runs_share_each_build(cold_run, tmp_path):
    workdir, _ = cold_run
    shutil.copytree(workdir / "data", tmp_path / "data")

    def run(name):  # up to pretraining: two runs that need the same stages at the same time
        return run_notebook(tmp_path, name, until="pretrain")

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


def test_corrupted_or_truncated_files_are_rebuilt_with_the_reason(live_kernel, warm_copy):
    cache = warm_copy / "cache"
    arrow = next((stage_dir(cache, "dataset") / "dataset" / "train").glob("*.arrow"))
    flip_byte(arrow, arrow.stat().st_size // 2)
    flip_byte(stage_dir(cache, "tokenizer") / "hf" / "tokenizer.json", 200)
    (stage_dir(cache, "clean_corpus") / "paragraphs.parquet").write_bytes(b"truncated")
    result = run_live(live_kernel, warm_copy, "pretrain")
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


def test_published_stages_are_never_written_again(live_kernel, warm_copy):
    cache = warm_copy / "cache"
    upstream = ("clean_corpus", "tokenizer", "dataset", "sft_data", "base_answers")
    before = {s: folder_digests(stage_dir(cache, s)) for s in upstream}
    sft_key = manifest(cache, "sft_model")["key"]
    result = run_live(live_kernel, warm_copy, FORCE=["pretrain", "sft_model"])
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
