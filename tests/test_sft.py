"""The SFT stages on a tiny local Qwen2 (no Hub): data mapping, loss mask, stop token, training."""

import json
import shutil

import datasets
import torch
import transformers
from conftest import (
    SFT_PAIRS,
    build_of,
    one_line_error,
    run_live,
    stage_dir,
    stage_keys,
    statuses,
    write_sft_parquet,
)


def test_sft_data_maps_roles_and_always_has_a_system_message(cold_run):
    workdir, _ = cold_run
    folder = stage_dir(workdir / "cache", "sft_data")
    data = datasets.load_from_disk(str(folder / "dataset"))
    rows = list(data["train"]["messages"]) + list(data["eval"]["messages"])
    assert len(rows) == 4 * len(SFT_PAIRS), "valid rows lost or invalid rows kept"
    expected = {(i, x or "", o) for i, x, o in SFT_PAIRS}
    for messages in rows:
        assert [m["role"] for m in messages] == ["system", "user", "assistant"]
        triple = (messages[1]["content"], messages[0]["content"], messages[2]["content"])
        assert triple in expected, triple
    assert sum(m[0]["content"] == "" for m in rows) == 4 * sum(not x for _, x, _ in SFT_PAIRS)
    stats = json.loads((folder / "stats.json").read_text())
    assert stats["dropped: null or blank instruction/output"] == 2
    assert stats["dropped: longer than 96 tokens"] == 1


def test_only_assistant_tokens_and_closing_im_end_are_trained(cold_run, tiny_qwen):
    workdir, _ = cold_run
    folder = stage_dir(workdir / "cache", "sft_model")
    example = json.loads((folder / "label_example.json").read_text())
    first = datasets.load_from_disk(str(stage_dir(workdir / "cache", "sft_data") / "dataset"))
    answer = first["train"][0]["messages"][2]["content"]
    tok = transformers.AutoTokenizer.from_pretrained(tiny_qwen)
    ids, labels = example["input_ids"], example["labels"]
    start = labels.index(next(label for label in labels if label != -100))
    assert all(label == -100 for label in labels[:start]), "a prompt token carries a label"
    assert all(label == -100 or label == tid for label, tid in zip(labels, ids, strict=True))
    trained = [t for t, label in zip(ids, labels, strict=True) if label != -100]
    assert tok.decode(trained) == "\n" + answer + "<|im_end|>\n"
    assert tok.decode(ids[:start]).endswith("<|im_start|>assistant")


def test_sft_model_learns_and_stops_at_im_end(cold_run):
    workdir, result = cold_run
    log = json.loads((stage_dir(workdir / "cache", "sft_model") / "log_history.json").read_text())
    losses = [e["eval_loss"] for e in log if "eval_loss" in e]
    assert losses[0] > losses[-1] + 1.0, losses

    artifacts = workdir / "artifacts" / "sft"
    tok = transformers.AutoTokenizer.from_pretrained(artifacts)
    model = transformers.AutoModelForCausalLM.from_pretrained(artifacts)
    im_end, endoftext = tok.convert_tokens_to_ids("<|im_end|>"), tok.pad_token_id
    assert (
        tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>" and im_end != endoftext
    )
    assert model.config.eos_token_id == im_end
    assert model.generation_config.eos_token_id == [im_end, endoftext]  # stop at either
    assert model.generation_config.pad_token_id == endoftext
    messages = [
        {"role": "system", "content": ""},
        {"role": "user", "content": "Какого цвета небо?"},
    ]
    inputs = tok.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=40, do_sample=False)
    assert out[0, -1].item() == im_end, tok.decode(out[0])

    answers = json.loads((artifacts / "answers.json").read_text())
    assert [a["question"] for a in answers["base"]] == [a["question"] for a in answers["sft"]]
    assert len(answers["sft"]) == 4 and "after SFT" in result["text"]


def test_missing_column_is_a_clear_error(live_kernel, warm_copy):
    bad = warm_copy / "data" / "alpaca-cleaned-ru"
    (bad / "train.parquet").unlink()
    write_sft_parquet(bad, [{"instruction": "Вопрос", "input": None}])
    result = run_live(live_kernel, warm_copy, "sft_data")
    assert f"{bad / 'train.parquet'}: missing column 'output'" in one_line_error(result)


def test_a_file_that_is_not_parquet_is_named(live_kernel, warm_copy):
    bad = warm_copy / "data" / "alpaca-cleaned-ru" / "broken.parquet"
    bad.write_text("instruction,input,output\nВопрос,,Ответ\n")  # a CSV with the wrong name
    result = run_live(live_kernel, warm_copy, "sft_data")
    assert f"{bad}: not a readable parquet file" in one_line_error(result)


def test_no_usable_sft_rows_is_a_clear_error(live_kernel, warm_copy):
    folder = warm_copy / "data" / "alpaca-cleaned-ru"
    (folder / "train.parquet").unlink()
    write_sft_parquet(folder, [{"instruction": "Вопрос", "input": "", "output": " "}] * 3)
    message = one_line_error(run_live(live_kernel, warm_copy, "sft_data"))
    assert f"no usable rows in {folder / 'train.parquet'}: 3 read, 3 dropped" in message
    assert not list((warm_copy / "cache" / "sft_model").glob("*.partial")), "training started"


def test_unreachable_or_missing_model_is_a_clear_error(live_kernel, warm_copy):
    result = run_live(live_kernel, warm_copy, "sft_data", SFT_BASE_MODEL="Qwen/Qwen2.5-0.5B")
    assert "uv run hf download Qwen/Qwen2.5-0.5B" in one_line_error(result)
    empty = warm_copy / "not-a-model"
    empty.mkdir()
    result = run_live(live_kernel, warm_copy, "sft_data", SFT_BASE_MODEL=str(empty))
    assert f"{empty} has no config.json" in one_line_error(result)


def test_sft_trains_with_adafactor_keyed_apart_from_adamw(live_kernel, cold_run, warm_copy):
    """The leaner optimizer (what "auto" picks where AdamW's state cannot fit the card) runs on the
    CPU: a few SFT steps, the Trainer's optim, a key of its own; pretraining keeps AdamW's build."""
    _, cold = cold_run
    result = run_live(live_kernel, warm_copy, "sft_model", SFT_OPTIMIZER="adafactor")
    assert result["error"] is None, result["error"]
    assert statuses(result)["pretrain"] == "cached" and statuses(result)["sft_model"] == "built"
    assert stage_keys(result)["pretrain"] == stage_keys(cold)["pretrain"]  # auto: AdamW here
    assert "; Adafactor; micro-batch" in result["text"], "the plan line does not name it"
    folder = build_of(warm_copy / "cache", "sft_model", result)
    assert json.loads((folder / "training_args.json").read_text())["optim"] == "adafactor"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["parts"]["config"]["optimizer"] == "adafactor"
    assert "Adafactor" in manifest["made_on"]
    losses = [e["eval_loss"] for e in json.loads((folder / "log_history.json").read_text())
              if "eval_loss" in e]  # fmt: skip
    assert losses[-1] < 0.5 * losses[0], losses

    # left at "auto" where the cache holds only that Adafactor build of this recipe (as one trained
    # where AdamW cannot fit): it loads, saying so, rather than train AdamW; its results show
    shutil.rmtree(build_of(warm_copy / "cache", "sft_model", cold))  # the AdamW build
    auto = run_live(live_kernel, warm_copy, "# Stage 7: what SFT reached")  # (up to that cell)
    assert auto["error"] is None, auto["error"]
    assert statuses(auto)["sft_model"] == "cached", auto["stages"]
    assert stage_keys(auto)["sft_model"] == stage_keys(result)["sft_model"]
    assert (
        "made with optimizer 'adafactor': SFT_OPTIMIZER = 'auto' loads it rather than train the "
        "plan's 'adamw' (set SFT_OPTIMIZER = 'adamw' to train that)"
    ) in auto["text"]
    assert "eval loss" in auto["text"], "the results cell did not show the build it loaded"
