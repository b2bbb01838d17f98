"""`python tests/stop_at_step.py N ARGS...`: run `ditkit ARGS...` that sends itself SIGTERM right after training step N
(every process of a launcher at the same step), as an interrupted run would see it. For tests/test_sharding.py."""
from __future__ import annotations

import importlib
import os
import signal
import sys


def main() -> int:
    at, argv = int(sys.argv[1]), sys.argv[2:]
    import ditkit.ops.training as training

    real = training.train

    def train_then_stop(*args, on_step=None, **kw):
        def hook(step, loss):
            if on_step:
                on_step(step, loss)
            if step == at:
                os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, on_step=hook, **kw)

    for name in ("ditkit.ops.distill", "ditkit.ops.lora.train"):  # the modules that call the loop
        importlib.import_module(name).train = train_then_stop
    from ditkit.cli.main import main as ditkit

    return ditkit(argv)


if __name__ == "__main__":
    sys.exit(main())
