"""From checked options to what the loop trains: data, model (with its input spec), optimizer.

:func:`build` resolves the preset's defaults, loads and checks the data, builds the model and
Adam (or restores them from ``last.pt`` on ``--resume``), and wraps the model in
DistributedDataParallel when there are several processes. It writes nothing, so every
refusal here leaves the run folder as it was.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model_core import MonDEQClassifier, build_model
from model_core.config import InputSpec

from . import distributed
from .data import DATASETS, Data, DataError, load_dataset
from .options import TrainOptions
from .presets import Preset, get_preset
from .runfolder import RunFolder

CALIBRATION_SAMPLES = 64  # training images stored in checkpoints for the server's α search


@dataclass
class Setup:
    """A run, resolved and built: everything :func:`training.loop.train` works on.

    ``epochs``, ``batch_size`` (global, over all processes) and ``lr`` are the options' values
    or the preset's. ``model.input_spec`` holds the training split's per-channel mean and std
    and normalises every batch (:meth:`InputSpec.normalize
    <model_core.config.InputSpec.normalize>`). ``net`` is ``model`` itself or its DDP
    wrapper. ``calibration`` is uint8 ``(64, C, H, W)``; ``test_x`` uint8 ``(N, C, H, W)``
    and ``test_y`` int64 ``(N,)`` are the test split cut to ``--eval-limit``. ``progress`` is
    the loop's position and history (``epoch``, ``step``, ``sums``, ``history``, ``best``,
    ``elapsed`` in s), saved in ``last.pt``.
    """

    opts: TrainOptions
    preset: Preset
    data: Data
    epochs: int
    batch_size: int
    lr: float
    dist: distributed.Dist
    files: RunFolder
    model: MonDEQClassifier
    net: torch.nn.Module
    optimizer: torch.optim.Optimizer
    calibration: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    progress: dict


def steps_in_epoch(n: int, batch_size: int, cap: int | None) -> int:
    """Optimizer steps in an epoch of ``n`` samples: full batches only, at most ``cap``."""
    steps = n // batch_size  # the last partial batch is dropped, as in DistributedSampler
    return steps if cap is None else min(steps, cap)


def build(
    opts: TrainOptions, dist: distributed.Dist, *, resume: bool, overwrite: bool = False
) -> Setup:
    """Everything the run needs, built (on ``resume``: restored from ``last.pt``).

    Raises:
        DataError: the data cannot be read, or a channel of the training images is constant.
        ValueError: the batch does not divide over the processes or exceeds the training
            split, ``--eval-limit`` exceeds the test split, or ``last.pt`` stopped at a step
            its epoch no longer has.
        CheckpointError: ``last.pt`` does not load.
    """
    preset = get_preset(opts.preset)
    data = _load_data(opts, preset)
    # None is "not given": the preset's value. Anything given was checked by TrainOptions.
    batch = preset.batch_size if opts.batch_size is None else opts.batch_size
    epochs = preset.epochs if opts.epochs is None else opts.epochs
    lr = preset.lr if opts.lr is None else opts.lr
    _check_sizes(opts, data, batch, dist.world)
    mean, std = data.channel_stats()
    flat = [c for c, s in enumerate(std) if not s > 0]
    if flat:  # normalising would divide by zero: a NaN loss at step 1, not a too-high --lr
        raise DataError(
            f"{data.name} from {data.source}: channel {flat[0]} of the training images is "
            "constant (std 0), so it cannot be normalised"
        )
    torch.manual_seed(opts.seed)
    model = build_model(preset.model_config(data.shape, len(data.class_names)))
    model.input_spec = InputSpec(data.shape, mean, std, data.class_names)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    files = RunFolder(opts.out, overwrite=overwrite)
    progress = {"epoch": 0, "step": 0, "sums": None, "history": [], "best": -1.0, "elapsed": 0.0}
    if resume:
        progress = files.resume_into(model, optimizer)
        steps = steps_in_epoch(len(data.train_x), batch, opts.steps_per_epoch)
        if progress["step"] >= max(steps, 1):  # a written last.pt stops before an epoch's end
            raise ValueError(
                f"cannot resume: {files.last} is at step {progress['step']} of an epoch of "
                f"{steps} steps"
            )
    device = dist.device
    model.to(device)
    _optimizer_to_device(optimizer, device)
    net = (
        torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
        if dist.enabled
        else model
    )
    pick = torch.randperm(len(data.train_x), generator=torch.Generator().manual_seed(opts.seed))
    test_x, test_y = data.test_x, data.test_y
    if opts.eval_limit is not None:
        test_x, test_y = test_x[: opts.eval_limit], test_y[: opts.eval_limit]
    return Setup(
        opts=opts,
        preset=preset,
        data=data,
        epochs=epochs,
        batch_size=batch,
        lr=lr,
        dist=dist,
        files=files,
        model=model,
        net=net,
        optimizer=optimizer,
        calibration=data.train_x[pick[:CALIBRATION_SAMPLES]],
        test_x=test_x,
        test_y=test_y,
        progress=progress,
    )


def _load_data(opts: TrainOptions, preset: Preset) -> Data:
    name = preset.dataset if opts.dataset is None else opts.dataset
    return load_dataset(
        name,
        opts.data_dir,
        download=opts.download,
        shape=DATASETS[preset.dataset][0],
        synthetic_size=opts.synthetic_size,
        seed=opts.seed,
    )


def _check_sizes(opts: TrainOptions, data: Data, batch: int, world: int) -> None:
    if batch % world:
        raise ValueError(f"batch size {batch} must divide evenly over {world} processes")
    if len(data.train_x) < batch:
        raise ValueError(f"{len(data.train_x)} training samples cannot fill a batch of {batch}")
    if opts.eval_limit is not None and opts.eval_limit > len(data.test_x):
        raise ValueError(
            f"--eval-limit {opts.eval_limit} is more than the {len(data.test_x):,} test samples "
            f"of {data.name}"
        )


def _optimizer_to_device(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    # Adam's step count stays on the CPU, as torch keeps it.
    for state in optimizer.state.values():
        for k, v in state.items():
            if isinstance(v, torch.Tensor) and k != "step":
                state[k] = v.to(device)


__all__ = ["CALIBRATION_SAMPLES", "Setup", "build", "steps_in_epoch"]
