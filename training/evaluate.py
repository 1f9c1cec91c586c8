"""Test-set evaluation: accuracy, solver statistics, Lipschitz bound, certified accuracy."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from model_core import MonDEQClassifier

from .distributed import Dist

DEFAULT_RADII = (0.05, 0.1, 0.25, 0.5)


@torch.no_grad()
def evaluate(
    model: MonDEQClassifier,
    x: Tensor,
    y: Tensor,
    *,
    batch_size: int = 500,
    radii: tuple[float, ...] = DEFAULT_RADII,
    dist: Dist | None = None,
    progress: bool = False,
) -> dict:
    """Classify uint8 images ``x (N, C, H, W)`` against labels ``y (N,)``.

    Images are normalised by the model's input spec (:meth:`InputSpec.normalize
    <model_core.config.InputSpec.normalize>`) on the model's device, ``batch_size`` at a time.

    Under DDP each rank takes the samples ``rank::world`` and the per-sample results are
    gathered, so every rank returns the same numbers.

    Returns:
        ``accuracy``, ``loss``, ``iterations_{mean,p50,p99,max}``, ``residual_mean``,
        ``converged_share`` (true fixed-point residual ≤ tol), ``lipschitz``, ``certified``
        (radius → certified accuracy: correct, and a certified ℓ2 radius ≥ r,
        docs/math.md §7, §9: a radius only where the label is proven, shrunk by the error
        bound, so a loose ``--tol`` certifies nothing off the equilibrium), ``samples``.
    """
    device = next(model.parameters()).device
    dist = dist or Dist(device=device)
    index = torch.arange(dist.rank, len(x), dist.world)
    rows: dict[str, list[Tensor]] = {k: [] for k in ("correct", "loss", "it", "res", "conv", "rad")}
    batches = range(0, len(index), batch_size)
    if progress and dist.is_main:
        from tqdm import tqdm

        batches = tqdm(batches, desc="eval", leave=False, dynamic_ncols=True)
    for start in batches:
        idx = index[start : start + batch_size]
        target = y[idx].to(device)
        r = model.infer(model.input_spec.normalize(x[idx].to(device, non_blocking=True)))
        rows["correct"].append((r.labels == target).cpu())
        rows["loss"].append(F.cross_entropy(r.logits, target, reduction="none").cpu())
        rows["it"].append(r.stats.iterations.cpu())
        rows["res"].append(r.stats.residual.cpu())
        rows["conv"].append(r.stats.converged.cpu())
        rows["rad"].append(r.certified_radius.cpu())
    cat = {k: dist.gather_cat(torch.cat(v) if v else torch.empty(0)) for k, v in rows.items()}
    correct, it = cat["correct"].double(), cat["it"].double()
    n = len(correct)
    if n == 0:
        raise ValueError("evaluation set is empty")
    res = cat["res"][~cat["res"].isnan()].double()
    return {
        "samples": n,
        "accuracy": correct.mean().item(),
        "loss": cat["loss"].double().mean().item(),
        "iterations_mean": it.mean().item(),
        "iterations_p50": it.quantile(0.5).item(),
        "iterations_p99": it.quantile(0.99).item(),
        "iterations_max": int(it.max().item()),
        "residual_mean": res.mean().item() if len(res) else float("nan"),
        "converged_share": cat["conv"].double().mean().item(),
        "lipschitz": model.lipschitz_bound(),
        "certified": {
            f"{r:g}": ((cat["rad"] >= r) & cat["conv"] & cat["correct"]).double().mean().item()
            for r in radii
        },
    }


def format_report(name: str, m: dict) -> str:
    """Human-readable lines for ``mondeq eval``."""
    lines = [
        f"{name}: {m['samples']:,} test samples",
        f"  accuracy          {100 * m['accuracy']:.2f}%",
        f"  iterations        mean {m['iterations_mean']:.2f}, p50 {m['iterations_p50']:.0f}, "
        f"p99 {m['iterations_p99']:.0f}, max {m['iterations_max']}",
        f"  residual (mean)   {m['residual_mean']:.3g}",
        f"  converged         {100 * m['converged_share']:.2f}%",
        f"  Lipschitz bound   {m['lipschitz']:.4g}",
        "  certified accuracy (ℓ2 radius):",
    ]
    lines += [f"    ε = {r:<6} {100 * a:.2f}%" for r, a in m["certified"].items()]
    return "\n".join(lines)
