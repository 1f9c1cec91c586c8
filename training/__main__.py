"""``python -m training ARGS`` ≡ ``mondeq train ARGS``; what each rank runs.

Ranks come from ``mondeq train --nproc`` (:mod:`training.launch`) or ``torchrun -m training``.
"""

import os
import sys
import traceback

from mondeq_cli.main import main
from training.launch import report

if __name__ == "__main__":
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        sys.exit(main(["train", *sys.argv[1:]]))
    try:
        code = main(["train", *sys.argv[1:]])
    except Exception as e:  # a bug on this rank: its traceback, and one line for the launcher
        traceback.print_exc()
        report(f"{type(e).__name__}: {e}")
        code = 1
    # A rank leaves without interpreter finalisation: there, DDP's reducer frees the gloo
    # process group while its run-loop threads still hold tensors, and a thread that
    # needs the GIL then is ended by std::terminate (SIGABRT, "terminate called without
    # an active exception"; about 1 run in 5 on 2 CPU ranks, torch 2.14). Every file is
    # written and closed by now, and the kernel drops the run folder's lock with the
    # process.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
