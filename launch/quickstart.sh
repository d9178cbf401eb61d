#!/usr/bin/env bash
# README command 1: set up, then the whole product end to end on data every machine has (Python's stdlib):
# prepare -> train a tiny LLaMA on 2 ranks with horovodrun -> evaluate -> generate a sample -> summary.
set -euo pipefail
cd "$(dirname "$0")/.."
./launch/install.sh
source .venv/bin/activate
RUN=runs/quickstart
python -m hvd_llama.prepare --input stdlib --out data/stdlib --overwrite  # a few seconds; matches this Python
rm -rf "$RUN" && mkdir -p runs
horovodrun --gloo -np 2 -H localhost:2 python -m hvd_llama.train --config configs/tiny.yaml --run-dir "$RUN" \
  | tee "$RUN.log"
python -m hvd_llama.evaluate --checkpoint "$RUN"
python -m hvd_llama.generate --checkpoint "$RUN" --prompt "def " --max-new-tokens 120 --temperature 0.8 --seed 0
echo
grep -o 'done: .*' "$RUN.log" | tail -1
