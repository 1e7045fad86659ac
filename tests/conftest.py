import os

# The thread policy (tnexp/runtime.py) follows OMP_NUM_THREADS when it is set. Tests run on
# one thread unless the caller says otherwise: their models are tiny (the policy's tiny-step
# rule gives 1 thread anyway), one thread is fastest on a busy CI host (torch's pool waits
# for every thread at each op, so a contended core stalls all of them), and the numbers do
# not depend on the host's core count. Set before torch is imported, which reads it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

from tnexp.runtime import apply_thread_policy, reset_state

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

_SESSION_THREADS = apply_thread_policy()[1].threads


@pytest.fixture(autouse=True)
def _seed_and_threads():
    # Every test starts from the session's thread choice, whatever the previous one set.
    torch.manual_seed(0)
    reset_state()
    if torch.get_num_threads() != _SESSION_THREADS:
        torch.set_num_threads(_SESSION_THREADS)
    yield
