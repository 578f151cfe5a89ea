"""``python -m engine_testing.train [--kill=STEP:WHERE] [--backend-config=CONFIG] key=value ...``: a
training run (``visurf_engine.train.main``, with the test rewards and paradigms registered) that
SIGKILLs itself, as the OOM killer would, inside the checkpoint write of step STEP
(``tests/test_crash_safety.py``); without ``--kill`` a plain run. ``--backend-config``: the
collectives' device check (``parallel.world.check_device``) sees the process group as if it
had this backend config (e.g. ``cuda:nccl``, a plain NCCL group), whatever it really runs on
(gloo), so a CPU run shows what a GPU run's collectives would meet (``tests/test_world.py``). WHERE:

- ``files``: after the weights, optimizer and state are written, before the RNG file (an
  incomplete ``step_N.tmp`` is left behind);
- ``publish``: after ``step_N`` is renamed into place, before ``latest`` names it.
"""

from __future__ import annotations

import os
import signal
import sys

from engine_testing.runs import register_fault_paradigms  # (and, by importing, the test rewards)
from visurf_engine import checkpoint
from visurf_engine.train import main


def killing(original, when):
    """``original``, except that it SIGKILLs this process first when ``when(*args)``."""

    def patched(*args):
        if when(*args):
            os.kill(os.getpid(), signal.SIGKILL)
        return original(*args)

    return patched


if __name__ == "__main__":
    register_fault_paradigms()
    overrides = sys.argv[1:]
    if overrides and overrides[0].startswith("--backend-config="):
        from visurf_engine.parallel import world

        config = overrides.pop(0).removeprefix("--backend-config=")
        world.served_devices = lambda group=None: world.served_by(config)
    if overrides and overrides[0].startswith("--kill="):
        step, where = overrides.pop(0).removeprefix("--kill=").split(":")
        name = f"step_{int(step):06d}"
        if where == "files":
            checkpoint.save_rng = killing(checkpoint.save_rng, lambda tmp, rank: tmp.name == f"{name}.tmp")
        elif where == "publish":
            checkpoint.write_atomic = killing(checkpoint.write_atomic, lambda path, text: text == name)
        else:
            raise SystemExit(f"WHERE must be files or publish, got {where!r}")
    sys.exit(main(overrides))
