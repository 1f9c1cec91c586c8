"""``python -m service``: the same as ``mondeq serve``."""

from __future__ import annotations

import argparse
import sys

from .cli import add_arguments, run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m service",
        description="Serve models/<name>/<version>/model.pt over HTTP (flags win over "
        "MONDEQ_* environment variables).",
    )
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
