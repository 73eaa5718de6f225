"""The speed levers of issue #14, on the CPU: what each changes and what it must not. Their GPU
figures come from tests/gpu/run.sh --levers on a lent device."""

import json
import shutil

from conftest import build_of, replace, run_live


def metrics(workdir, stage, result) -> dict:
    return json.loads((build_of(workdir / "cache", stage, result) / "metrics.json").read_text())


def losses(workdir, stage, result) -> list:
    log = json.loads((build_of(workdir / "cache", stage, result) / "log_history.json").read_text())
    return [(e["step"], round(e["loss"], 5)) for e in log if "loss" in e]


def syncs_per_step(path) -> dict:
    """Mean host syncs per optimizer step, the first 2 (compilation, warm-up) left out."""
    counts = json.loads(path.read_text())
    return {stage: sum(c[2:]) / len(c[2:]) for stage, c in counts.items()}


def test_the_loss_and_the_meters_add_no_host_sync_unless_asked(live_kernel, warm_copy):
    # (what is left inside a step comes from transformers building the attention mask)
    shutil.rmtree(warm_copy / "cache" / "pretrain")
    shutil.rmtree(warm_copy / "cache" / "sft_model")
    short = {"MAX_STEPS": 8, "SFT_MAX_STEPS": 8}
    counted = [warm_copy / "syncs-lean.json", warm_copy / "syncs-full.json"]
    lean = run_live(
        live_kernel, warm_copy, "sft_model", faults={"count_host_syncs": str(counted[0])}, **short
    )
    assert lean["error"] is None, lean["error"]
    syncs = syncs_per_step(counted[0])
    assert syncs["pretrain"] <= 1 and syncs["sft_model"] <= 2 * 2, syncs  # 2 micro-batches a step
    # TRL's own loss reads entropy, accuracy and tokens on the host; the NaN check reads the loss
    full = run_live(live_kernel, warm_copy, "sft_model", DEV={"SFT_LEAN_LOSS": False, "HOST_SYNC_EVERY_STEP": True},
                    FORCE=["pretrain"], faults={"count_host_syncs": str(counted[1])}, **short)  # fmt: skip
    assert full["error"] is None, full["error"]
    assert syncs_per_step(counted[1])["pretrain"] >= syncs["pretrain"] + 2
    assert syncs_per_step(counted[1])["sft_model"] >= syncs["sft_model"] + 2 * 3
    # the lean loss is TRL's loss: the same values, logged without TRL's extra metrics
    assert losses(warm_copy, "sft_model", lean) == losses(warm_copy, "sft_model", full)


def test_packed_rows_give_the_loss_of_their_conversations(live_kernel, warm_copy):
    result = run_live(
        live_kernel, warm_copy, "sft_model", DEV={"SFT_PACKING": True}, SFT_MAX_STEPS=3
    )
    assert result["error"] is None, result["error"]
    assert "packed rows keep attention inside each conversation" in result["text"]
    facts = metrics(warm_copy, "sft_model", result)
    check = facts["packed loss check"]
    assert check["conversations in the row"] >= 2
    assert abs(check["loss packed"] - check["loss padded"]) < 1e-5 * check["loss padded"]
    assert facts["real_positions"] == facts["positions"], "a packed batch holds no padding"
    # the check catches attention across conversations (position_ids dropped: one long sequence)
    line = "packed = trainer.data_collator([row])"
    edit = replace(line, line + "\n    packed.pop('position_ids')")
    shutil.rmtree(warm_copy / "cache" / "sft_model")
    result = run_live(
        live_kernel,
        warm_copy,
        "sft_model",
        DEV={"SFT_PACKING": True},
        SFT_MAX_STEPS=3,
        edits=[edit],
    )
    assert (
        result["error"]
        and "packed rows leak attention across conversations" in result["error"]["evalue"]
    )


def test_regional_compile_traces_without_breaks_or_recompiles(live_kernel, warm_copy):
    # the eager backend traces with TorchDynamo as inductor does, without compiling kernels
    traced = {"DEV": {"SFT_COMPILE": "regional", "COMPILE_BACKEND": "eager"}, "TORCH_COMPILE": True}
    reports = []
    for steps in (4, 8):  # twice the steps, in the same kernel: no new graph (none per step)
        result = run_live(live_kernel, warm_copy, "sft_model", SFT_MAX_STEPS=steps, MAX_STEPS=steps,
                          **traced)  # fmt: skip
        assert result["error"] is None, result["error"]
        reports.append(
            {s: metrics(warm_copy, s, result)["compile"] for s in ("pretrain", "sft_model")}
        )
    for stage in ("pretrain", "sft_model"):
        short, long = reports[0][stage], reports[1][stage]
        assert short["graph breaks"] == long["graph breaks"] == 0, (stage, long)
        assert 1 <= short["graphs compiled"] and long["graphs compiled"] <= short["graphs compiled"]
