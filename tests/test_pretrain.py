"""The pretraining stage: end to end, resume after a killed kernel, and exported artifacts."""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from conftest import (
    assert_resumed_like,
    build_tiny_qwen,
    replace,
    run_live,
    run_notebook,
    stage_dir,
)
from nbclient.exceptions import DeadKernelError
from papermill.exceptions import PapermillExecutionError

PROMPTS = [
    "Все мысли, которые имеют огромные последствия",
    "Сила войска зависит от его духа",
    "Мысль о том, что он принес страдания",
    "Человек сознает себя свободным",
    "Что бы ни случилось, я всегда буду",
    "Любовь мешает смерти",
    "Нет, жизнь не кончена",
    "Всякая мысль, даже самая простая",
    "Война не любезность, а самое гадкое дело",
    "Чтобы жить честно",
]


def evals(folder):
    log = json.loads((folder / "log_history.json").read_text())
    return [(e["step"], e["eval_loss"]) for e in log if "eval_loss" in e]


def test_pretrain_learns_and_generates_every_epoch(cold_run):
    workdir, result = cold_run
    folder = stage_dir(workdir / "cache", "pretrain")
    losses = evals(folder)
    assert losses[0][0] == 0, "the untrained baseline is not logged"
    assert losses[-1][1] < losses[0][1] - 1.0, losses
    generations = json.loads((folder / "generations.json").read_text())
    for epoch in (1, 2):  # the smoke profile trains 2 epochs
        assert [g["prompt"] for g in generations if g["epoch"] == epoch] == PROMPTS
    assert all(g["text"].startswith(g["prompt"]) for g in generations)
    assert not (folder / "checkpoints").exists(), "checkpoints left in the published stage"
    raw = json.loads((folder / "metrics.json").read_text())  # the build's raw facts only
    assert "tokens_per_second" not in raw and "mfu" not in raw, "a derived figure in the stage"
    metrics = json.loads((workdir / "artifacts" / "pretrain" / "metrics.json").read_text())
    assert metrics["tokens_per_second"] > 0 and metrics["mfu"] is None  # CPU
    assert "val bpc" in result["text"] and "MFU n/a (CPU)" in result["text"]


def test_exported_model_loads_with_auto_classes_and_reproduces(cold_run):
    workdir, _ = cold_run
    artifacts = workdir / "artifacts" / "pretrain"
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "training_args.json",
        "metrics.json",
        "generations.json",
        "loss_curve.png",
        "generation_config.json",
    ):
        assert (artifacts / name).exists(), name
    transformers.logging.set_verbosity_warning()
    model = transformers.AutoModelForCausalLM.from_pretrained(artifacts)
    tokenizer = transformers.AutoTokenizer.from_pretrained(artifacts)
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    metrics = json.loads((artifacts / "metrics.json").read_text())
    best_epoch = round(metrics["best"]["epoch"])
    expected = [
        g["text"]
        for g in json.loads((artifacts / "generations.json").read_text())
        if g["epoch"] == best_epoch
    ]
    with torch.no_grad():
        inputs = tokenizer(PROMPTS[0], return_tensors="pt")
        text = tokenizer.decode(model.generate(**inputs)[0], skip_special_tokens=True)
    assert text == expected[0]


def steps_per_epoch(cache, stage: str = "pretrain") -> int:
    log = json.loads((stage_dir(cache, stage) / "log_history.json").read_text())
    return next(e["step"] for e in log if "eval_loss" in e and e["epoch"] == 1.0)


def test_a_killed_kernel_resumes_pretraining_exactly(live_kernel, cold_run, tmp_path):
    """The kernel killed right after the checkpoint taken after epoch 1's evaluation (mid-epoch:
    test_pause); another kernel resumes it, to the uninterrupted run's evaluations, generations and
    weights. (SFT resumes the same way: test_pause and test_stops resume it after a stop, and
    test_publish kills it at every step after its last one.)"""
    workdir, _ = cold_run
    shutil.copytree(workdir / "data", tmp_path / "data")
    shutil.copytree(
        workdir / "cache",
        tmp_path / "cache",
        ignore=lambda d, names: ["pretrain", "sft_model"] if d.endswith("cache") else [],
    )
    stop = steps_per_epoch(workdir / "cache", "pretrain")
    with pytest.raises((DeadKernelError, PapermillExecutionError)):  # the kernel dies after it
        run_notebook(tmp_path, "killed", until="pretrain",
                     faults={"kill_after_checkpoint": {"pretrain": stop}})  # fmt: skip
    partial = next((tmp_path / "cache" / "pretrain").glob("*.partial"))
    assert (partial / "checkpoints" / f"checkpoint-{stop}").is_dir()
    assert not list((tmp_path / "cache" / "pretrain").glob("*/manifest.json"))

    resumed = run_live(live_kernel, tmp_path, "pretrain")  # any kernel resumes it
    assert resumed["error"] is None, resumed["error"]
    assert "resuming an interrupted build" in resumed["stages"]["pretrain"][1]
    assert f"resuming from checkpoint-{stop}" in resumed["text"]
    assert "missing keys" not in resumed["text"], "tied weights reported as missing"
    # the same evaluations, generations and weights as the uninterrupted run
    assert_resumed_like(tmp_path / "cache", workdir / "cache", "pretrain", stop)
    ours, theirs = (stage_dir(c, "pretrain") for c in (tmp_path / "cache", workdir / "cache"))
    assert json.loads((ours / "generations.json").read_text()) == json.loads(
        (theirs / "generations.json").read_text()
    )
    sessions = json.loads((ours / "sessions.json").read_text())
    assert len(sessions) == 2 and all(s["wall_seconds"] > 0 for s in sessions), sessions


def test_a_cpu_plan_predicts_the_smoke_runs_peak_memory_and_time(cold_run):
    """On a CPU each training stage's plan predicts the process's peak memory (what it holds as
    it plans, plus the memory model) and its time (this CPU's matmul rate, measured as it plans):
    the cold run's within 25% and a factor of two of what it measured (ru_maxrss, the clock)."""
    workdir, _ = cold_run
    for stage, export in (("pretrain", "pretrain"), ("sft_model", "sft")):
        facts = json.loads((workdir / "artifacts" / export / "metrics.json").read_text())
        predicted = facts["predicted"]
        peak = predicted["predicted_peak_gib"] / facts["peak_memory_gib"]
        seconds = predicted["expected_seconds"] / (facts["train_seconds"] + facts["eval_seconds"])
        assert 0.75 <= peak <= 1.25, (stage, predicted, facts["peak_memory_gib"])
        assert 0.5 <= seconds <= 2, (
            stage,
            predicted,
            facts["train_seconds"],
            facts["eval_seconds"],
        )


# Issue #44: a CPU's memory model, on models whose training needs far more than the rounding and
# the interpreter: pretraining dominated by its activations (AdamW, 32 rows of 512 tokens, no
# checkpointing), SFT by Adafactor's temporaries (a 2-layer Qwen2 with Qwen2.5's 151,936-row tied
# embedding, the largest parameter). What a stage measures is its peak RSS from the training's
# start (VmHWM, reset there), less what the kernel held as it planned.
WIDE_QWEN = {"vocab": 151_936, "hidden": 256}
MEMORY_RUN = {
    "MODEL_HIDDEN": 256, "MODEL_INTERMEDIATE": 688, "MODEL_LAYERS": 4, "MODEL_HEADS": 4,
    "MODEL_KV_HEADS": 2, "CONTEXT_LENGTH": 512, "EFFECTIVE_BATCH": 32, "MICRO_BATCH": 32,
    "OPTIMIZER": "adamw", "EPOCHS": 1, "MAX_STEPS": 1, "VAL_BLOCKS": 4, "GEN_MAX_NEW_TOKENS": 2,
    "SFT_OPTIMIZER": "adafactor", "SFT_MAX_STEPS": 1, "SFT_EPOCHS": 1, "SFT_EVAL_ROWS": 8,
    "SFT_MAX_NEW_TOKENS": 2,
}  # fmt: skip


# what the kernel held as each training planned, said by the stage's cell (test hook: an edit)
SAY_HELD = [
    replace(f"{plan} = {plan}_for(CFG, {card})", f"{plan} = {plan}_for(CFG, {card}); "
            f"print('held as {stage} planned:', {plan}.held_gib)")
    for plan, card, stage in (("pretrain_plan", "pretrain_card", "pretrain"),
                              ("sft_plan", "sft_card", "sft_model"))
]  # fmt: skip


def training_memory(result: dict, cache: Path, stage: str) -> tuple[float, float]:
    """(predicted, measured) GiB of a training alone: its peak less what the kernel held."""
    facts = json.loads((stage_dir(cache, stage) / "metrics.json").read_text())
    held = float(re.search(rf"held as {stage} planned: ([\d.]+)", result["text"])[1])
    return facts["predicted"]["predicted_peak_gib"] - held, facts["peak_memory_gib"] - held


def test_a_cpu_plan_predicts_a_training_that_needs_gibibytes(cold_run, tmp_path):
    workdir, _ = cold_run
    shutil.copytree(workdir / "data", tmp_path / "data")
    base = build_tiny_qwen(tmp_path / "wide-qwen", **WIDE_QWEN)
    result = run_notebook(tmp_path, "memory", until="sft_model", edits=SAY_HELD,
                          SFT_BASE_MODEL=str(base), **MEMORY_RUN)  # fmt: skip
    for stage in ("pretrain", "sft_model"):
        predicted, measured = training_memory(result, tmp_path / "cache", stage)
        # (SFT measured 0.93-1.23 of its prediction over five runs: its peak moves by a tensor the
        # size of the embedding; halving the activation or the optimizer term gives 1.6-1.9)
        ratio = measured / predicted
        assert predicted > 0.5 and 0.75 <= ratio <= 1.3, (stage, predicted, measured)
