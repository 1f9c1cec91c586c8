"""The commands that need torch alone: ``mondeq import-locuslab`` and ``mondeq bench``.

The maths they call (the reference-code conversion, the solvers) lives in :mod:`model_core`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

from .args import positive_float, positive_int, tolerance


def _floats(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated finite numbers, got {text!r}")
    return values


def _shape(text: str) -> tuple[int, int, int]:
    try:
        c, h, w = (int(v) for v in text.split(","))
    except ValueError:
        c = h = w = 0
    if min(c, h, w) < 1:
        raise argparse.ArgumentTypeError(
            f"expected C,H,W of positive integers (e.g. 1,28,28), got {text!r}"
        )
    return c, h, w


def import_locuslab(sub) -> None:
    """Register ``mondeq import-locuslab`` on the ``mondeq`` subparsers ``sub``.

    The command converts the reference code's FC state dict
    (:func:`~model_core.locuslab.import_locuslab`) and writes a checkpoint atomically; exit
    status 0, or 2 with one line for a refused flag, an unreadable source, an existing
    ``--out`` without ``--force`` or a state dict that does not fit the flags.
    """
    from model_core import SolverSettings

    d = SolverSettings()
    p = sub.add_parser(
        "import-locuslab",
        help="convert a state dict from the paper's reference code into a checkpoint",
        description="Convert a state dict saved by the paper's reference code (FC model, "
        "keys mon.linear_module.{U,A,B}, Wout) into a self-describing mondeq checkpoint.",
    )
    p.add_argument("src", metavar="SRC", help="state dict file (.pt) from the reference code")
    p.add_argument("--arch", default="fc", choices=["fc"], help="architecture (only fc)")
    p.add_argument("--hidden", type=positive_int, required=True, help="hidden width, e.g. 87")
    p.add_argument("--m", type=positive_float, default=1.0,
                   help="monotonicity parameter (default 1.0)")  # fmt: skip
    p.add_argument("--in-shape", type=_shape, default=(1, 28, 28), help="C,H,W (default 1,28,28)")
    p.add_argument("--mean", type=_floats, default=None, help="per-channel mean, e.g. 0.1307")
    p.add_argument("--std", type=_floats, default=None, help="per-channel std, e.g. 0.3081")
    p.add_argument("--class-names", default=None, help="comma-separated class names")
    p.add_argument("--dataset", default=None, help="dataset name to record, e.g. mnist")
    p.add_argument("--alpha", type=positive_float, default=d.alpha,
                   help=f"PR step size α (default {d.alpha})")  # fmt: skip
    p.add_argument("--tol", type=tolerance, default=d.tol,
                   help=f"solver tolerance (default {d.tol})")  # fmt: skip
    p.add_argument("--max-iter", type=positive_int, default=d.max_iter,
                   help=f"iteration cap (default {d.max_iter})")  # fmt: skip
    p.add_argument("--out", required=True, metavar="DST", help="checkpoint to write")
    p.add_argument("--force", action="store_true", help="replace DST if it exists")
    p.set_defaults(handler=_run_import_locuslab)


def _run_import_locuslab(args) -> int:
    from pathlib import Path

    from model_core import CheckpointError, save_checkpoint
    from model_core.locuslab import import_locuslab as convert
    from model_core.locuslab import read_locuslab_state_dict

    if Path(args.out).exists() and not args.force:
        print(
            f"mondeq import-locuslab: {args.out} exists; pass --force to replace it",
            file=sys.stderr,
        )
        return 2
    try:
        model = convert(
            read_locuslab_state_dict(args.src),
            arch=args.arch,
            hidden=args.hidden,
            m=args.m,
            in_shape=args.in_shape,
            mean=args.mean,
            std=args.std,
            class_names=args.class_names.split(",") if args.class_names else None,
            solver={"alpha": args.alpha, "tol": args.tol, "max_iter": args.max_iter},
        )
        out = save_checkpoint(
            model,
            args.out,
            source="locuslab/monotone_op_net",
            source_file=Path(args.src).name,
            dataset=args.dataset,
        )
    except (CheckpointError, ValueError) as e:
        print(f"mondeq import-locuslab: {e}", file=sys.stderr)
        return 2
    print(
        f"wrote {out}: fc, hidden {args.hidden}, m {args.m}, "
        f"{model.num_parameters():,} parameters, Lipschitz bound {model.lipschitz_bound():.3g}"
    )
    return 0


def bench(sub) -> None:
    """Register ``mondeq bench`` on the ``mondeq`` subparsers ``sub``.

    The command times inference (ms per batch), a train step (ms) and mean PR iterations of
    the paper's CIFAR models (:func:`~mondeq_cli.benchmark.run_benchmark`), with the machine
    probe before and after. With ``--reference-dir`` (a checkout of the paper's code) it
    times the reference's networks alternating with ours and prints the ratios; without it,
    no ratio. Exit status 0, or 2 with one line for an unknown model, a refused flag, a
    reference directory that is missing, incomplete or does not import, or a batch that does
    not fit in memory.
    """
    from .benchmark import DEFAULT_MODELS, PAPER_MODELS, PAPER_SOLVER

    p = sub.add_parser(
        "bench",
        help="time inference and train steps of the paper's CIFAR models",
        description="Inference ms/batch, train-step ms and iterations of the paper's CIFAR "
        "models on the current device. With --reference-dir, the paper's code "
        "(github.com/locuslab/monotone_op_net) is timed alternating with ours in the same "
        "process, and the ratios ours/reference of that run are printed.",
    )
    p.add_argument(
        "--models",
        default=",".join(DEFAULT_MODELS),
        help=f"comma-separated, from {','.join(PAPER_MODELS)}",
    )
    p.add_argument("--batch-size", type=positive_int, default=64,
                   help="samples per batch (default 64)")  # fmt: skip
    # The flag's name before the commands agreed on --batch-size; kept out of --help.
    p.add_argument("--batch", dest="batch_size", type=positive_int, default=argparse.SUPPRESS,
                   help=argparse.SUPPRESS)  # fmt: skip
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    p.add_argument("--tol", type=tolerance, default=PAPER_SOLVER.tol,
                   help=f"solver tolerance (default {PAPER_SOLVER.tol})")  # fmt: skip
    p.add_argument("--alpha", type=positive_float, default=PAPER_SOLVER.alpha,
                   help=f"PR step size (default {PAPER_SOLVER.alpha})")  # fmt: skip
    p.add_argument("--repeats", type=positive_int, default=15,
                   help="timed repeats, median (default 15; this VM drifts)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    p.add_argument(
        "--reference-dir",
        metavar="DIR",
        help="a checkout of github.com/locuslab/monotone_op_net: time its networks "
        "alternating with ours and print the ratios (needs --repeats >= 7)",
    )
    p.set_defaults(handler=_run_bench)


def _run_bench(args) -> int:
    from .benchmark import (
        MIN_SIDE_BY_SIDE_REPEATS,
        NO_REFERENCE_NOTE,
        PAPER_MODELS,
        format_probe,
        format_table,
        machine_probe,
        pick_device,
        run_benchmark,
    )
    from .reference import load_reference

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    try:
        if not models:
            raise ValueError(f"--models names no model, got {args.models!r}")
        unknown = [m for m in models if m not in PAPER_MODELS]
        if unknown:
            raise ValueError(f"unknown model {unknown[0]!r}; choose from {sorted(PAPER_MODELS)}")
        pick_device(args.device)  # both refused before the probe and the reference's import
        reference = None
        if args.reference_dir is not None:
            if args.repeats < MIN_SIDE_BY_SIDE_REPEATS:
                raise ValueError(
                    f"--reference-dir needs --repeats >= {MIN_SIDE_BY_SIDE_REPEATS} "
                    f"(a median per side), got {args.repeats}"
                )
            reference = load_reference(args.reference_dir)  # ReferenceCodeError: ValueError
        probe_before = machine_probe(args.device)
        rows = run_benchmark(
            models,
            batch_size=args.batch_size,
            device=args.device,
            tol=args.tol,
            alpha=args.alpha,
            repeats=args.repeats,
            reference=reference,
        )
        probe = {"before": probe_before, "after": machine_probe(args.device)}
    except ValueError as e:
        print(f"mondeq bench: {e}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as e:
        # torch reports a failed allocation (CPU or CUDA) as a RuntimeError subclass.
        if not isinstance(e, MemoryError) and "alloc" not in str(e).lower():
            raise
        print(
            f"mondeq bench: --batch-size {args.batch_size:,} does not fit in memory",
            file=sys.stderr,
        )
        return 2
    if args.json:
        print(json.dumps([{**r, "machine_probe": probe} for r in rows], indent=2))
        return 0
    print(format_table(rows))
    print("\n" + format_probe(probe["before"], probe["after"]))
    if reference is None:
        print(NO_REFERENCE_NOTE)
    return 0
