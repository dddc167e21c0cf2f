"""The spine of `dad`: config, storage, ledger, Ray runtime, data formats shared by every stage.

Importing it sets `OMP_WAIT_POLICY=PASSIVE` (unless the user chose one) before torch loads OpenMP:
with more busy threads than cores, OpenMP's default spin-waiting made 2-thread torch about 4× slower
than 1 thread on the 2-core reference machine; passive waiting removes that cliff and costs nothing
measurable on an idle machine. Ray workers started by this process inherit the setting.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
