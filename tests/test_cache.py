"""Stage-cache behaviour: what rebuilds, why, and what is never treated as complete."""

import json

import conftest
from conftest import build_of, manifest, one_line_error, run_live, stage_dir, write_corpus

PRETRAIN_SIDE = ("clean_corpus", "tokenizer", "dataset", "pretrain")


def statuses(result) -> dict:
    """Cached/built per pretraining-side stage (the runs stop after pretraining)."""
    found = conftest.statuses(result)
    return {s: found[s] for s in PRETRAIN_SIDE if s in found}


def test_config_change_rebuilds_that_stage_and_downstream_only(live_kernel, warm_copy):
    result = run_live(live_kernel, warm_copy, "dataset", VOCAB_SIZE=350)
    assert statuses(result) == {"clean_corpus": "cached", "tokenizer": "built", "dataset": "built"}
    assert "config VOCAB_SIZE: 400 -> 350" in result["stages"]["tokenizer"][1]
    assert "upstream output of tokenizer changed" in result["stages"]["dataset"][1]

    # a knob set like papermill's -p wins over the smoke profile's 2 epochs (it used to lose)
    result = run_live(live_kernel, warm_copy, "pretrain", EPOCHS=1, VAL_FRACTION=0.1)
    assert statuses(result) == {
        "clean_corpus": "cached",
        "tokenizer": "cached",
        "dataset": "built",
        "pretrain": "built",
    }
    assert "config VAL_FRACTION: 0.05 -> 0.1" in result["stages"]["dataset"][1]
    assert "config EPOCHS: 2 -> 1" in result["stages"]["pretrain"][1]
    log = json.loads(
        (build_of(warm_copy / "cache", "pretrain", result) / "log_history.json").read_text()
    )
    assert max(e["epoch"] for e in log) == 1.0, "trained more epochs than set"


def test_editing_a_corpus_file_changes_the_key(live_kernel, warm_copy):
    before = manifest(warm_copy / "cache", "clean_corpus")["key"]
    corpus_file = warm_copy / "data" / "corpus" / "more" / "author_c.txt"
    corpus_file.write_text(
        corpus_file.read_text(encoding="utf-8") + "\nНовый абзац в конце файла.\n", encoding="utf-8"
    )
    result = run_live(live_kernel, warm_copy, "dataset")
    status, why = result["stages"]["clean_corpus"]
    assert status.startswith("built") and "input files more/author_c.txt changed" in why
    keys = {p.parent.name for p in (warm_copy / "cache" / "clean_corpus").glob("*/manifest.json")}
    assert before in keys and len(keys) == 2, "the edit did not produce a new key"
    assert statuses(result)["dataset"] == "built"


def test_force_rebuilds_exactly_one_stage(live_kernel, warm_copy):
    old = manifest(warm_copy / "cache", "tokenizer")
    result = run_live(live_kernel, warm_copy, "pretrain", FORCE=["tokenizer"])
    assert statuses(result) == {
        "clean_corpus": "cached",
        "tokenizer": "built",
        "dataset": "cached",
        "pretrain": "cached",
    }
    assert "forced by FORCE" in result["stages"]["tokenizer"][1]
    new = manifest(warm_copy / "cache", "tokenizer")
    assert new["created_at"] != old["created_at"]
    assert new["output_digest"] == old["output_digest"], "tokenizer training is not deterministic"


def test_tmp_dirs_and_missing_manifests_are_never_loaded(live_kernel, warm_copy):
    cache = warm_copy / "cache"
    dataset_dir = stage_dir(cache, "dataset")
    (dataset_dir / "manifest.json").unlink()  # as if the kernel died right before the manifest
    stale = cache / "tokenizer" / f"{stage_dir(cache, 'tokenizer').name}.tmp-deadbeef"
    stale.mkdir()
    (stale / "tokenizer.json").write_text("{half written")
    result = run_live(live_kernel, warm_copy, "pretrain")
    assert not stale.exists(), "stale .tmp dir was not removed"
    assert statuses(result) == {
        "clean_corpus": "cached",
        "tokenizer": "cached",
        "dataset": "built",
        "pretrain": "cached",
    }, "a rebuilt dataset with identical bytes must not retrain the model"
    assert "incomplete" in result["stages"]["dataset"][1]
    assert (dataset_dir / "manifest.json").exists()


def test_empty_corpus_dir_gives_a_clear_error(live_kernel, tmp_path):
    (tmp_path / "data" / "corpus").mkdir(parents=True)
    result = run_live(live_kernel, tmp_path, "clean_corpus")
    assert f"No *.txt files under {tmp_path / 'data' / 'corpus'}" in one_line_error(result)


def test_non_utf8_file_gives_an_error_naming_it(live_kernel, tmp_path):
    corpus = write_corpus(tmp_path / "data" / "corpus")
    (corpus / "cp1251.txt").write_bytes("Привет, мир".encode("cp1251"))
    result = run_live(live_kernel, tmp_path, "clean_corpus")
    assert f"{corpus / 'cp1251.txt'}: not valid UTF-8" in one_line_error(result)
    assert not list((tmp_path / "cache").glob("*/*/manifest.json")), "something was marked complete"


def test_unwritable_cache_folder_is_a_clear_error(live_kernel, tmp_path):
    write_corpus(tmp_path / "data" / "corpus")
    blocker = tmp_path / "read-only"
    blocker.write_text("a file where the cache folder should be")  # (root ignores chmod)
    result = run_live(live_kernel, tmp_path, "clean_corpus", CACHE_DIR=str(blocker / "cache"))
    message = one_line_error(result)
    assert f"cannot write to {blocker / 'cache'}" in message and "CACHE_DIR" in message
