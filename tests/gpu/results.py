"""Write the results page of a full run of the GPU check (tests/gpu/RESULTS.md) from its $OUT folder.

Usage: results.py OUT_DIR [PAGE]   (PAGE defaults to tests/gpu/RESULTS.md; the loss plot goes beside it)
OUT_DIR holds what run.sh wrote: gpu_check.json, versions.txt, log.txt and artifacts/ (the notebook's
report.md and the pretraining loss curve).
"""

import json
import re
import shutil
import sys
from pathlib import Path


def section(report: str, title: str) -> str:
    """One `## title` section of the notebook's report.md, without its heading."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", report, re.M | re.S)
    if not match:
        return "(missing: the run did not get this far)"
    # the report's plot links are relative to artifacts/: this page links its own copy
    return re.sub(r"^!\[.*\n+", "", match.group(1), flags=re.M).strip()


def figure(value, spec: str = "", missing: str = "n/a") -> str:
    return missing if value is None else format(value, spec)


def small_card(out: Path) -> list[str]:
    """The small-card mode's SFT steps (run.sh --small-card): an RTX 3070's plan on this card capped
    at 7.8 GiB, the measured peak beside the predicted one."""
    path = out / "small_card.json"
    if not path.exists():
        return []
    run = json.loads(path.read_text())
    plan, (predicted, measured) = (
        run.get("sft plan") or {},
        run.get("sft predicted_vs_measured", {}).get("peak_memory_gib", [None, None]),
    )
    return [
        "## Small-card mode: SFT with an RTX 3070's plan, memory capped at 7.8 GiB",
        "",
        f"- optimizer {plan.get('optimizer')}, micro-batch {run.get('sft micro_batch')} x "
        f"{run.get('sft gradient_accumulation')}, gradient checkpointing "
        f"{plan.get('gradient_checkpointing')}; error: {run.get('error')}",
        f"- peak memory: predicted {predicted} GiB, measured {measured} GiB",
        "",
    ]


def main() -> None:
    out = Path(sys.argv[1])
    page = Path(sys.argv[2]) if len(sys.argv) > 2 else Path(__file__).with_name("RESULTS.md")
    summary = json.loads((out / "gpu_check.json").read_text())
    report = (out / "artifacts" / "report.md").read_text(encoding="utf-8")
    log = (out / "log.txt").read_text(errors="replace")
    command = out / "command.txt"
    command = command.read_text().strip() if command.exists() else "bash tests/gpu/run.sh"
    card = next((ln for ln in log.splitlines() if re.search(r"H100|H200|A100|NVIDIA", ln)), "?")
    plot = out / "artifacts" / "pretrain" / "loss_curve.png"
    if plot.exists():
        shutil.copy(plot, page.with_name("results_pretrain_loss_curve.png"))
    pre, sft = summary.get("pretrain", {}), summary.get("sft_model", {})
    pre, sft = (x if isinstance(x, dict) else {} for x in (pre, sft))
    stages = "\n".join(f"| {s} | {t} |" for s, t in summary.get("stage_seconds", {}).items())
    lines = [
        "# The `full` profile on one GPU: results",
        "",
        f"Card: `{card.strip()}`  ",
        f"Versions: {(out / 'versions.txt').read_text().strip()}  ",
        f"Notebook exit status {summary.get('notebook_exit_status')}, wall {summary.get('wall_seconds')} s"
        f" (`{command}`; this page: `tests/gpu/results.py $OUT`).",
        "",
        "## Stage wall times (seconds)",
        "",
        "| stage | seconds |",
        "|---|---|",
        stages,
        "",
        "## Speed",
        "",
        f"- pretraining: {figure(pre.get('tokens_per_second'), ',.0f')} tokens/s, MFU "
        f"{figure(pre.get('mfu'), '.1%')}, {figure(pre.get('step_seconds_median'), '.3f')} s per "
        f"optimizer step, peak memory {pre.get('peak_memory_gib')} GiB, torch.compile "
        f"{pre.get('compile')}",
        f"- SFT (a random-weight Qwen2.5-0.5B-shaped stand-in: its answers are noise, only its speed "
        f"counts): {figure(sft.get('tokens_per_second'), ',.0f')} non-pad tokens/s, MFU "
        f"{figure(sft.get('mfu'), '.1%')}, padding {figure(sft.get('padding_share'), '.1%')}, "
        f"phase seconds {sft.get('seconds')}",
        "",
        "## Predictions (made before each stage loaded its model) beside measurements",
        "",
        "| stage | peak memory GiB: predicted / measured | seconds (training + evaluation): predicted / measured |",
        "|---|---|---|",
        *[
            f"| {name} | {' / '.join(map(str, m.get('predicted_vs_measured', {}).get('peak_memory_gib', ['?'])))} | "
            f"{' / '.join(map(str, m.get('predicted_vs_measured', {}).get('seconds', ['?'])))} |"
            for name, m in (("pretrain", pre), ("sft_model", sft))
        ],
        "",
        *small_card(out),
        "## Pretraining: validation per epoch",
        "",
        section(report, "Pretraining"),
        "",
        "![pretraining loss](results_pretrain_loss_curve.png)",
        "",
    ]
    page.write_text("\n".join(lines), encoding="utf-8")
    print(f"wrote {page}")


if __name__ == "__main__":
    main()
