"""The checkpoint as every server in the benchmark serves it: loaded with model_core, α tuned
on the checkpoint's calibration batch as ``mondeq serve`` tunes it at load, warmed up.

Imported by the peers' servers (run from this folder in the peers' virtual environment) and by
``bench/service_load.py`` for the in-process limit, so the three solve with the same α.
"""

from __future__ import annotations

from pathlib import Path

import torch

from model_core import MonDEQClassifier, load_checkpoint, tune_alpha


def latest_checkpoint(folder: Path) -> Path:
    """``folder/<highest version>/model.pt`` of a model folder in a repository.

    Raises:
        SystemExit: no ``<version>/model.pt`` inside.
    """
    versions = sorted((int(p.name), p) for p in folder.iterdir() if p.name.isdigit())
    if not versions:
        raise SystemExit(f"{folder}: no <version>/model.pt inside")
    return versions[-1][1] / "model.pt"


def calibration_pixels(model: MonDEQClassifier, n: int = 64) -> torch.Tensor:
    """``(n, C, H, W)`` pixels in [0, 1]: the checkpoint's calibration batch, else noise."""
    cal = model.calibration
    if isinstance(cal, torch.Tensor) and cal.dim() == 4:
        return (cal.float() / 255.0 if cal.dtype == torch.uint8 else cal.float())[:n]
    return torch.rand(n, *model.input_spec.shape, generator=torch.Generator().manual_seed(0))


def served_model(checkpoint: Path, device: str) -> MonDEQClassifier:
    """The model at ``checkpoint`` on ``device`` with α tuned as the server tunes it at load
    (``tune_alpha`` on the calibration batch, for a tunable solver), after one warm solve."""
    model = load_checkpoint(checkpoint, map_location=device)
    x = model.input_spec.normalize(calibration_pixels(model)).to(device)
    s = model.solver_settings
    if s.solver.tunable_alpha:
        model.set_solver(alpha=tune_alpha(model, x, method=s.method).alpha)
    model.infer(x)  # the resolvent and the allocator, before the first request
    return model
