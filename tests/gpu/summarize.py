"""Read the GPU check's figures back from the stage cache and the executed notebook -> JSON on stdout.

Usage: summarize.py CACHE_DIR EXECUTED_NOTEBOOK NOTEBOOK_EXIT_STATUS WALL_SECONDS [--brief LABEL]
(--brief: one line with the speed figures only, for the lever runs)
Works on whatever finished: a stage that did not complete is listed as missing.
"""

import json
import math
import re
import sys
from pathlib import Path

SLOW_PATH = re.compile(
    r"recompil|graph.?break|fall(ing|s)? ?back|fallback|not (be )?compiled|cache_size_limit"
    r"|recompile_limit|slow|deprecat|eager|flash|sdpa|out of memory|OutOfMemory",
    re.I,
)


def complete_builds(cache: Path) -> dict:
    """stage -> (folder, manifest) of its newest complete build."""
    found = {}
    for path in sorted(cache.glob("*/*/manifest.json")):
        manifest = json.loads(path.read_text())
        stage = path.parent.parent.name
        if stage not in found or manifest["created_at"] > found[stage][1]["created_at"]:
            found[stage] = (path.parent, manifest)
    return found


def read(folder: Path, name: str, default=None):
    path = folder / name
    return json.loads(path.read_text()) if path.exists() else default


def eval_losses(folder: Path) -> list:
    return [
        {"step": e["step"], "eval_loss": round(e["eval_loss"], 4)}
        for e in read(folder, "log_history.json", [])
        if "eval_loss" in e
    ]


def notebook_lines(notebook: Path) -> tuple[list, str | None]:
    """Output lines that mention a slow path, and the error a failed cell raised."""
    if not notebook.exists():
        return [], "no executed notebook"
    nb = json.loads(notebook.read_text())
    lines, error = [], None
    for cell in nb["cells"]:
        for output in cell.get("outputs", []):
            if output.get("output_type") == "error":
                error = f"{output['ename']}: {output['evalue']}"[:500]
            text = "".join(output.get("text", ""))
            lines += [ln.strip()[:300] for ln in text.splitlines() if SLOW_PATH.search(ln)]
    return list(dict.fromkeys(lines))[:40], error


def main() -> None:
    cache, notebook, status, wall = Path(sys.argv[1]), Path(sys.argv[2]), *sys.argv[3:5]
    builds = complete_builds(cache)
    stages = {s: round(m["build_seconds"], 1) for s, (_, m) in builds.items()}
    summary = {
        "notebook_exit_status": int(status),
        "wall_seconds": int(wall),
        "stage_seconds": stages,
    }
    for stage in ("clean_corpus", "tokenizer", "dataset", "pretrain", "sft_data", "sft_model"):
        if stage not in builds:
            summary[stage] = "missing (did not finish)"
            continue
        folder = builds[stage][0]
        if stage in ("pretrain", "sft_model"):
            # the exported metrics: the stage's raw facts plus the figures derived from them
            exported = cache.parent / "artifacts" / ("pretrain" if stage == "pretrain" else "sft")
            metrics = read(exported, "metrics.json", None) or read(folder, "metrics.json", {})
            losses = eval_losses(folder)
            summary[stage] = {**metrics, "eval_losses": losses}
            predicted = metrics.get("predicted") or {}  # the plan, made before the model loaded
            summary[stage]["predicted_vs_measured"] = {
                "peak_memory_gib": [predicted.get("predicted_peak_gib"), metrics.get("peak_memory_gib")],
                "seconds": [predicted.get("expected_seconds"),
                            round(metrics.get("train_seconds", 0) + metrics.get("eval_seconds", 0), 1)],
            }  # fmt: skip
            if losses:
                summary[stage]["perplexity_reached"] = round(math.exp(losses[-1]["eval_loss"]), 2)
        else:
            summary[stage] = read(folder, "stats.json", {})
    summary["slow_path_lines"], summary["error"] = notebook_lines(notebook)
    if "--brief" in sys.argv:
        pre, sft = summary.get("pretrain"), summary.get("sft_model")
        pre, sft = pre if isinstance(pre, dict) else {}, sft if isinstance(sft, dict) else {}
        brief = {"lever": sys.argv[sys.argv.index("--brief") + 1], "error": summary["error"]}
        for prefix, metrics, keys in (
            ("pretrain", pre, ("tokens_per_second", "step_seconds_median", "mfu", "peak_memory_gib",
                               "compile", "plan", "predicted_vs_measured")),
            ("sft", sft, ("tokens_per_second", "step_seconds_median", "mfu", "peak_memory_gib",
                          "padding_share", "micro_batch", "gradient_accumulation", "compile",
                          "packed loss check", "seconds", "plan",
                          "predicted_vs_measured")),
        ):  # fmt: skip
            brief |= {f"{prefix} {k}": metrics.get(k) for k in keys}
        print(json.dumps(brief, ensure_ascii=False, default=str))
        return
    print(json.dumps(summary, indent=1, ensure_ascii=False, default=str))


if __name__ == "__main__":
    main()
