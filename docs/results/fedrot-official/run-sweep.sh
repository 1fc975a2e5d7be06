#!/usr/bin/env bash
# The lr sweep behind configs/cpu-fedrot-official.toml (issue 14): fedit, seed 11, 25 rounds of the
# preset, SGD lr ∈ {0.02, 0.05, 0.1, 0.2, 0.5, 1.0}, two cells at a time with one torch thread each.
# Re-running skips finished cells and resumes unfinished ones. Then the report copied here:
#   fedlora report runs/fedrot-official-lr-sweep
#   cp -r runs/fedrot-official-lr-sweep/summary.md runs/fedrot-official-lr-sweep/plots docs/results/fedrot-official/sweep/
set -euo pipefail
cd "$(dirname "$0")/../../.."
fedlora compare configs/cpu-fedrot-official.toml --strategies fedit --seeds 11 \
    --grid train.lr=0.02,0.05,0.1,0.2,0.5,1.0 --set train.rounds=25 \
    --jobs 2 --quiet --no-report --output-dir runs/fedrot-official-lr-sweep
