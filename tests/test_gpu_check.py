"""The prepared GPU check (tests/gpu/run.sh) runs end to end here too, with its --cpu flag."""

import json
import os
import re
import subprocess
import sys

from conftest import ROOT, write_corpus


def test_gpu_check_script_runs_end_to_end_on_cpu(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "WORK": str(tmp_path / "work")}
    run = subprocess.run(
        ["bash", "tests/gpu/run.sh", "--cpu", "--corpus", str(corpus), "--out", str(out),
         "--pretrain-steps", "6", "--sft-steps", "3"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    log = (out / "log.txt").read_text()
    assert "Qwen2.5 tokenizer rebuilt: 151665 tokens" in log and "identical to tiktoken" in log
    summary = json.loads((out / "gpu_check.json").read_text())
    assert summary["notebook_exit_status"] == 0 and summary["error"] is None
    assert set(summary["stage_seconds"]) >= {"clean_corpus", "dataset", "pretrain", "sft_model"}

    pretrain = summary["pretrain"]
    assert pretrain["optimizer_steps"] == 6, "MAX_STEPS did not cap pretraining"
    assert pretrain["tokens_per_second"] > 0 and pretrain["step_seconds_median"] > 0
    assert pretrain["plan"]["precision"] == "fp32" and pretrain["plan"]["attention"] == "sdpa"
    assert [e["step"] for e in pretrain["eval_losses"]] == [0, 6]
    # the predictions are the plan's own, as its line said them before the model loaded
    executed = json.loads((out / "LLM_Pretrain_SFT.executed.ipynb").read_text())
    printed = "".join(
        "".join(o.get("text", "")) for c in executed["cells"] for o in c.get("outputs", [])
    )
    plan = re.search(
        r"^\[pretrain\] CPU.*predicted peak ([\d.]+) GiB.*expected ([\d.]+) min", printed, re.M
    )
    assert plan, "no pretraining plan line"
    (peak, _), (seconds, measured) = pretrain["predicted_vs_measured"].values()
    assert peak == float(plan[1]) and f"{seconds / 60:.1f}" == plan[2], (peak, seconds, plan[0])
    assert measured > 0
    assert pretrain["eval_losses"][-1]["eval_loss"] < pretrain["eval_losses"][0]["eval_loss"]

    sft = summary["sft_model"]
    assert sft["parameters"] > 4_800_000, (
        "the tiny model must keep Qwen2.5's 151,936-token vocabulary"
    )
    assert sft["tokens_per_second"] > 0 and 0 <= sft["padding_share"] < 0.5
    assert sft["sampling"] == "group_by_length" and len(sft["eval_losses"]) == 2
    assert any(c.get("outputs") for c in executed["cells"]), "the executed notebook has no outputs"

    # the results page a GPU run becomes (tests/gpu/results.py), from this run's output
    page = tmp_path / "page" / "RESULTS.md"
    page.parent.mkdir()
    made = subprocess.run([sys.executable, "tests/gpu/results.py", str(out), str(page)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert made.returncode == 0, made.stderr[-3000:]
    text = page.read_text(encoding="utf-8")
    assert "val perplexity" in text and "(missing" not in text, text
    assert "](pretrain/" not in text, "a plot link relative to artifacts/ does not resolve here"
    assert (page.parent / "results_pretrain_loss_curve.png").stat().st_size > 1000
