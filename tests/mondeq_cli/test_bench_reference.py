"""`mondeq bench --reference-dir`: the argument handling, the alternation, the table's columns.

The reference code itself (github.com/locuslab/monotone_op_net) is not part of the project
and is not mocked here: its side-by-side run is measured by hand (docs/performance.md).
"""

from __future__ import annotations

import sys
import types

import pytest
import torch
from training_support import mondeq

from mondeq_cli.benchmark import NO_REFERENCE_NOTE, alternate, format_table
from mondeq_cli.reference import ReferenceCodeError, _irfft, _rfft, load_reference

OURS_ROW = {
    "model": "cifar-conv",
    "params": 172_218,
    "device": "cpu",
    "infer_ms": 50.0,
    "infer_cold_ms": 120.0,
    "train_ms": 300.0,
    "fwd_iters": 3.0,
    "train_fwd_iters": 3.0,
    "train_bwd_iters": 3.0,
    "residual": 0.005,
    "label_agreement_vs_tol1e-6": 1.0,
}
SIDE_BY_SIDE_ROW = {
    **OURS_ROW,
    "ref_infer_ms": 200.0,
    "ref_train_ms": 1200.0,
    "ref_fwd_iters": 3.0,
    "ref_train_fwd_iters": 3,
    "ref_train_bwd_iters": 4,
    "ref_residual": 0.004,
    "infer_ratio": 0.25,
    "train_ratio": 0.25,
}


def test_alternate_runs_the_sides_in_turn_with_their_setups_untimed():
    log: list[str] = []
    times = alternate(
        [lambda: log.append("ref"), lambda: log.append("ours")],
        3,
        setups=[lambda: log.append("ref setup"), None],
    )
    assert log == ["ref setup", "ref", "ours"] * 3
    assert [len(t) for t in times] == [3, 3]
    assert all(s >= 0 for t in times for s in t)


def test_alternate_refuses_no_rounds_and_unmatched_setups():
    with pytest.raises(ValueError, match="rounds must be >= 1, got 0"):
        alternate([lambda: None], 0)
    with pytest.raises(ValueError, match="1 setups for 2 calls"):
        alternate([lambda: None, lambda: None], 1, setups=[None])


def test_table_without_the_reference_has_no_reference_column():
    table = format_table([OURS_ROW])
    head = table.splitlines()[0]
    assert "ref" not in head and "×" not in table
    assert "| cifar-conv | 172,218 | cpu | 50 | 120 | 300 | 3.0 | 3.0 | 100% |" in table


def test_table_beside_the_reference_gives_both_sides_and_the_ratios():
    lines = format_table([SIDE_BY_SIDE_ROW]).splitlines()
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    cells = [c.strip() for c in lines[2].strip("|").split("|")]
    row = dict(zip(head, cells, strict=True))
    assert row["infer ms ours"] == "50" and row["infer ms ref"] == "200"
    assert row["infer ours/ref"] == "0.25×" and row["train ours/ref"] == "0.25×"
    assert row["fwd iters ours/ref"] == "3.0 / 3.0"
    assert row["train fwd/bwd iters ref"] == "3 / 4"
    assert row["residual ours/ref"] == "5.0e-03 / 4.0e-03"


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda tmp: tmp / "absent", "no such directory"),
        (lambda tmp: tmp, "no mon.py there; expected a checkout of "),
    ],
    ids=["missing-dir", "no-mon-py"],
)
def test_bench_refuses_a_reference_dir_that_is_not_the_reference_code(tmp_path, make, message):
    path = make(tmp_path)
    run = mondeq("bench", "--models", "cifar-conv", "--reference-dir", path, check=False)
    assert run.returncode == 2 and run.stdout == ""
    (line,) = run.stderr.splitlines()
    assert line.startswith(f"mondeq bench: --reference-dir {path}: ") and message in line


def test_bench_refuses_a_side_by_side_ratio_of_fewer_than_7_calls(tmp_path):
    run = mondeq("bench", "--reference-dir", tmp_path, "--repeats", 3, check=False)
    assert run.returncode == 2
    assert run.stderr.splitlines() == [
        "mondeq bench: --reference-dir needs --repeats >= 7 (a median per side), got 3"
    ]


def test_a_reference_dir_that_fails_to_import_is_one_error_and_leaves_sys_modules(tmp_path):
    for name in ("mon", "splitting", "utils", "train"):
        (tmp_path / f"{name}.py").write_text("import utils\n" if name == "splitting" else "")
    (tmp_path / "utils.py").write_text("raise ImportError('needs a GPU from 2020')\n")
    theirs = types.ModuleType("utils")
    sys.modules["utils"] = theirs
    try:
        with pytest.raises(ReferenceCodeError) as err:
            load_reference(tmp_path)
        assert str(err.value) == (
            f"--reference-dir {tmp_path}: importing it failed: ImportError: needs a GPU from 2020"
        )
        assert sys.modules["utils"] is theirs and "splitting" not in sys.modules
        assert str(tmp_path) not in sys.path
    finally:
        sys.modules.pop("utils", None)


def test_the_fft_shims_are_the_old_torch_rfft_and_irfft():
    x = torch.randn(2, 3, 6, 5, dtype=torch.float64)
    spec = _rfft(x, 2, onesided=False)
    assert spec.shape == (2, 3, 6, 5, 2)
    assert torch.equal(spec[..., 0], torch.fft.fft2(x).real)
    assert torch.allclose(_irfft(spec, 2, onesided=False), x, atol=1e-12)
    with pytest.raises(NotImplementedError):
        _rfft(x, 2)


@pytest.mark.slow
def test_bench_without_the_reference_prints_no_ratio_and_says_how_to_get_one():
    run = mondeq("bench", "--models", "cifar-multitier", "--batch-size", 2, "--repeats", 1)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0].startswith("| model | params | device | infer ms/batch |")
    assert "ref" not in lines[0] and "×" not in run.stdout
    assert lines[-2].startswith("machine probe: GEMM ") and lines[-1] == NO_REFERENCE_NOTE
