"""Suite-wide settings, applied before any test module imports torch or transformers.

- No model hub is reachable here: libraries must fail fast instead of retrying the network.
- SIGINT as a terminal gives it (see below).
- OMP_WAIT_POLICY=PASSIVE: on a shared 2-core machine, spinning OpenMP threads stall each other and
  tiny torch ops (an r×r SVD) slow down 10–25×; passive waiting costs nothing measurable otherwise.
"""

import os
import signal

for key, value in {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "OMP_WAIT_POLICY": "PASSIVE",
}.items():
    os.environ.setdefault(key, value)

# The Ctrl-C tests need SIGINT deliverable. A shell without job control starts a background command
# (`pytest &`, `nohup … &`) with SIGINT ignored, and an ignored signal is inherited by every child:
# Python then installs no KeyboardInterrupt handler, and each Ctrl-C test fails for the launcher's
# sake, not fedlora's. Put back what a terminal gives.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

#: fixtures every test may name: ``engine`` / ``run_command``, each transport in turn (tests/engines.py)
pytest_plugins = ["engines"]
