"""A cache you can trust: derived code keys, concurrent runs, corrupted files, published stages."""

import json
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import xxhash
from conftest import (
    insert_statement,
    manifest,
    replace,
    run_live,
    run_notebook,
    stage_dir,
    stage_keys,
    statuses,
)

EDITED = "_edited = True"  # one statement more: the function's behaviour is unchanged


def test_code_keys_follow_helpers_transitively(live_kernel, warm_copy):
    # roman_to_int <- repair_numerals <- REPAIRS <- clean_paragraphs <- build_clean_corpus: not
    # listed anywhere by hand, yet editing it rebuilds the stage (identical output: nothing else)
    edit = insert_statement("roman_to_int", EDITED)
    result = run_live(live_kernel, warm_copy, "sft_model", edits=[edit])
    assert statuses(result)["clean_corpus"] == "built"
    assert "code of roman_to_int changed" in result["stages"]["clean_corpus"][1]
    assert {s for s, v in statuses(result).items() if v == "built"} == {"clean_corpus"}


def test_code_that_only_records_or_shows_never_rebuilds(live_kernel, warm_copy):
    # the MFU peak table, a log-table column, the meters, the divergence check, where a stage ran,
    # the figures and the report formatting
    functions = {
        "pretrain_results": 1,
        "md_table": 1,
        "training_results": 1,
        "session_totals": 1,
        "on_log": 5,
        "trained_on": 1,
        "peak_memory_gib": 1,
        "write_json": 1,
        "sessions": 1,
        "plan_line": 1,
    }
    cosmetic = [insert_statement(name, EDITED, times) for name, times in functions.items()]
    cosmetic += [
        replace('"2060": 25.8}', '"2060": 25.8, "B200": 2250}'),
        replace('"tokens/s", "eval loss"]', '"tokens/s", "eval loss", "memory"]'),
    ]
    result = run_live(live_kernel, warm_copy, "sft_model", edits=cosmetic)
    assert result["error"] is None, result["error"]
    assert set(statuses(result).values()) == {"cached"}, result["stages"]


def test_editing_the_optimizer_or_the_loss_retrains(live_kernel, warm_copy):
    edits = [insert_statement(name, EDITED) for name in ("trainer_arguments", "training_step")]
    result = run_live(live_kernel, warm_copy, "sft_model", edits=edits)
    built = {s for s, v in statuses(result).items() if v == "built"}
    assert built == {"pretrain", "sft_model"}, result["stages"]
    assert "code of trainer_arguments changed" in result["stages"]["pretrain"][1]
    assert "MeteredSFTTrainer" in result["stages"]["sft_model"][1]


def test_two_concurrent_runs_share_each_build(live_kernel, cold_run, tmp_path):
    """Ordered by events, not by time: run 1 holds the clean_corpus build until run 2 says it is
    waiting for it, and run 2 starts only once run 1 holds that build."""
    workdir, _ = cold_run
    shutil.copytree(workdir / "data", tmp_path / "data")
    holding, waiting = tmp_path / "run-1-holds-the-lock", tmp_path / "run-2-waits"
    hold = (  # in build_lock, once the lock is held (machinery: the stage keys stay the same)
        f"        if final.parent.name == 'clean_corpus':\n"
        f"            Path({str(holding)!r}).touch()\n"
        f"            while not Path({str(waiting)!r}).exists():\n"
        f"                time.sleep(0.05)\n"
        f"        yield\n"
    )
    edits = [
        replace('"started": started})\n        yield\n', '"started": started})\n' + hold),
        replace(
            "            wait_for_lock(lock, owner, final.parent.name)\n",
            f"            Path({str(waiting)!r}).touch()\n"
            "            wait_for_lock(lock, owner, final.parent.name)\n",
        ),
    ]

    # up to the packed dataset: two runs that need the same stages, in two processes (papermill's
    # kernel, and this worker's live kernel: one kernel start less)
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(run_notebook, tmp_path, "first", until="dataset", edits=edits)
        while not holding.exists():  # run 1 holds the clean_corpus lock (or has failed)
            assert not first.done(), first.result()
            time.sleep(0.05)
        second = run_live(live_kernel, tmp_path, "dataset", edits=edits)
        results = [first.result(), second]
    text = "\n".join(r["text"] for r in results)
    assert "[clean_corpus] waiting: another run is building" in results[1]["text"]
    assert "[clean_corpus] cached" in results[1]["text"] and "built by the other run" in text
    assert "removing stale build" not in text, "a live build was deleted"
    for stage in results[0]["stages"]:
        keys = [stage_keys(r)[stage] for r in results]
        assert keys[0] == keys[1], stage
        assert len(list((tmp_path / "cache" / stage).glob("*/manifest.json"))) == 1, stage
    assert statuses(results[0])["clean_corpus"] == "built"


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
