"""What a person sees: the report card, exported models that answer as the notebook did, and any
ChatML base model checked before anything long runs."""

import json
import shutil

import nbformat
import torch
import transformers
from conftest import build_of, one_line_error, run_live
from test_layout import folded_code

SECTIONS = ["## Stages", "## Corpus and dataset", "## Pretraining", "## SFT", "## Questions"]


def test_report_has_every_section_and_the_full_answers(cold_run):
    workdir, result = cold_run
    report = (workdir / "artifacts" / "report.md").read_text(encoding="utf-8")
    for section in [*SECTIONS, "## Environment"]:
        assert section in report, section
    for stage in ("clean_corpus", "tokenizer", "dataset", "pretrain", "sft_model"):
        assert f"| {stage} | built |" in report, stage
    answers = json.loads((workdir / "artifacts" / "sft" / "answers.json").read_text())
    for answer in answers["base"] + answers["sft"]:
        for line in answer["answer"].strip().splitlines():  # in full, line by line
            assert line.replace("|", "&#124;").replace("<", "&lt;").replace(">", "&gt;") in report
    assert "val perplexity" in result["text"] and "after SFT" in result["text"]
    assert (workdir / "artifacts" / "sft" / "loss_curve.png").stat().st_size > 1000


def test_exported_models_reproduce_the_notebook_without_flags(cold_run):
    workdir, _ = cold_run
    transformers.logging.set_verbosity_error()
    pretrain, sft = workdir / "artifacts" / "pretrain", workdir / "artifacts" / "sft"
    generations = json.loads((pretrain / "generations.json").read_text())
    best = round(json.loads((pretrain / "metrics.json").read_text())["best"]["epoch"])
    expected = [g for g in generations if g["epoch"] == best][:3]
    generate = transformers.pipeline("text-generation", model=str(pretrain), device="cpu")
    for g in expected:
        assert generate(g["prompt"])[0]["generated_text"] == g["text"]

    answers = json.loads((sft / "answers.json").read_text())["sft"]
    chat = transformers.pipeline("text-generation", model=str(sft), device="cpu")
    tokenizer, model = chat.tokenizer, chat.model
    assert tokenizer.padding_side == "left", "the saved tokenizer must pad on the left"
    for answer in answers:
        messages = [
            {"role": "system", "content": ""},
            {"role": "user", "content": answer["question"]},
        ]
        assert chat(messages)[0]["generated_text"][-1]["content"] == answer["answer"]
        inputs = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        with torch.no_grad():
            output = model.generate(**inputs)[0, inputs["input_ids"].shape[1] :]
        assert tokenizer.decode(output, skip_special_tokens=True) == answer["answer"]


SMOLLM2_TEMPLATE = (  # SmolLM2-Instruct's ChatML template: TRL has no training version of it
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def model_with_template(tiny_qwen, folder, template):
    shutil.copytree(tiny_qwen, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "chat_template.jinja").write_text(template)
    return folder


def test_a_non_qwen_chatml_model_trains_assistant_only(live_kernel, warm_copy, tiny_qwen):
    model = model_with_template(tiny_qwen, warm_copy / "smollm-like", SMOLLM2_TEMPLATE)
    result = run_live(live_kernel, warm_copy, SFT_BASE_MODEL=str(model), SFT_MAX_STEPS=2)
    assert result["error"] is None, result["error"]

    def built(stage):  # this run's build (the fixture's Qwen build is there too)
        return build_of(warm_copy / "cache", stage, result)

    stats = json.loads((built("sft_data") / "stats.json").read_text())
    assert stats["chat template for training"].startswith("ChatML with generation markers added")
    assert "chat template changed" in result["stages"]["sft_data"][1]
    example = json.loads((built("sft_model") / "label_example.json").read_text())
    tokenizer = transformers.AutoTokenizer.from_pretrained(model)
    trained = [t for t, label in zip(*example.values(), strict=True) if label != -100]
    assert tokenizer.decode(trained).endswith("<|im_end|>")
    assert "<|im_start|>" not in tokenizer.decode(trained), "a prompt token carries a label"
    saved = transformers.AutoTokenizer.from_pretrained(warm_copy / "artifacts" / "sft")
    assert saved.chat_template == SMOLLM2_TEMPLATE, "the exported model must keep its template"


def test_an_untrainable_template_stops_in_sft_data(live_kernel, warm_copy, tiny_qwen):
    template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    model = model_with_template(tiny_qwen, warm_copy / "plain", template)
    builds = {p for p in (warm_copy / "cache").glob("*/*") if p.is_dir()}
    result = run_live(live_kernel, warm_copy, "sft_model", SFT_BASE_MODEL=str(model))
    assert "cannot be trained assistant-only" in one_line_error(result)
    # stopped in sft_data: no base answers, no training, nothing half-built left behind
    assert {p for p in (warm_copy / "cache").glob("*/*") if p.is_dir()} == builds


def test_no_folded_cell_printed_anything_in_the_cold_run(cold_run):
    """A folded cell's output or error would be hidden from the reader (test_layout: they only
    define)."""
    workdir, _ = cold_run
    executed = folded_code(nbformat.read(workdir / "cold.ipynb", as_version=4).cells)
    assert len(executed) > 100, len(executed)
    assert [c.source.splitlines()[0] for c in executed if c.outputs] == []
