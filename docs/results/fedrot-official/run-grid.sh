#!/usr/bin/env bash
# The issue-14 grid behind docs/results/fedrot-official/: configs/cpu-fedrot-official.toml (the
# authors' regime at CPU scale, 100 rounds) for fedit, fedrot λ = 1.0 and 0.5, and the alignment
# variants A-only, B-only and joint (λ = 1.0), seeds 11, 12, 13. One `fedlora compare` call per
# cell, two at a time with one torch thread each, seed by seed (all six variants of seed 11 first).
# The cells land where the preset header's three compare commands put them, so either way of running
# fills the same grid. Finished cells are skipped and unfinished ones resumed; SEEDS="12 13" picks seeds.
# Then: fedlora report runs/cpu-fedrot-official
set -euo pipefail
cd "$(dirname "$0")/../../.."
C="fedlora compare configs/cpu-fedrot-official.toml --quiet --no-report --set model.threads=1 --output-dir runs/cpu-fedrot-official"
cells() {
  for seed in ${SEEDS:-11 12 13}; do
    echo "$C --strategies fedit --seeds $seed"
    echo "$C --strategies fedrot --seeds $seed --grid strategy.options.lam=1.0"
    for a in joint B A; do
      echo "$C --strategies fedrot --seeds $seed --grid strategy.options.align=$a --set strategy.options.lam=1.0"
    done
    echo "$C --strategies fedrot --seeds $seed --grid strategy.options.lam=0.5"
  done
}
mkdir -p runs/logs
cells | tr '\n' '\0' | xargs -0 -P "${JOBS:-2}" -n 1 bash -c 'echo "$(date +%T) $0"; $0 > "runs/logs/$(echo "$0" | md5sum | cut -c1-8).log" 2>&1'
