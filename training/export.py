"""``mondeq export``: turn a training run into a served model with its model card.

Writes ``MODELS/<name>/<version>/``:

* ``model.pt``: the checkpoint without training state (optimizer, history), calibration
  batch kept so the server can tune α at load;
* ``card.json``: machine-readable card (the service reads ``test_accuracy`` from it);
* ``README.md``: the model card for people; ``curves.png``: the training curves.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from model_core import CheckpointError, load_checkpoint, save_checkpoint
from model_core.files import atomic_write

# What the server loads: service.repository's NAME_RE and VERSION_RE (1 to 9 digits), and it
# skips folders ending in a temporary-file suffix.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
TEMP_SUFFIXES = (".tmp", ".temp", ".part", ".partial", ".new", "~")
MAX_VERSION = 999_999_999


def export(sub) -> None:
    p = sub.add_parser(
        "export",
        help="write a run's model, card and curves into a model repository",
        description="Export a training run (its last or best checkpoint) to "
        "MODELS/NAME/VERSION/{model.pt,card.json,README.md,curves.png} for `mondeq serve`.",
    )
    p.add_argument("run", type=Path, metavar="RUN", help="run folder written by `mondeq train`")
    p.add_argument("--which", choices=["last", "best"], default="last",
                   help="last (default: the final epoch) or best (best test accuracy)")  # fmt: skip
    p.add_argument("--name", default=None, help="model name (default: the preset)")
    p.add_argument("--version", type=int, default=1,
                   help=f"version number, 1 to {MAX_VERSION:,} (default 1)")  # fmt: skip
    p.add_argument(
        "--model-dir",
        type=Path,
        default=Path("models"),
        metavar="DIR",
        help="model repository to write into (default: models; as serve's)",
    )
    # The former name, hidden: bench's --models names presets.
    p.add_argument("--models", dest="model_dir", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--note", default=None, help="a remark for the model card")
    p.add_argument("--force", action="store_true",
                   help="replace a published version (refused without it)")  # fmt: skip
    p.set_defaults(handler=_run_export)


def check_export_args(name: str | None, version: int, models: Path) -> None:
    """Refuse a name, version or repository root the server would not serve from.

    Raises:
        ValueError: one line naming the flag.
    """
    if name is not None and (not NAME_RE.match(name) or name.endswith(TEMP_SUFFIXES)):
        raise ValueError(
            f"--name {name!r}: a model name is 1-128 letters, digits, '.', '_' or '-', "
            f"starting with a letter or digit and not ending in {'/'.join(TEMP_SUFFIXES)}"
        )
    if not 1 <= version <= MAX_VERSION:
        raise ValueError(f"--version must be an integer in [1, {MAX_VERSION}], got {version}")
    if models.exists() and not models.is_dir():
        raise ValueError(f"--model-dir {models} is not a folder")


def _run_export(args) -> int:
    try:
        check_export_args(args.name, args.version, args.model_dir)
        folder = export_run(args.run, args.model_dir, name=args.name, version=args.version,
                            which=args.which, note=args.note, force=args.force)  # fmt: skip
    except (CheckpointError, ValueError) as e:
        print(f"mondeq export: {e}", file=sys.stderr)
        return 2
    print(f"wrote {folder}")
    return 0


def export_run(
    run: Path,
    models: Path,
    *,
    name: str | None = None,
    version: int = 1,
    which: str = "last",
    note: str | None = None,
    force: bool = False,
) -> Path:
    """Export ``run/<which>.pt`` to ``models/<name>/<version>/``; returns that folder.

    The version is written in full to a hidden folder beside it (same file system, a name the
    server skips) and then renamed into place, so a server polling the repository sees the
    old version or the new one, never part of one.

    Raises:
        ValueError: the checkpoint holds no finished epoch, the version is already published
            and ``force`` is not set (nothing is written), or it cannot be published.
        CheckpointError: the run's checkpoint does not load.
    """
    model = load_checkpoint(run / f"{which}.pt")
    meta = dict(model.metadata)
    if not meta.get("metrics"):
        # A run stopped before its first epoch ended: weights nobody has evaluated, and a
        # card without accuracy or iterations.
        raise ValueError(
            f"{run / f'{which}.pt'} was written before the run's first epoch ended, so there "
            f"is no tested model to publish; continue it with `mondeq train --resume {run}`"
        )
    history = (load_checkpoint(run / "last.pt").training_state or {}).get("progress", {})
    history = history.get("history", [])
    if name is None:
        name = meta.get("preset")
        if not name:
            raise ValueError("the checkpoint names no preset; pass --name")
        check_export_args(name, version, models)
    # Their copies for readers of schema 1; model.pt keeps the calibration batch, not the
    # training state.
    meta.pop("train", None)
    meta.pop("calibration", None)
    meta.pop("package_version", None)
    folder = models / name / str(version)
    if not force and _published(folder):
        raise ValueError(
            f"{folder} is already published; pass --force to replace it or choose another --version"
        )
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{version}.", suffix=".tmp", dir=folder.parent))
    except OSError as e:
        raise ValueError(f"cannot write into {folder.parent}: {e.strerror}") from None
    old = None
    try:
        os.chmod(staging, 0o777 & ~_umask())  # mkdtemp makes 0700; the server must read it
        _write_version(staging, model, meta, run, history, name, version, which, note)
        old = _publish(staging, folder, replace=force)
    finally:
        for leftover in (staging, old):  # on success: nothing, or the replaced version
            if leftover is not None:
                shutil.rmtree(leftover, ignore_errors=True)
    return folder


def _write_version(folder, model, meta, run, history, name, version, which, note) -> None:
    save_checkpoint(model, folder / "model.pt", calibration=model.calibration, **meta)
    metrics = meta.get("metrics") or {}
    epoch_times = [r["epoch_time_s"] for r in history if "epoch_time_s" in r]
    card = {
        "name": name,
        "version": version,
        "preset": meta.get("preset"),
        "dataset": meta.get("dataset"),
        "architecture": model.arch,
        "parameters": model.num_parameters(),
        "command": meta.get("command"),
        "seed": meta.get("seed"),
        "epochs": meta.get("epoch"),
        "test_accuracy": metrics.get("test_accuracy"),
        "mean_iterations": metrics.get("test_iterations_mean"),
        "p99_iterations": metrics.get("test_iterations_p99"),
        "mean_residual": metrics.get("test_residual_mean"),
        "lipschitz_bound": model.lipschitz_bound(),
        "certified_accuracy": metrics.get("certified"),
        "alpha": model.solver_settings.alpha,
        "solver": model.solver_settings.to_dict(),
        "train_time_s": meta.get("train_time_s"),
        "seconds_per_epoch": statistics.median(epoch_times) if epoch_times else None,
        "machine": meta.get("machine"),
        "package_version": model.metadata.get("package_version"),
        "checkpoint": which,
        "note": note,
    }
    # Each file is on disk (fsync) before the folder is renamed into place.
    atomic_write(folder / "card.json", (json.dumps(card, indent=2) + "\n").encode())
    atomic_write(folder / "README.md", _card_markdown(card, history).encode())
    if (run / "curves.png").is_file():
        atomic_write(folder / "curves.png", (run / "curves.png").read_bytes())


def _published(folder: Path) -> bool:
    """Anything at ``folder`` other than an empty directory counts as a published version."""
    if not folder.exists():
        return False
    return not folder.is_dir() or any(folder.iterdir())


def _publish(staging: Path, folder: Path, *, replace: bool) -> Path | None:
    """Rename the complete ``staging`` folder to ``folder`` in one step.

    A plain rename(2) refuses a non-empty target, so two exports racing for one version
    cannot both publish. With ``replace`` an existing version is swapped out atomically
    (renameat2 ``RENAME_EXCHANGE``, Linux 3.15+); where the file system lacks it, it is moved
    aside first and the version is briefly absent, never half-written.

    Returns:
        The folder now holding the replaced version (to delete), or None.
    """
    try:
        if not (replace and folder.exists()):
            os.rename(staging, folder)
            return None
        if _rename_exchange(staging, folder):
            return staging
        aside = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".old.tmp",
                                      dir=folder.parent))  # fmt: skip
        os.rename(folder, aside / folder.name)
        os.rename(staging, folder)
        return aside
    except OSError as e:
        if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise ValueError(
                f"{folder} was published meanwhile; pass --force to replace it"
            ) from None
        raise ValueError(f"cannot publish {folder}: {e.strerror}") from None


def _rename_exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically; False where the OS or file system cannot."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # not Linux, or a libc before glibc 2.28
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _backward_alpha(solver: dict) -> str:
    a = solver.get("backward_alpha")
    return "" if a is None else f" (backward {a:.3g})"


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.2f}%"


def _card_markdown(card: dict, history: list[dict]) -> str:
    cert = card.get("certified_accuracy") or {}
    lines = [
        f"# {card['name']} (version {card['version']})",
        "",
        f"A monDEQ {card['architecture']} classifier ({card['parameters']:,} parameters) trained "
        f"on {card['dataset']} with this package's `mondeq train`.",
        "",
        "| | |",
        "|---|---|",
        f"| command | `{card['command']}` |",
        f"| seed | {card['seed']} |",
        f"| epochs | {card['epochs']} |",
        f"| test accuracy | {_pct(card['test_accuracy'])} |",
        f"| forward iterations (test, mean / p99) | {card['mean_iterations']:.2f} / "
        f"{card['p99_iterations']:.0f} |",
        f"| solver | {card['solver']['method']}, α {card['alpha']:.3g}"
        + _backward_alpha(card["solver"])
        + ", tol "
        f"{card['solver']['tol']:g}, max_iter {card['solver']['max_iter']} |",
        f"| Lipschitz bound (ℓ2, logits) | {card['lipschitz_bound']:.4g} |",
        "| certified accuracy (ℓ2 ε) | "
        + ", ".join(f"{r}: {_pct(a)}" for r, a in cert.items())
        + " |",
        f"| training time | {card['train_time_s'] / 60:.1f} min "
        f"({card['seconds_per_epoch']:.1f} s per epoch, median; evaluation excluded) |",
        f"| machine | {card['machine']} |",
        f"| package version | {card['package_version']} |",
        "",
    ]
    if card.get("note"):
        lines += [card["note"], ""]
    if history:
        lines += [
            "## Per epoch",
            "",
            "| epoch | train loss | test acc | fwd it | bwd it | α | s |",
            "|---:|---:|---:|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {r['epoch']} | {r['train_loss']:.4f} | {_pct(r['test_accuracy'])} | "
            f"{r['train_fwd_iterations']:.1f} | {r['train_bwd_iterations']:.1f} | "
            f"{r['alpha']:.3g} | {r['epoch_time_s']:.1f} |"
            for r in history
        ]
        lines += ["", "![training curves](curves.png)", ""]
    return "\n".join(lines)
