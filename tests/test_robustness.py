"""Small, odd and failing runs: a few steps finish with n/a figures, the split keeps its share of
tokens whatever the paragraph sizes, a full disk and missing inputs stop with one line."""

import json
import re
import shutil
from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest
from conftest import definitions, one_line_error, paragraph, run_live, stage_dir, write_corpus

NA = "n/a (too few steps"


@pytest.mark.parametrize("steps", [1, 2])
def test_a_short_training_run_finishes_with_na_figures(live_kernel, warm_copy, steps):
    # the first 2 optimizer steps of a session are not timed: tokens/s, step time and MFU are n/a
    result = run_live(live_kernel, warm_copy, MAX_STEPS=steps, SFT_MAX_STEPS=1)
    assert result["error"] is None, result["error"]
    metrics = json.loads((warm_copy / "artifacts" / "pretrain" / "metrics.json").read_text())
    assert metrics["optimizer_steps"] == steps and metrics["tokens_per_second"] is None
    assert metrics["n/a"]["tokens_per_second"].startswith("too few steps"), metrics["n/a"]
    sft = json.loads((warm_copy / "artifacts" / "sft" / "metrics.json").read_text())
    assert sft["tokens_per_second"] is None and "tokens_per_second" in sft["n/a"]
    report = (warm_copy / "artifacts" / "report.md").read_text(encoding="utf-8")
    assert report.count(NA) >= 3, report  # pretraining tokens/s and MFU, SFT tokens/s
    assert re.search(r"n/a \(too few steps[^)]*\) tokens/s", result["text"]), "the stage shows n/a"


def validation_share(cache) -> float:
    stats = json.loads((stage_dir(cache, "dataset") / "stats.json").read_text())
    split = pq.read_table(stage_dir(cache, "dataset") / "split_paragraphs.parquet").to_pandas()
    share = split.tokens[split.split == "validation"].sum() / split.tokens.sum()
    assert abs(share - stats["validation share of tokens"]) < 1e-3
    return share


def test_the_fixture_corpus_keeps_its_validation_share(cold_run):
    workdir, _ = cold_run
    assert abs(validation_share(workdir / "cache") - 0.05) <= 0.01


def test_one_huge_line_is_cut_before_the_split(live_kernel, tmp_path):
    # one small file beside a file that is a single 300,000-character line (no line breaks)
    corpus = write_corpus(tmp_path / "data" / "corpus")
    for extra in corpus.glob("*.txt"):
        if extra.name != "author_a.txt":
            extra.unlink()
    shutil.rmtree(corpus / "more")
    rng = __import__("random").Random(3)
    (corpus / "huge.txt").write_text(" ".join(paragraph(rng) for _ in range(1400)), "utf-8")
    result = run_live(live_kernel, tmp_path, "dataset")
    assert result["error"] is None, result["error"]
    assert abs(validation_share(tmp_path / "cache") - 0.05) <= 0.01
    stats = json.loads((stage_dir(tmp_path / "cache", "dataset") / "stats.json").read_text())
    assert stats["paragraphs cut before the split (longer than a section)"] == 1
    # evaluation that would outweigh training is cut to a fixed subset, and says so
    result = run_live(live_kernel, tmp_path, "pretrain", VAL_FRACTION=0.5, MAX_STEPS=2)
    assert result["error"] is None, result["error"]
    assert "evaluating a fixed random subset of" in result["text"]


def test_one_paragraph_per_file_keeps_the_share(live_kernel, tmp_path):
    corpus = tmp_path / "data" / "corpus"
    corpus.mkdir(parents=True)
    rng = __import__("random").Random(5)
    for n in range(30):
        (corpus / f"file_{n:02d}.txt").write_text(
            " ".join(paragraph(rng) for _ in range(40)), "utf-8"
        )
    result = run_live(live_kernel, tmp_path, "dataset")
    assert result["error"] is None, result["error"]
    assert abs(validation_share(tmp_path / "cache") - 0.05) <= 0.01


def test_a_full_disk_stops_with_one_line_and_resumes_later(live_kernel, warm_copy):
    shutil.rmtree(warm_copy / "cache" / "pretrain")
    faults = {"disk_full_at_step": 20, "disk_free_gib": 0.0001}  # a checkpoint every step
    result = run_live(live_kernel, warm_copy, "pretrain", faults=faults, SAVE_MINUTES=0)
    message = one_line_error(result)
    partial = next((warm_copy / "cache" / "pretrain").glob("*.partial"))
    assert message.startswith(f"[pretrain] the disk is full: writing to {partial} failed with"), (
        message
    )
    assert (
        "set CACHE_DIR to a bigger disk" in message
        and "resumes from its last checkpoint" in message
    )
    assert "training needs about" in result["text"] and "GiB free" in result["text"]
    # the plan line and the warning point to the builds this run does not use
    assert "; only 0.0 GiB free there: reclaim_disk() under 'Give the disk back'" in result["text"]
    assert "reclaim_disk(delete=True) deletes them, or set CACHE_DIR" in result["text"]
    assert not list((warm_copy / "cache" / "pretrain").glob("*/manifest.json"))
    resumed = run_live(live_kernel, warm_copy, "pretrain")
    assert "resuming from checkpoint-19" in resumed["text"] and resumed["error"] is None


def test_missing_inputs_say_where_they_looked_and_what_is_there(live_kernel, tmp_path):
    corpus = tmp_path / "data" / "corpus"
    corpus.mkdir(parents=True)
    (corpus / "novel.fb2").write_text("<FictionBook/>")
    message = one_line_error(run_live(live_kernel, tmp_path, "clean_corpus"))
    assert message.startswith(
        f"No *.txt files under {corpus}: it holds novel.fb2 (convert it to UTF-8 .txt)"
    )
    assert "set CORPUS_DIR" in message
    missing = tmp_path / "nowhere"
    message = one_line_error(
        run_live(live_kernel, tmp_path, "clean_corpus", CORPUS_DIR=str(missing))
    )
    assert message.startswith(f"No *.txt files under {missing}: it does not exist")


def test_sft_data_in_another_format_is_named(live_kernel, warm_copy):
    folder = warm_copy / "data" / "alpaca-cleaned-ru"
    (folder / "train.parquet").unlink()
    (folder / "train.jsonl").write_text(
        '{"instruction": "Вопрос", "input": "", "output": "Ответ"}\n'
    )
    message = one_line_error(run_live(live_kernel, warm_copy, "sft_data"))
    assert message.startswith(f"No *.parquet files under {folder}: it holds train.jsonl (save it as "
                              "parquet: pd.read_json(path, lines=True).to_parquet(...))")  # fmt: skip
    assert "set SFT_DATA_DIR" in message


def test_a_diverged_training_stops_with_one_line_and_publishes_nothing(live_kernel, warm_copy):
    """A NaN injected into the loss from step 3 on: the log line of step 10 stops the stage."""
    shutil.rmtree(warm_copy / "cache" / "pretrain")
    result = run_live(live_kernel, warm_copy, "pretrain", faults={"nan_loss_at_step": 3})
    message = one_line_error(result)
    partial = next((warm_copy / "cache" / "pretrain").glob("*.partial"))
    assert message.startswith(
        f"[pretrain] training diverged: the training loss is nan at step 10 (fp32; nothing "
        f"published, checkpoints kept in {partial}): try a lower LEARNING_RATE (now 0.003)"
    ), message
    assert not list((warm_copy / "cache" / "pretrain").glob("*/manifest.json"))


def test_fp16_skipping_every_step_of_a_log_interval_is_divergence():
    """The rule alone (a CPU has no fp16 loss scaler): the first step's skip is the scaler's
    calibration; a whole interval skipped is not training at all. An eval loss of inf stops too."""
    nb = definitions("# Training: where an epoch ends", "# Training: a diverged run")
    meter, state = SimpleNamespace(skipped=0), SimpleNamespace(global_step=0)
    args = SimpleNamespace(output_dir="/cache/sft_model/key.partial/checkpoints")
    stop = nb["StopOnDivergence"](
        "sft_model", meter, {"precision": "fp16", "SFT_LEARNING_RATE": 2e-5}
    )
    stop.on_train_begin(args, state, None)
    for step, skipped in ((1, 1), (10, 5), (20, 6)):  # the first step, then 4 of 9, then 1 of 10
        meter.skipped, state.global_step = skipped, step
        stop.on_log(args, state, None, logs={"loss": 2.0})
    meter.skipped, state.global_step = 16, 30
    with pytest.raises(nb["Diverged"]) as caught:
        stop.on_log(args, state, None, logs={"loss": 2.0})
    assert str(caught.value) == (
        "[sft_model] training diverged: fp16's loss scaler skipped all 10 optimizer steps up to "
        "step 30, gradients overflow at any scale (fp16; nothing published, checkpoints kept in "
        "/cache/sft_model/key.partial): try a lower SFT_LEARNING_RATE (now 2e-05), a longer "
        "SFT_WARMUP_RATIO or a smaller SFT_MAX_GRAD_NORM (a changed knob trains anew)"
    )
    with pytest.raises(nb["Diverged"], match="the evaluation loss is inf at step 30"):
        stop.on_log(args, state, None, logs={"eval_loss": float("inf")})
