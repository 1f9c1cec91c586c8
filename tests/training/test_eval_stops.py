"""`mondeq eval` under each stopping rule (docs/math.md §9): the proven share, the error
bounds and the iterations of tol, label and logits, alone (``--stop``) or side by side on the
same images (``--compare-stops``), on real Fashion-MNIST test images and the default fmnist-fc
model. Runs the command in-process (``mondeq_cli.main.main``) to keep the suite fast."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from model_core import load_checkpoint
from mondeq_cli.main import main
from training.data import DEBIAN_FASHION_MNIST, read_idx
from training.evaluate import StopRule

ROOT = Path(__file__).resolve().parents[2]
FC = ROOT / "models" / "fmnist-fc" / "1" / "model.pt"
IMAGES = DEBIAN_FASHION_MNIST / "t10k-images-idx3-ubyte.gz"
LABELS = DEBIAN_FASHION_MNIST / "t10k-labels-idx1-ubyte.gz"
N = 500  # the first N test images
# Every label is proven under stop=label: 488 by the float32 test; the other 12 include the
# near ties whose margin stays under float32's error-bound floor (docs/math.md §2, §9): their
# float32 test stalls, and the float64 certificate at their point, offered at iterations 8,
# 16, 32, …, proves each at 16 or 32 (before, they ran to max_iter 300).
PROVEN = 500
IN_FLOAT64 = 12
EVAL = ["eval", FC, "--dataset", "fashion-mnist", "--eval-limit", N, "--batch-size", 64]
TIMES = ("solve_s", "batch_ms_p50")  # wall times: never compared

needs_fmnist = pytest.mark.skipif(
    not IMAGES.is_file(),
    reason="Debian package dataset-fashion-mnist is not installed (make test installs it)",
)


def run(capsys, *args) -> tuple[int, str, str]:
    """``mondeq ARGS`` in-process: (exit status, stdout, stderr)."""
    try:
        code = main([str(a) for a in args])
    except SystemExit as e:  # argparse refusals
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def eval_json(capsys, *flags) -> dict:
    code, out, err = run(capsys, *EVAL, "--json", *flags)
    assert code == 0, err
    return json.loads(out)


def untimed(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in TIMES}


@pytest.fixture(scope="module")
def test_set() -> tuple[torch.Tensor, torch.Tensor]:
    """The first N test images (uint8 ``(N, 1, 28, 28)``) and their labels."""
    x = torch.from_numpy(read_idx(IMAGES)[:N].copy()).unsqueeze(1)
    y = torch.from_numpy(read_idx(LABELS)[:N].astype("int64"))
    return x, y


@pytest.fixture(scope="module")
def exact_labels(test_set) -> torch.Tensor:
    """Labels of a float64 solve of the same images to tol 1e-6, every one of them converged
    (float32 certifies no residual that small, docs/math.md §2)."""
    model = load_checkpoint(FC).double()
    x = model.input_spec.normalize(test_set[0]).double()
    r = model.infer(x, tol=1e-6, max_iter=1000)
    assert r.stats.converged.all()
    return r.labels


@needs_fmnist
def test_stop_label_proves_every_label_and_each_is_the_exact_equilibrium_s(
    capsys, test_set, exact_labels
):
    x, y = test_set
    m = eval_json(capsys, "--stop", "label", "--radii", "0")
    assert (m["samples"], m["stop"], m["logit_tol"], m["check_every"]) == (N, "label", None, 1)
    assert m["proven_share"] == PROVEN / N
    # The accuracy is the tight solve's to the last sample, and so is each label.
    assert m["accuracy"] == (exact_labels == y).double().mean().item()
    model = load_checkpoint(FC)
    r = model.infer(model.input_spec.normalize(x), stop="label")
    assert int(r.label_proven.sum()) == PROVEN and torch.equal(r.labels, exact_labels)
    # The near ties stalled in float32; float64 proved them where it was offered them.
    again = r.certified_in_float64
    assert int(again.sum()) == IN_FLOAT64
    assert set(r.stats.iterations[again].tolist()) == {16, 32}
    assert (r.stats.iterations[~again] <= 16).all()
    # A proven label carries a radius however early it stopped (most samples stop before
    # their residual reaches tol): radius 0 certifies every correct proven answer, here every
    # correct answer. The former residual gate certified only the converged ones.
    assert m["converged_share"] < 0.5
    correct_proven = (r.label_proven & (r.labels == y)).double().mean().item()
    assert m["certified"] == {"0": correct_proven} and correct_proven == m["accuracy"]
    assert 0 < m["error_bound_mean"] <= m["error_bound_p99"] < float("inf")


@needs_fmnist
def test_compare_stops_runs_the_rules_on_the_same_images(capsys, test_set):
    m = eval_json(capsys, "--compare-stops", "--logit-tol", "0.5")
    assert (m["samples"], m["dataset"], m["checkpoint"]) == (N, "fashion-mnist", str(FC))
    rules = m["rules"]
    assert [(r["stop"], r["logit_tol"], r["check_every"], r["samples"]) for r in rules] == [
        ("tol", None, 1, N),
        ("label", None, 1, N),
        ("logits", 0.5, 1, N),
    ]
    tol, label, logits = rules
    assert tol["converged_share"] == 1.0
    assert label["proven_share"] == PROVEN / N
    # The label is proven in fewer iterations than the tol rule takes for most samples, and
    # tol proves fewer labels; the near ties take 16 or 32 (proven in float64).
    assert label["iterations_p50"] < tol["iterations_p50"]
    assert label["iterations_max"] == 32
    assert tol["proven_share"] < label["proven_share"]
    # Every logit within 0.5 of the exact equilibrium's, none stopped by the cap.
    assert logits["logit_error_bound_max"] <= 0.5 and logits["iterations_max"] < 300
    # Each row is what the rule gives alone: the same solves, only interleaved.
    alone = eval_json(capsys, "--stop", "label")
    assert untimed(alone) == {**untimed(label), "dataset": "fashion-mnist", "checkpoint": str(FC)}
    alone = eval_json(capsys, "--stop", "logits", "--logit-tol", "0.5")
    assert untimed(alone)["iterations_mean"] == logits["iterations_mean"]


@needs_fmnist
def test_compare_stops_prints_one_line_per_rule(capsys):
    code, out, _ = run(capsys, *EVAL, "--compare-stops", "--check-every", "2")
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == f"fashion-mnist: {N} test samples under each stopping rule"
    assert lines[1].split() == ["stop", "rule", "iters", "mean", "p50", "p90", "max", "proven",
                                "accuracy", "ms/batch", "p50", "solve", "s"]  # fmt: skip
    assert [line[:14].rstrip() for line in lines[2:]] == ["tol", "label, every 2"]
    assert lines[3].split()[7] == f"{100 * PROVEN / N:.2f}%"  # the label rule's proven share


@needs_fmnist
def test_check_every_checks_only_every_kth_iteration(capsys):
    m = eval_json(capsys, "--stop", "label", "--check-every", "3")
    assert (m["stop"], m["check_every"], m["proven_share"]) == ("label", 3, PROVEN / N)
    assert m["iterations_p50"] % 3 == 0 and m["iterations_max"] % 3 == 0


@needs_fmnist
def test_the_default_report_names_its_rule_and_the_proven_share(capsys):
    m = eval_json(capsys)
    assert (m["stop"], m["logit_tol"], m["check_every"]) == ("tol", None, 1)
    assert m["converged_share"] == 1.0 and 0 < m["proven_share"] < 1.0
    code, out, _ = run(capsys, *EVAL, "--stop", "logits", "--logit-tol", "0.25")
    assert code == 0
    assert out.splitlines()[0] == f"fashion-mnist: {N} test samples, stopping rule: logits ≤ 0.25"
    assert "  label proven      " in out and "  error bound       mean " in out


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--logit-tol", "0.1"], "--logit-tol applies only to --stop logits (stop: tol)"),
        (["--stop", "label", "--logit-tol", "0.1"],
         "--logit-tol applies only to --stop logits (stop: label)"),
        (["--stop", "logits"], "--stop logits needs --logit-tol (an absolute logit accuracy)"),
        (["--check-every", "2"],
         "--check-every applies only to --stop label or logits (stop: tol)"),
        (["--stop", "tol", "--check-every", "2"],
         "--check-every applies only to --stop label or logits (stop: tol)"),
        (["--compare-stops", "--stop", "label"],
         "--compare-stops runs every stopping rule: drop --stop"),
    ],
)  # fmt: skip
def test_contradicting_stop_flags_are_refused_before_any_work(capsys, tmp_path, flags, message):
    # A checkpoint that does not exist: the flags are refused before it is looked for.
    args = ["eval", tmp_path / "none.pt", "--dataset", "fashion-mnist", *flags]
    assert run(capsys, *args) == (2, "", f"mondeq eval: {message}\n")


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--stop", "proven"], "argument --stop: invalid choice: 'proven' (choose from 'tol', "
         "'label', 'logits')"),
        (["--logit-tol", "0"], "argument --logit-tol: must be a finite number > 0, got '0'"),
        (["--logit-tol", "inf"], "argument --logit-tol: must be a finite number > 0, got 'inf'"),
        (["--check-every", "0"], "argument --check-every: must be an integer >= 1, got '0'"),
        (["--check-every", "1.5"], "argument --check-every: must be an integer >= 1, got '1.5'"),
    ],
)  # fmt: skip
def test_stop_flag_values_are_checked(capsys, flags, message):
    args = ["eval", FC, "--dataset", "fashion-mnist", *flags]
    assert run(capsys, *args) == (2, "", f"mondeq eval: {message} (see mondeq eval --help)\n")


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"stop": "proven"}, "stop must be one of tol, label, logits, got 'proven'"),
        ({"stop": "logits"}, "stop='logits' needs a finite logit_tol > 0, got None"),
        ({"stop": "logits", "logit_tol": float("nan")},
         "stop='logits' needs a finite logit_tol > 0, got nan"),
        ({"stop": "label", "logit_tol": 0.1},
         "logit_tol applies to stop='logits' only, not stop='label'"),
        ({"stop": "label", "check_every": 0}, "check_every must be an integer >= 1, got 0"),
        ({"stop": "label", "check_every": True}, "check_every must be an integer >= 1, got True"),
    ],
)  # fmt: skip
def test_a_stop_rule_is_checked_when_made(kwargs, message):
    with pytest.raises(ValueError) as e:
        StopRule(**kwargs)
    assert str(e.value) == message


def test_stop_rules_describe_themselves():
    assert [
        StopRule().describe(),
        StopRule("label", check_every=3).describe(),
        StopRule("logits", 0.1).describe(),
    ] == ["tol", "label, every 3", "logits ≤ 0.1"]
