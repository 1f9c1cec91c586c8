"""``python -m training ARGS`` ≡ ``mondeq train ARGS``; the target of ``torchrun -m training``."""

import sys

from model_core.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
