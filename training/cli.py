"""``mondeq presets``, ``mondeq train`` and ``mondeq eval`` (registered as entry points)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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
    p.add_argument("--nproc", type=int, default=1,
                   help="processes for DistributedDataParallel (runs torchrun)")  # fmt: skip
    p.set_defaults(handler=_run_train)


def read_config(path: Path) -> dict:
    """Options from a TOML or YAML file, keys with dashes or underscores."""
    try:
        text = path.read_text()
    except OSError as e:
        raise ValueError(f"cannot read config {path}: {e.strerror}") from None
    try:
        if path.suffix == ".toml":
            import tomllib

            raw = tomllib.loads(text)
        else:
            import yaml

            raw = yaml.safe_load(text) or {}
    except Exception as e:
        raise ValueError(f"config {path} does not parse: {e}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"config {path} must be a mapping of options")
    return {str(k).replace("-", "_"): v for k, v in raw.items()}


def _cli_options(args) -> dict:
    names = [*_TRAIN_FLAGS, "download", "tune_alpha", "progress"]
    return {k: getattr(args, k) for k in names if getattr(args, k) is not None}


def _run_train(args) -> int:
    from model_core import CheckpointError, load_checkpoint

    from .data import DataError
    from .trainer import Interrupted, TrainOptions, command_line
    from .trainer import train as run

    try:
        if args.nproc > 1:
            return _launch_torchrun(args)
        given = _cli_options(args)
        if args.resume is not None:
            try:
                saved = load_checkpoint(args.resume / "last.pt").metadata.get("train")
            except CheckpointError as e:
                raise ValueError(f"cannot resume: {e}") from None
            if not saved:
                raise ValueError(f"{args.resume / 'last.pt'} holds no training state to resume")
            changeable = {"epochs", "device", "progress", "data_dir", "eval_limit"}
            fixed = sorted(set(given) - changeable - {"out"})
            if fixed:
                raise ValueError(f"--resume keeps the run's options; cannot change {fixed}")
            opts = {**saved["options"], **given, "out": str(args.resume)}
        else:
            opts = {**(read_config(args.config) if args.config else {}), **given}
            for required in ("preset", "out"):
                if not opts.get(required):
                    raise ValueError(f"--{required} is required (or give it in --config)")
            opts.setdefault("command", command_line())
        metrics = run(TrainOptions.from_dict(opts), resume=args.resume is not None)
    except Interrupted as e:
        print(f"mondeq train: {e}", file=sys.stderr)
        return 128 + e.signum
    except (DataError, ValueError) as e:
        print(f"mondeq train: {e}", file=sys.stderr)
        return 2
    if metrics:
        print(json.dumps(metrics))
    return 0


def _launch_torchrun(args) -> int:
    """Re-run this command under ``torch.distributed.run`` with ``--nproc`` processes."""
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
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={args.nproc}", "-m", "training", *argv]  # fmt: skip
    return subprocess.call(cmd)


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
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--limit", type=int, default=None, help="first N test samples only")
    p.add_argument("--radii", default="0.05,0.1,0.25,0.5", help="ℓ2 radii for certified accuracy")
    p.add_argument("--method", default=None, help="solver override")
    p.add_argument("--alpha", type=float, default=None, help="α override")
    p.add_argument("--tol", type=float, default=None, help="tolerance override")
    p.add_argument("--max-iter", type=int, default=None, help="iteration cap override")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=_run_eval)


def _run_eval(args) -> int:
    from model_core import CheckpointError, load_checkpoint

    from .data import DataError, Normalizer, load_dataset
    from .distributed import pick_device
    from .evaluate import evaluate as run
    from .evaluate import format_report

    try:
        radii = tuple(float(r) for r in args.radii.split(",") if r.strip())
        device = pick_device(args.device)
        model = load_checkpoint(args.checkpoint, map_location=device)
        pairs = {"method": args.method, "alpha": args.alpha, "tol": args.tol}
        overrides = {k: v for k, v in {**pairs, "max_iter": args.max_iter}.items() if v is not None}
        if overrides:
            model.set_solver(**overrides)
        spec = model.input_spec
        data = load_dataset(args.dataset, args.data_dir, download=args.download,
                            shape=tuple(spec["shape"]))  # fmt: skip
        if list(data.shape) != list(spec["shape"]):
            raise ValueError(
                f"{args.checkpoint} expects input {spec['shape']}, "
                f"{data.name} has {list(data.shape)}"
            )
        x, y = data.test_x, data.test_y
        if args.limit:
            x, y = x[: args.limit], y[: args.limit]
        metrics = run(model, x, y, Normalizer(spec["mean"], spec["std"], device),
                      batch_size=args.batch_size, radii=radii, progress=not args.json)  # fmt: skip
    except (CheckpointError, DataError, ValueError) as e:
        print(f"mondeq eval: {e}", file=sys.stderr)
        return 2
    metrics["dataset"] = data.name
    metrics["checkpoint"] = str(args.checkpoint)
    print(json.dumps(metrics, indent=2) if args.json else format_report(data.name, metrics))
    return 0
