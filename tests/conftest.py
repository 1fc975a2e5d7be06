"""Suite-wide settings, applied before any test module imports torch or transformers.

- No model hub is reachable here: libraries must fail fast instead of retrying the network.
- OMP_WAIT_POLICY=PASSIVE: on a shared 2-core machine, spinning OpenMP threads stall each other and
  tiny torch ops (an r×r SVD) slow down 10–25×; passive waiting costs nothing measurable otherwise.
"""

import os

for key, value in {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "OMP_WAIT_POLICY": "PASSIVE",
}.items():
    os.environ.setdefault(key, value)

#: fixtures every test may name: ``engine`` / ``run_command``, each transport in turn (tests/engines.py)
pytest_plugins = ["engines"]
