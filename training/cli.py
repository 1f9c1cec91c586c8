"""``mondeq presets``, ``mondeq train`` and ``mondeq eval`` (registered as entry points)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from model_core import SOLVERS
from model_core.models import STOP_RULES
from mondeq_cli.args import nonnegative_float, positive_float, positive_int, tolerance

from .options import read_config
from .runfolder import RunFolderError, check_run_folder

# Exit status of a run stopped at a non-finite loss, gradient or weight (2: refused input,
# 128 + N: signal N, 1: a crash).
EXIT_DIVERGED = 3

# ---- presets ------------------------------------------------------------------------------


def presets(sub) -> None:
    p = sub.add_parser(
        "presets",
        help="list the training presets",
        description="The paper's nine models (Table 1 / Appendix E) and offline Fashion-MNIST "
        "versions, with parameter counts and recipes.",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(handler=_run_presets)


def preset_rows() -> list[dict]:
    from model_core import build_model

    from .data import DATASETS
    from .presets import PRESETS

    rows = []
    for p in PRESETS.values():
        shape, classes = DATASETS[p.dataset]
        model = build_model(p.model_config(shape, len(classes)))
        ch = p.model.get("channels", p.model.get("hidden"))
        arch = {"fc": f"fc {ch}", "conv": f"conv {ch} ch"}.get(p.model["arch"])
        arch = arch or f"multi-tier ({', '.join(map(str, ch))})"
        rows.append(
            {
                "name": p.name,
                "dataset": p.dataset,
                "architecture": arch,
                "parameters": model.num_parameters(),
                "epochs": p.epochs,
                "batch_size": p.batch_size,
                "schedule": p.schedule.describe(p.lr),
                "augment": p.augment,
                "note": p.description,
            }
        )
    return rows


def _run_presets(args) -> int:
    rows = preset_rows()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    cols = ["name", "dataset", "architecture", "parameters", "epochs", "schedule", "note"]
    cells = [[f"{r[c]:,}" if c == "parameters" else str(r[c]) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    print("  ".join(c.upper().ljust(w) for c, w in zip(cols, widths, strict=True)).rstrip())
    for row in cells:
        print(
            "  ".join(
                v.rjust(w) if c in ("parameters", "epochs") else v.ljust(w)
                for c, v, w in zip(cols, row, widths, strict=True)
            ).rstrip()
        )
    return 0


# ---- train --------------------------------------------------------------------------------

_TRAIN_FLAGS = {  # option name -> (flag, type, help)
    "preset": ("--preset", str, "preset name (see `mondeq presets`)"),
    "epochs": ("--epochs", int, "epochs (default: the preset's)"),
    "batch_size": ("--batch-size", int, "global batch size (default: the preset's, 128)"),
    "lr": ("--lr", float, "peak learning rate (default: the preset's)"),
    "seed": ("--seed", int, "seed for initialisation, data order and augmentation (default 0)"),
    "device": ("--device", str, "auto (default), cpu, cuda or cuda:N"),
    "data_dir": ("--data-dir", str, "dataset root (torchvision layout)"),
    "dataset": ("--dataset", str, "override the preset's dataset, e.g. synthetic"),
    "synthetic_size": ("--synthetic-size", int, "training samples of --dataset synthetic"),
    "steps_per_epoch": ("--steps-per-epoch", int, "cap the steps per epoch (smoke runs)"),
    "eval_limit": ("--eval-limit", int, "evaluate on the first N test samples only"),
    "out": ("--out", str, "run folder for checkpoints, metrics.jsonl and curves.png"),
}


def train(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a preset; writes checkpoints, metrics.jsonl and curves.png",
        description="Train a preset. Flags override a --config file (TOML or YAML with the "
        "same keys, underscores for dashes). --resume DIR continues an interrupted run "
        "exactly where it stopped.",
    )
    for flag, typ, text in _TRAIN_FLAGS.values():
        p.add_argument(flag, type=typ, default=None, help=text)
    p.add_argument("--download", action="store_true", default=None, help="fetch missing data")
    p.add_argument("--no-tune-alpha", dest="tune_alpha", action="store_false", default=None,
                   help="keep α fixed instead of retuning it twice per epoch")  # fmt: skip
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                   help="no progress bars")  # fmt: skip
    p.add_argument("--config", type=Path, help="TOML or YAML file of options")
    p.add_argument("--resume", type=Path, metavar="DIR", help="continue the run in DIR")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run already in --out (refused without it)")  # fmt: skip
    p.add_argument("--nproc", type=positive_int, default=1,
                   help="processes for DistributedDataParallel on this machine")  # fmt: skip
    p.add_argument(
        "--dist-timeout",
        type=_dist_timeout,
        default=None,
        metavar="SECONDS",
        help="with --nproc or torchrun: how long a rank waits in a training step for a hung "
        "peer before the run stops (default 300; an epoch's evaluation and writes wait at "
        "least 300)",
    )
    p.set_defaults(handler=_run_train)


def _cli_options(args) -> dict:
    names = [*_TRAIN_FLAGS, "download", "tune_alpha", "progress"]
    return {k: getattr(args, k) for k in names if getattr(args, k) is not None}


def _run_train(args) -> int:
    from model_core import CheckpointError, load_checkpoint

    from .data import DataError
    from .distributed import DEFAULT_TIMEOUT_S, PeerLost
    from .launch import EXIT_PEER_LOST, launched, report, resume_hint
    from .loop import Diverged
    from .loop import train as run
    from .options import TrainOptions, check_consistent, check_options, command_line, flag
    from .signals import Aborted, Interrupted

    try:
        given = _cli_options(args)
        check_options(given)  # flags first, so that a message names the flag

        def label(name: str) -> str:
            return (
                flag(name) if name in given or args.config is None else f"{name} in {args.config}"
            )

        if args.resume is not None and args.config is not None:
            raise ValueError("--config does not apply with --resume: the run keeps its options")
        if args.resume is not None:
            if args.resume.is_file():  # was "DIR/last.pt/last.pt: no such file"
                raise ValueError(
                    f"--resume takes the run folder, not a file: pass --resume {args.resume.parent}"
                )
            try:
                last = args.resume / "last.pt"
                saved = _resume_state(load_checkpoint(last), last)
            except CheckpointError as e:
                raise ValueError(f"cannot resume: {e}") from None
            changeable = {"epochs", "device", "progress", "data_dir", "eval_limit"}
            # The run's own value given again (its command line repeated with --resume added)
            # changes nothing and is accepted; only another value is refused.
            kept = saved["options"]
            fixed = sorted(k for k in set(given) - changeable - {"out"} if given[k] != kept.get(k))
            if fixed:
                was = ", ".join(
                    f"{flag(k)} {_shown(kept.get(k))} in the run, {_shown(given[k])} given"
                    for k in fixed
                )
                raise ValueError(f"--resume keeps the run's options; cannot change {fixed} ({was})")
            if "out" in given and Path(given["out"]).resolve() != args.resume.resolve():
                raise ValueError(
                    f"--resume {args.resume} continues the run in that folder; --out "
                    f"{given['out']} names another (copy the run there and resume it there)"
                )
            done = saved["progress"]["epoch"]
            if given.get("epochs", done) < done:
                raise ValueError(
                    f"--epochs {given['epochs']} is fewer than the {done} epochs already done "
                    f"in {args.resume}"
                )
            opts = {**saved["options"], **given, "out": str(args.resume)}
        else:
            opts = {**(read_config(args.config) if args.config else {}), **given}
            for required in ("preset", "out"):
                if not opts.get(required):
                    raise ValueError(f"--{required} is required (or give it in --config)")
            check_consistent(opts, label)
            opts.setdefault("command", command_line())
        options = TrainOptions.from_dict(opts, label)
        resume = args.resume is not None
        # Refused here before any work; checked again under the folder's lock by the run.
        check_run_folder(Path(options.out), resume=resume, overwrite=args.overwrite)
        if args.nproc > 1:
            _check_world(options, args.nproc)
            return _launch(args, Path(options.out))
        timeout = DEFAULT_TIMEOUT_S if args.dist_timeout is None else args.dist_timeout
        metrics = run(options, resume=resume, overwrite=args.overwrite, dist_timeout_s=timeout)
    except PeerLost as e:
        # Under --nproc the launcher names the rank that failed, once; under torchrun each
        # surviving rank says what it saw.
        if not launched():
            print(
                f"mondeq train: {e}: another process of the run failed or stopped answering; "
                f"the run stopped; {resume_hint(Path(options.out))}",
                file=sys.stderr,
            )
        return EXIT_PEER_LOST
    except RunFolderError as e:
        if _rank() == 0:  # rank 0's refusal, raised on every rank: say it once
            print(f"mondeq train: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        if _rank() == 0:
            print(f"mondeq train: {e}", file=sys.stderr)
        return 128 + e.signum
    except Aborted as e:
        if _rank() == 0:
            last = Path(options.out) / "last.pt"
            kept = f"resume from {last}" if last.is_file() else "no checkpoint was written"
            print(f"mondeq train: {e}; {kept}", file=sys.stderr)
        return 128 + e.signum
    except Diverged as e:
        if _rank() == 0:  # every rank stops at the same step: say it once
            print(f"mondeq train: {e}", file=sys.stderr)
        return EXIT_DIVERGED
    except (DataError, ValueError) as e:
        if launched():  # the launcher says it once, naming the rank if only this one failed
            report(str(e))
        elif _rank() == 0:  # every rank checks the same inputs: say it once
            print(f"mondeq train: {e}", file=sys.stderr)
        return 2
    if metrics and _rank() == 0:
        print(json.dumps(metrics))
    return 0


def _check_same_task(path, model, data) -> None:
    """Refuse test data of another dataset than the checkpoint was trained on.

    Fashion-MNIST and MNIST share shape and class count, so a Fashion-MNIST model scored on
    digits printed an accuracy near 10% as if it were the model's. The dataset is the one
    ``mondeq train`` recorded (``metadata["dataset"]``); without it, the classes are compared
    unless the checkpoint names them ``"0"`` … ``"K-1"`` (an import that named none).
    ``--dataset synthetic`` (a smoke test of the command) is let through.

    Raises:
        ValueError: one line naming both datasets.
    """
    from .data import DATASETS

    if data.name == "synthetic":
        return
    trained = model.metadata.get("dataset")
    if isinstance(trained, str) and trained in DATASETS and trained != data.name:
        raise ValueError(
            f"{path} was trained on {trained}, not {data.name}: pass --dataset {trained}"
        )
    names = tuple(model.input_spec.class_names)
    if names != tuple(str(i) for i in range(len(names))) and names != tuple(data.class_names):
        raise ValueError(
            f"{path} classifies {', '.join(names[:3])}, …; {data.name}'s classes are "
            f"{', '.join(data.class_names[:3])}, …: evaluate it on the dataset it was trained on"
        )


def _shown(value) -> str:
    """An option value as a user would write it (``None``: the preset's default)."""
    if value is None:
        return "the preset's default"
    return str(value).lower() if isinstance(value, bool) else str(value)


def _resume_state(model, path: Path) -> dict:
    """The training state of a loaded ``last.pt``, checked before anything is built from it.

    Raises:
        CheckpointError: no training state, a malformed one, or weights of another model than
            the run's preset builds (a run from a version whose preset has since changed).
    """
    import torch

    from model_core import CheckpointError
    from model_core.models import normalize_config

    from .presets import get_preset

    saved = model.training_state
    if not saved:
        raise CheckpointError(f"{path}: holds no training state to resume")
    if not isinstance(saved, dict):
        raise CheckpointError(f"{path}: its training state is not a mapping")
    options, optimizer, progress = (saved.get(k) for k in ("options", "optimizer", "progress"))
    ok = (
        isinstance(options, dict)
        and isinstance(optimizer, dict)
        and isinstance(optimizer.get("state"), dict)
        and isinstance(optimizer.get("param_groups"), list)
        and isinstance(progress, dict)
        and all(_count(progress.get(k)) for k in ("epoch", "step"))
        and isinstance(progress.get("history"), list)
        and len(progress["history"]) == progress["epoch"]
        and isinstance(progress.get("sums"), dict | None)
        and all(isinstance(progress.get(k), int | float) for k in ("best", "elapsed"))
    )
    if not ok:
        raise CheckpointError(f"{path}: its training state is malformed")
    moments = [
        v
        for state in optimizer["state"].values()
        if isinstance(state, dict)
        for v in state.values()
        if isinstance(v, torch.Tensor) and v.is_floating_point()
    ]
    if not all(bool(torch.isfinite(v).all()) for v in moments):
        # Resumed, the first step would make the weights non-finite and be reported as a
        # divergence with "lower --lr", which no --lr cures.
        raise CheckpointError(f"{path}: its optimizer state holds NaN or inf")
    try:
        preset = get_preset(options.get("preset"))
        spec = model.input_spec
        built = normalize_config(preset.model_config(spec.shape, len(spec.class_names)))
    except (ValueError, TypeError, KeyError) as e:
        raise CheckpointError(f"{path}: its training options do not build a model: {e}") from None
    ours = {k: v for k, v in model.config.items() if k != "solver"}
    if {k: v for k, v in built.items() if k != "solver"} != ours:
        raise CheckpointError(
            f"{path}: its weights are a {model.arch} model {ours}, preset {preset.name} now "
            "builds another; train afresh"
        )
    return saved


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _dist_timeout(text: str) -> float:
    """argparse type: seconds in (0, 604800]; a week is beyond any healthy wait between ranks."""
    value = positive_float(text)
    if value > 7 * 24 * 3600:
        raise argparse.ArgumentTypeError(f"must be at most 604800 (a week), got {text!r}")
    return value


def _rank() -> int:
    """This process's rank under ``--nproc`` / torchrun, else 0."""
    return int(os.environ.get("RANK", "0"))


def _check_world(options, nproc: int) -> None:
    """What every rank would refuse, refused once before the ranks start."""
    from .presets import get_preset

    batch = options.batch_size
    batch = get_preset(options.preset).batch_size if batch is None else batch
    if batch % nproc:
        raise ValueError(f"batch size {batch} must divide evenly over {nproc} processes")
    import torch

    name = options.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type != "cuda":
        return
    # nccl refuses two ranks on one GPU ("Duplicate GPU detected") at the first collective.
    if not torch.cuda.is_available():
        raise ValueError(f"--device {options.device}, but no CUDA device is available")
    if device.index is not None:
        raise ValueError(
            f"--device {options.device} puts all {nproc} processes on one GPU; nccl needs one "
            "GPU per process: pass --device cuda"
        )
    count = torch.cuda.device_count()
    if nproc > count:
        raise ValueError(
            f"--nproc {nproc} needs {nproc} CUDA devices (nccl: one per process), this machine "
            f"has {count}; pass --device cpu to run the processes on the CPU"
        )


def _launch(args, out: Path) -> int:
    """Re-run this command as ``--nproc`` ranks (:func:`training.launch.launch`)."""
    from .launch import launch

    argv = []
    for name, (flag, _, _) in _TRAIN_FLAGS.items():
        if getattr(args, name) is not None:
            argv += [flag, str(getattr(args, name))]
    if args.download:
        argv.append("--download")
    if args.tune_alpha is False:
        argv.append("--no-tune-alpha")
    if args.progress is False:
        argv.append("--no-progress")
    if args.config:
        argv += ["--config", str(args.config)]
    if args.resume:
        argv += ["--resume", str(args.resume)]
    if args.overwrite:
        argv.append("--overwrite")
    if args.dist_timeout is not None:
        argv += ["--dist-timeout", repr(args.dist_timeout)]
    return launch(argv, args.nproc, out=out, timeout_s=args.dist_timeout)


# ---- eval ---------------------------------------------------------------------------------


def evaluate(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="test accuracy, solver iterations, Lipschitz bound and certified accuracy",
        description="Evaluate a checkpoint on a dataset's test split, normalised with the "
        "checkpoint's own input spec.",
    )
    p.add_argument("checkpoint", type=Path, metavar="CHECKPOINT")
    p.add_argument("--dataset", required=True, help="mnist, fashion-mnist, svhn, cifar10, ...")
    p.add_argument("--data-dir", default=None, help="dataset root (torchvision layout)")
    p.add_argument("--download", action="store_true", help="fetch missing data")
    p.add_argument("--device", default="auto", help="auto (default), cpu or cuda")
    p.add_argument("--batch-size", type=positive_int, default=500, metavar="N",
                   help="test images per batched solve (default 500)")  # fmt: skip
    p.add_argument(
        "--eval-limit",
        type=positive_int,
        default=None,
        metavar="N",
        help="evaluate on the first N test samples only (as train's --eval-limit)",
    )
    p.add_argument("--limit", dest="eval_limit", type=positive_int, help=argparse.SUPPRESS)
    p.add_argument("--radii", type=_radii, default=_radii("0.05,0.1,0.25,0.5"),
                   help="ℓ2 radii for certified accuracy")  # fmt: skip
    p.add_argument("--method", default=None, choices=sorted(SOLVERS), help="solver override")
    p.add_argument("--alpha", type=positive_float, default=None, help="α override")
    p.add_argument("--tol", type=tolerance, default=None,
                   help="tolerance override, in (0, 1]")  # fmt: skip
    p.add_argument("--max-iter", type=positive_int, default=None, help="iteration cap override")
    p.add_argument(
        "--stop",
        choices=STOP_RULES,
        default=None,
        help="when a sample stops iterating: tol (residual <= tol, the default), "
        "label (its label is proven) or logits (every logit within --logit-tol of "
        "the exact equilibrium's); --max-iter caps all three (docs/math.md §9)",
    )
    p.add_argument(
        "--logit-tol",
        type=positive_float,
        default=None,
        metavar="LOGITS",
        help="absolute logit accuracy of --stop logits (logit units)",
    )
    p.add_argument(
        "--check-every",
        type=positive_int,
        default=None,
        metavar="ITERATIONS",
        help="iterations between two checks of --stop label/logits (default 1)",
    )
    p.add_argument(
        "--compare-stops",
        action="store_true",
        help="evaluate the same images under tol, label (and logits with "
        "--logit-tol) and print one line per rule",
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=_run_eval)


def _stop_rules(args) -> list:
    """The stopping rules ``mondeq eval`` runs.

    Raises:
        ValueError: flags that contradict each other (one would be silently ignored).
    """
    from .evaluate import StopRule

    every = args.check_every or 1
    if args.compare_stops:
        if args.stop is not None:
            raise ValueError("--compare-stops runs every stopping rule: drop --stop")
        rules = [StopRule("tol"), StopRule("label", check_every=every)]
        if args.logit_tol is not None:
            rules.append(StopRule("logits", args.logit_tol, every))
        return rules
    stop = args.stop or "tol"
    if args.logit_tol is not None and stop != "logits":
        raise ValueError(f"--logit-tol applies only to --stop logits (stop: {stop})")
    if stop == "logits" and args.logit_tol is None:
        raise ValueError("--stop logits needs --logit-tol (an absolute logit accuracy)")
    if args.check_every is not None and stop == "tol":
        raise ValueError("--check-every applies only to --stop label or logits (stop: tol)")
    return [StopRule(stop, args.logit_tol, every)]


def _radii(text: str) -> tuple[float, ...]:
    """argparse type: comma-separated finite radii >= 0, at least one."""
    parts = [r.strip() for r in text.split(",") if r.strip()]
    if not parts:
        raise argparse.ArgumentTypeError(f"must be comma-separated radii >= 0, got {text!r}")
    return tuple(nonnegative_float(r) for r in parts)


def _run_eval(args) -> int:
    from model_core import CheckpointError, load_checkpoint

    from .data import DataError, load_dataset
    from .distributed import pick_device
    from .evaluate import compare_stops, format_comparison, format_report

    try:
        rules = _stop_rules(args)
        device = pick_device(args.device)
        model = load_checkpoint(args.checkpoint, map_location=device)
        pairs = {"method": args.method, "alpha": args.alpha, "tol": args.tol}
        overrides = {k: v for k, v in {**pairs, "max_iter": args.max_iter}.items() if v is not None}
        if overrides:
            model.set_solver(**overrides)
        spec = model.input_spec
        data = load_dataset(args.dataset, args.data_dir, download=args.download,
                            shape=spec.shape)  # fmt: skip
        if data.shape != spec.shape:
            raise ValueError(
                f"{args.checkpoint} expects input {list(spec.shape)}, "
                f"{data.name} has {list(data.shape)}"
            )
        if len(spec.class_names) != len(data.class_names):
            raise ValueError(
                f"{args.checkpoint} has {len(spec.class_names)} classes, {data.name} has "
                f"{len(data.class_names)}"
            )
        _check_same_task(args.checkpoint, model, data)
        x, y = data.test_x, data.test_y
        if args.eval_limit is not None:
            if args.eval_limit > len(x):
                raise ValueError(
                    f"--eval-limit {args.eval_limit} is more than the {len(x):,} test samples "
                    f"of {data.name}"
                )
            x, y = x[: args.eval_limit], y[: args.eval_limit]
        rows = compare_stops(
            model,
            x,
            y,
            rules,
            batch_size=args.batch_size,
            radii=args.radii,
            progress=not args.json,
        )
    except (CheckpointError, DataError, ValueError) as e:
        print(f"mondeq eval: {e}", file=sys.stderr)
        return 2
    where = {"dataset": data.name, "checkpoint": str(args.checkpoint)}
    if args.compare_stops:
        text = format_comparison(data.name, rows)
        out = {"samples": rows[0]["samples"], **where, "rules": rows}
    else:
        text = format_report(data.name, rows[0])
        out = {**rows[0], **where}
    print(json.dumps(out, indent=2) if args.json else text)
    return 0
