#!/usr/bin/env bash
# The exact commands behind docs/results/dp/ (issue 13). Finished cells are skipped and unfinished
# ones resumed, so re-running continues where it stopped. Order: seed 11 of the sample-level grid,
# then the client-level grid, then seeds 12 and 13 of the sample-level grid.
set -euo pipefail
cd "$(dirname "$0")/../../.."
S="--strategies fedit,ffa,fedsvd --quiet --no-report"
C="--strategies fedit,fedrot --seeds 11 --quiet --no-report"
for s in ${SAMPLE_SEEDS:-11}; do
  fedlora compare configs/cpu-dp-sample.toml $S --seeds $s --output-dir runs/cpu-dp-sample-nonprivate
  fedlora compare configs/cpu-dp-sample.toml $S --seeds $s --set privacy.mode=sample \
      --grid privacy.target_epsilon=1,3,8 --output-dir runs/cpu-dp-sample
done
fedlora compare configs/cpu-dp-client.toml $C --output-dir runs/cpu-dp-client-nonprivate
fedlora compare configs/cpu-dp-client.toml $C --set privacy.mode=client --grid privacy.target_epsilon=3,8 \
    --output-dir runs/cpu-dp-client
# the reports
fedlora report runs/cpu-dp-sample runs/cpu-dp-sample-nonprivate --output docs/results/dp/sample
fedlora report runs/cpu-dp-client runs/cpu-dp-client-nonprivate --output docs/results/dp/client
