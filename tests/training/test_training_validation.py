"""Every input of every command is checked before any work: one line on stderr, exit 2, and
nothing written. A value is honoured as given or refused, never replaced by a default.

A few cases run `mondeq` in real subprocesses; the rest call the same entry point in-process
(``mondeq_cli.main.main``) to keep the suite fast.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mondeq_cli.main import main
from training import TrainOptions, train
from training.options import OptionError, read_config

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ["--preset", "fmnist-fc", "--dataset", "synthetic", "--synthetic-size", "512",
         "--batch-size", "64", "--no-progress"]  # fmt: skip
PRESETS = (
    "mnist-fc, mnist-conv, mnist-multitier, svhn-conv, svhn-multitier, cifar-conv, "
    "cifar-multitier, cifar-conv-lg, cifar-multitier-lg, fmnist-fc, fmnist-conv, fmnist-multitier"
)
KNOWN = (
    "batch_size, data_dir, dataset, device, download, epochs, eval_limit, lr, out, preset, "
    "progress, seed, steps_per_epoch, synthetic_size, tune_alpha"
)


def run(capsys, *args) -> tuple[int, str]:
    """``mondeq ARGS`` in-process: (exit status, stderr)."""
    try:
        code = main([str(a) for a in args])
    except SystemExit as e:  # argparse refusals
        code = e.code
    return code, capsys.readouterr().err


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# ---- config files ---------------------------------------------------------------------------


def test_yaml_float_written_without_a_dot_is_a_number(tmp_path):
    # PyYAML's YAML 1.1 rules read `1e-3` as the string "1e-3"; YAML 1.2 and TOML read a number.
    assert read_config(write(tmp_path / "a.yaml", "lr: 1e-3\n")) == {"lr": 0.001}
    assert read_config(write(tmp_path / "b.yaml", "lr: 2E+1\nepochs: 3\n")) == {
        "lr": 20.0,
        "epochs": 3,
    }
    assert read_config(write(tmp_path / "c.yaml", "tune_alpha: no\n")) == {"tune_alpha": False}
    # YAML 1.2 integers: 010 is ten (YAML 1.1: octal 8), 0o10 is eight.
    assert read_config(write(tmp_path / "e.yaml", "epochs: 010\nseed: 0o10\n")) == {
        "epochs": 10,
        "seed": 8,
    }
    assert read_config(write(tmp_path / "d.toml", "lr = 1e-3\nbatch-size = 32\n")) == {
        "lr": 0.001,
        "batch_size": 32,
    }


@pytest.mark.parametrize(
    "name,text,message",
    [
        ("a.yaml", 'epochs: "2"\n', "epochs in {path} must be an integer >= 1, got the string "
         "'2' (a quoted value is a string: remove the quotes)"),
        ("b.yaml", "batch_size: [64]\n", "batch_size in {path} must be an integer >= 1, got a "
         "list ([64])"),
        ("c.yaml", 'tune_alpha: "false"\n', "tune_alpha in {path} must be true or false (a "
         "boolean, unquoted), got the string 'false' (a quoted value is a string: remove the "
         "quotes)"),
        ("d.yaml", 'lr: "1e-3"\n', "lr in {path} must be a finite number > 0, got the string "
         "'1e-3' (a quoted value is a string: remove the quotes)"),
        ("e.yaml", "epochs: 2.0\n", "epochs in {path} must be an integer >= 1, got 2.0"),
        ("f.yaml", "epochs: true\n", "epochs in {path} must be an integer >= 1, got the "
         "boolean true"),
        ("g.yaml", "lr: .inf\n", "lr in {path} must be a finite number > 0, got inf"),
        ("h.yaml", "epcohs: 2\n", "config {path}: 'epcohs': unknown option (did you mean "
         f"'epochs'?); known: {KNOWN}"),
        ("i.toml", "learning-rate = 0.1\n", "config {path}: 'learning-rate': unknown option; "
         f"known: {KNOWN}"),
        ("j.yaml", "preset: fmnist-fcc\n", f"preset in {{path}} must be one of {PRESETS} (did "
         "you mean 'fmnist-fc'?), got the string 'fmnist-fcc'"),
        ("k.yaml", "- epochs\n", "config {path} must be a mapping of options"),
        ("l.toml", 'command = "x"\n', "config {path}: 'command': unknown option; known: "
         f"{KNOWN}"),
        # YAML 1.1 read these as 90 (base 60), 90.5 and 3; the last of two keys won silently,
        # and an empty value meant the preset's.
        ("m.yaml", "epochs: 1:30\n", "epochs in {path} must be an integer >= 1, got the string "
         "'1:30'"),
        ("n.yaml", "lr: 1:30.5\n", "lr in {path} must be a finite number > 0, got the string "
         "'1:30.5'"),
        ("o.yaml", "epochs: 0b11\n", "epochs in {path} must be an integer >= 1, got the string "
         "'0b11'"),
        ("p.yaml", "lr: 1e-3\nepochs: 2\nlr: 5\n", "config {path} does not parse: duplicate "
         "key 'lr' (line 3)"),
        ("q.yaml", "batch-size: 64\nbatch_size: 32\n", "config {path}: 'batch-size' and "
         "'batch_size' set the same option"),
        ("r.yaml", "epochs:\n", "epochs in {path} has no value; give one or remove the key"),
    ],
)  # fmt: skip
def test_config_values_are_checked(tmp_path, name, text, message):
    path = write(tmp_path / name, text)
    with pytest.raises(OptionError) as err:
        read_config(path)
    assert str(err.value) == message.format(path=path)


def test_config_case_runs_as_a_process_and_writes_nothing(tmp_path):
    cfg = write(tmp_path / "run.yaml", 'preset: fmnist-fc\nepochs: "2"\n')
    proc = subprocess.run(
        [sys.executable, "-m", "mondeq_cli", "train", "--config", str(cfg),
         "--out", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    # Before: a TypeError traceback, exit 1.
    assert proc.returncode == 2
    assert proc.stderr == (
        f"mondeq train: epochs in {cfg} must be an integer >= 1, got the string '2' "
        "(a quoted value is a string: remove the quotes)\n"
    )
    assert not (tmp_path / "run").exists()


def test_config_and_flags_name_their_source(tmp_path, capsys):
    cfg = write(tmp_path / "run.yaml", "preset: fmnist-fc\nbatch_size: [64]\n")
    code, err = run(capsys, "train", "--config", cfg, "--out", tmp_path / "r")
    assert (code, err) == (
        2,
        f"mondeq train: batch_size in {cfg} must be an integer >= 1, got a list ([64])\n",
    )
    code, err = run(capsys, "train", "--config", cfg, "--batch-size", "0", "--out", tmp_path / "r")
    assert (code, err) == (2, "mondeq train: --batch-size must be an integer >= 1, got 0\n")
    assert not (tmp_path / "r").exists()


# ---- train flags ----------------------------------------------------------------------------


def test_epochs_0_is_refused_by_a_process(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "mondeq_cli", "train", *SMOKE, "--epochs", "0",
         "--out", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    # Before: all 20 of the preset's epochs.
    assert (proc.returncode, proc.stdout) == (2, "")
    assert proc.stderr == "mondeq train: --epochs must be an integer >= 1, got 0\n"
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--batch-size", "0"], "--batch-size must be an integer >= 1, got 0"),  # was: 128
        (["--epochs", "-1"], "--epochs must be an integer >= 1, got -1"),  # was: exit 0
        (["--batch-size", "-64"], "--batch-size must be an integer >= 1, got -64"),
        (["--steps-per-epoch", "-1"], "--steps-per-epoch must be an integer >= 1, got -1"),
        (["--steps-per-epoch", "0"], "--steps-per-epoch must be an integer >= 1, got 0"),
        (["--eval-limit", "0"], "--eval-limit must be an integer >= 1, got 0"),
        (["--synthetic-size", "0"], "--synthetic-size must be an integer >= 1, got 0"),
        (["--lr", "0"], "--lr must be a finite number > 0, got 0.0"),
        (["--lr=-1e-3"], "--lr must be a finite number > 0, got -0.001"),
        (["--lr", "nan"], "--lr must be a finite number > 0, got nan"),
        (["--lr", "inf"], "--lr must be a finite number > 0, got inf"),
        (["--seed", "-1"], "--seed must be an integer in [0, 4294967295], got -1"),
        (["--seed", str(2**32)], "--seed must be an integer in [0, 4294967295], got 4294967296"),
        (["--device", "gpu"], "--device must be auto, cpu, cuda or cuda:N, got the string 'gpu'"),
        # Device types torch knows but training cannot use: were tracebacks mid-run.
        (["--device", "meta"], "--device must be auto, cpu, cuda or cuda:N, got the string "
         "'meta'"),
        (["--device", "mps"], "--device must be auto, cpu, cuda or cuda:N, got the string 'mps'"),
        (["--device", "cpu:1"], "--device must be auto, cpu, cuda or cuda:N, got the string "
         "'cpu:1'"),
        (["--preset", "fmnist-fcc"], f"--preset must be one of {PRESETS} (did you mean "
         "'fmnist-fc'?), got the string 'fmnist-fcc'"),
        (["--dataset", "imagenet"], "--dataset must be one of mnist, fashion-mnist, svhn, "
         "cifar10, synthetic, got the string 'imagenet'"),
        (["--data-dir", "data"], "--data-dir does not apply to --dataset synthetic"),
        (["--download"], "--download does not apply to --dataset synthetic"),
        (["--eval-limit", "129"], "--eval-limit 129 is more than the 128 test samples of "
         "synthetic"),
        (["--batch-size", "513"], "512 training samples cannot fill a batch of 513"),
        (["--nproc", "3"], "batch size 64 must divide evenly over 3 processes"),
        (["--nproc", "0"], "argument --nproc: must be an integer >= 1, got '0' (see mondeq "
         "train --help)"),
        (["--epochs", "x"], "argument --epochs: invalid int value: 'x' (see mondeq train "
         "--help)"),
    ],
)  # fmt: skip
def test_train_flags_are_checked_before_any_work(tmp_path, capsys, flags, message):
    code, err = run(capsys, "train", *SMOKE, *flags, "--out", tmp_path / "run")
    assert (code, err) == (2, f"mondeq train: {message}\n")
    assert not (tmp_path / "run").exists()


def test_a_synthetic_size_beyond_memory_is_refused(tmp_path, capsys):
    flags = [a for a in SMOKE if a not in ("--synthetic-size", "512")]
    code, err = run(capsys, "train", *flags, "--synthetic-size", 10**12, "--out", tmp_path / "r")
    assert code == 2  # was a RuntimeError traceback from torch's allocator
    assert err.startswith(
        "mondeq train: --synthetic-size 1,000,000,000,000 does not fit in memory ("
    )
    assert err.count("\n") == 1 and not (tmp_path / "r").exists()


def test_nproc_over_the_gpus_is_refused_before_the_ranks_start(monkeypatch):
    # nccl fails at the first collective with two ranks on one GPU ("Duplicate GPU
    # detected"). This machine has no GPU, so its presence is stubbed: one CUDA device.
    from training.cli import _check_world

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    for device, message in [
        ("auto", "--nproc 2 needs 2 CUDA devices (nccl: one per process), this machine has 1; "
         "pass --device cpu to run the processes on the CPU"),
        ("cuda:0", "--device cuda:0 puts all 2 processes on one GPU; nccl needs one GPU per "
         "process: pass --device cuda"),
    ]:  # fmt: skip
        with pytest.raises(ValueError) as err:
            _check_world(TrainOptions(preset="fmnist-fc", out="x", device=device), 2)
        assert str(err.value) == message
    _check_world(TrainOptions(preset="fmnist-fc", out="x", device="cpu"), 2)  # gloo: fine


def test_data_folder_is_honoured_or_refused(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    code, err = run(capsys, "train", "--preset", "fmnist-fc", "--data-dir", missing,
                    "--out", tmp_path / "run")  # fmt: skip
    assert (code, err) == (
        2,
        f"mondeq train: --data-dir {missing} does not exist (--download creates it and "
        "fetches fashion-mnist)\n",
    )
    # An existing folder without the files is not silently swapped for Debian's copy.
    empty = tmp_path / "empty"
    empty.mkdir()
    code, err = run(capsys, "train", "--preset", "fmnist-fc", "--data-dir", empty,
                    "--out", tmp_path / "run")  # fmt: skip
    assert code == 2 and err.startswith("mondeq train: dataset 'fashion-mnist' not found under")
    assert err.count("\n") == 1 and not (tmp_path / "run").exists()


def test_options_are_honoured_as_given():
    opts = TrainOptions(preset="fmnist-fc", out="x", epochs=3, batch_size=7, lr=1)
    assert (opts.epochs, opts.batch_size, opts.lr) == (3, 7, 1.0)
    assert isinstance(opts.lr, float)
    with pytest.raises(OptionError, match=r"^--epochs must be an integer >= 1, got 0$"):
        TrainOptions(preset="fmnist-fc", out="x", epochs=0)
    with pytest.raises(OptionError, match=r"^--tune-alpha must be true or false"):
        TrainOptions(preset="fmnist-fc", out="x", tune_alpha="false")
    with pytest.raises(OptionError, match=r"^--nope: unknown option; known: "):
        TrainOptions.from_dict({"preset": "fmnist-fc", "out": "x", "nope": 1})


# ---- resume ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_epoch_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("two") / "run"
    train(TrainOptions(preset="fmnist-fc", out=str(out), dataset="synthetic", synthetic_size=256,
                       batch_size=64, epochs=2, steps_per_epoch=1, eval_limit=16,
                       tune_alpha=False, progress=False))  # fmt: skip
    return out


def test_resume_checks_its_inputs(two_epoch_run, tmp_path, capsys):
    before = {p.name: p.read_bytes() for p in two_epoch_run.iterdir()}
    cfg = write(tmp_path / "c.yaml", "epochs: 5\n")
    code, err = run(capsys, "train", "--resume", two_epoch_run, "--config", cfg)
    assert (code, err) == (
        2,
        "mondeq train: --config does not apply with --resume: the run keeps its options\n",
    )
    code, err = run(capsys, "train", "--resume", two_epoch_run, "--epochs", "1")
    assert (code, err) == (
        2,
        f"mondeq train: --epochs 1 is fewer than the 2 epochs already done in {two_epoch_run}\n",
    )
    code, err = run(capsys, "train", "--resume", two_epoch_run, "--epochs", "0")
    assert (code, err) == (2, "mondeq train: --epochs must be an integer >= 1, got 0\n")
    # Was ignored: the run went on in the --resume folder.
    code, err = run(capsys, "train", "--resume", two_epoch_run, "--out", tmp_path / "other")
    assert (code, err) == (
        2,
        f"mondeq train: --resume {two_epoch_run} continues the run in that folder; --out "
        f"{tmp_path / 'other'} names another (copy the run there and resume it there)\n",
    )
    code, err = run(capsys, "train", "--resume", two_epoch_run, "--eval-limit", "65")
    assert (code, err) == (
        2,
        "mondeq train: --eval-limit 65 is more than the 64 test samples of synthetic\n",
    )
    assert {p.name: p.read_bytes() for p in two_epoch_run.iterdir()} == before


@pytest.mark.parametrize(
    "case,message",
    [
        # Were tracebacks (size mismatch, KeyError, UnboundLocalError) or a silent extra epoch.
        ("other_preset", "its weights are a fc model {'arch': 'fc', 'hidden': 87, 'm': 1.0, "
         "'in_channels': 1, 'image_size': 28, 'num_classes': 10}, preset fmnist-conv now "
         "builds another; train afresh"),
        ("no_progress", "its training state is malformed"),
        ("epoch_negative", "its training state is malformed"),
        ("best", "holds no training state to resume"),
        ("optimizer_inf", "its optimizer state holds NaN or inf"),
    ],
)  # fmt: skip
def test_resume_refuses_a_last_pt_it_cannot_continue(two_epoch_run, tmp_path, capsys, case,
                                                    message):  # fmt: skip
    raw = torch.load(two_epoch_run / "last.pt", weights_only=True)
    train_state = raw["training_state"]
    if case == "other_preset":
        train_state["options"]["preset"] = "fmnist-conv"
    elif case == "no_progress":
        del train_state["progress"]
    elif case == "epoch_negative":
        train_state["progress"]["epoch"] = -1
    elif case == "optimizer_inf":  # was resumed, then "diverged ... lower --lr"
        next(iter(train_state["optimizer"]["state"].values()))["exp_avg"].view(-1)[0] = math.inf
    else:
        raw["training_state"] = None
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    torch.save(raw, run_dir / "last.pt")
    code, err = run(capsys, "train", "--resume", run_dir, "--epochs", "3")
    assert (code, err) == (2, f"mondeq train: cannot resume: {run_dir / 'last.pt'}: {message}\n")
    assert sorted(p.name for p in run_dir.iterdir()) == ["last.pt"]


def test_resume_refuses_a_step_past_the_epoch_s_end(two_epoch_run, tmp_path, capsys):
    raw = torch.load(two_epoch_run / "last.pt", weights_only=True)
    raw["training_state"]["progress"]["step"] = 5  # the run takes 1 step per epoch
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    torch.save(raw, run_dir / "last.pt")
    code, err = run(capsys, "train", "--resume", run_dir, "--epochs", "3")
    assert (code, err) == (
        2,
        f"mondeq train: cannot resume: {run_dir / 'last.pt'} is at step 5 of an epoch of 1 steps\n",
    )


# ---- eval, export, bench, import-locuslab -----------------------------------------------------


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--batch-size", "0"], "argument --batch-size: must be an integer >= 1, got '0'"),
        (["--eval-limit", "0"], "argument --eval-limit: must be an integer >= 1, got '0'"),
        # The former name of --eval-limit, still accepted.
        (["--limit", "0"], "argument --limit: must be an integer >= 1, got '0'"),
        (["--alpha", "-1"], "argument --alpha: must be a finite number > 0, got '-1'"),
        (["--tol", "nan"], "argument --tol: must be a number in (0, 1], got 'nan'"),
        # A relative residual of 1e300 "converged" at 1 iteration and was certified.
        (["--tol", "1e300"], "argument --tol: must be a number in (0, 1], got '1e300'"),
        (["--max-iter", "0"], "argument --max-iter: must be an integer >= 1, got '0'"),
        (["--radii", "0.1,x"], "argument --radii: must be a finite number >= 0, got 'x'"),
        (["--radii", ","], "argument --radii: must be comma-separated radii >= 0, got ','"),
        (["--method", "newton"], "argument --method: invalid choice: 'newton' (choose from "
         "'forward_backward', 'peaceman_rachford')"),
    ],
)  # fmt: skip
def test_eval_flags_are_checked(capsys, two_epoch_run, flags, message):
    code, err = run(capsys, "eval", two_epoch_run / "last.pt", "--dataset", "synthetic", *flags)
    assert (code, err) == (2, f"mondeq eval: {message} (see mondeq eval --help)\n")


def test_eval_inputs_are_checked_against_the_data(capsys, two_epoch_run, tmp_path):
    last = two_epoch_run / "last.pt"
    for spelling in ("--eval-limit", "--limit"):  # the flag of train, and its former name
        code, err = run(capsys, "eval", last, "--dataset", "synthetic", spelling, "513")
        assert (code, err) == (2, "mondeq eval: --eval-limit 513 is more than the 512 test "
                                  "samples of synthetic\n")  # fmt: skip
    code, err = run(capsys, "eval", last, "--dataset", "synthetic", "--device", "gpu")
    assert (code, err) == (2, "mondeq eval: --device 'gpu': expected auto, cpu, cuda or cuda:N\n")
    # Solver overrides float32 cannot compute with: were tracebacks in the first iteration.
    code, err = run(capsys, "eval", last, "--dataset", "synthetic", "--alpha", "1e300")
    assert (code, err) == (2, "mondeq eval: solver alpha must be in [1e-30, 1e+30], got 1e+300\n")
    code, err = run(capsys, "eval", last, "--dataset", "synthetic", "--max-iter", str(10**20))
    assert (code, err) == (
        2,
        f"mondeq eval: solver max_iter must be in [1, {2**31 - 1}], got {10**20}\n",
    )
    for device in ("meta", "mps", "cpu:1"):  # were tracebacks
        code, err = run(capsys, "eval", last, "--dataset", "synthetic", "--device", device)
        assert (code, err) == (
            2,
            f"mondeq eval: --device '{device}': expected auto, cpu, cuda or cuda:N\n",
        )
    code, err = run(capsys, "eval", tmp_path / "none.pt", "--dataset", "synthetic")
    assert (code, err) == (2, f"mondeq eval: {tmp_path / 'none.pt'}: no such file\n")


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--name", "../x"], "--name '../x': a model name is 1-128 letters, digits, '.', '_' or "
         "'-', starting with a letter or digit and not ending in .tmp/.temp/.part/.partial/.new/~"),
        (["--name", ""], "--name '': a model name is 1-128 letters, digits, '.', '_' or '-', "
         "starting with a letter or digit and not ending in .tmp/.temp/.part/.partial/.new/~"),
        (["--version", "0"], "--version must be an integer in [1, 999999999], got 0"),
        (["--version", "1000000000"], "--version must be an integer in [1, 999999999], got "
         "1000000000"),
    ],
)  # fmt: skip
def test_export_flags_are_checked(capsys, two_epoch_run, tmp_path, flags, message):
    code, err = run(capsys, "export", two_epoch_run, "--model-dir", tmp_path / "m", *flags)
    assert (code, err) == (2, f"mondeq export: {message}\n")
    assert not (tmp_path / "m").exists()


def test_export_refuses_a_run_stopped_before_its_first_epoch_ended(capsys, two_epoch_run,
                                                                  tmp_path):  # fmt: skip
    # As `last.pt` is after a signal in epoch 1: no metrics. Was a TypeError traceback.
    raw = torch.load(two_epoch_run / "last.pt", weights_only=True)
    raw["metadata"].update(metrics={}, epoch=0)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    torch.save(raw, run_dir / "last.pt")
    code, err = run(capsys, "export", run_dir, "--model-dir", tmp_path / "m")
    assert (code, err) == (
        2,
        f"mondeq export: {run_dir / 'last.pt'} was written before the run's first epoch ended, "
        "so there is no tested model to publish; continue it with `mondeq train --resume "
        f"{run_dir}`\n",
    )
    assert not (tmp_path / "m").exists()


def test_export_refuses_a_file_as_the_repository(capsys, two_epoch_run, tmp_path):
    models = write(tmp_path / "models", "not a folder")
    for spelling in ("--model-dir", "--models"):  # serve's flag, and its former name here
        code, err = run(capsys, "export", two_epoch_run, spelling, models)
        assert (code, err) == (2, f"mondeq export: --model-dir {models} is not a folder\n")
    assert models.read_text() == "not a folder"


@pytest.mark.parametrize(
    "args,message",
    [
        (["bench", "--batch-size", "0"], "mondeq bench: argument --batch-size: must be an "
         "integer >= 1, got '0' (see mondeq bench --help)"),
        (["bench", "--batch", "0"], "mondeq bench: argument --batch: must be an integer >= 1, "
         "got '0' (see mondeq bench --help)"),  # the flag's former name, still accepted
        (["bench", "--repeats", "0"], "mondeq bench: argument --repeats: must be an integer >= "
         "1, got '0' (see mondeq bench --help)"),
        (["bench", "--tol", "0"], "mondeq bench: argument --tol: must be a number in (0, 1], "
         "got '0' (see mondeq bench --help)"),
        (["bench", "--models", ","], "mondeq bench: --models names no model, got ','"),
        # Were tracebacks from inside the first solve or from torch's allocator.
        (["bench", "--device", "meta"], "mondeq bench: --device 'meta': expected auto, cpu, "
         "cuda or cuda:N"),
        (["bench", "--batch-size", str(10**14)], "benchmarking cifar-conv ...\nmondeq bench: "
         "--batch-size 100,000,000,000,000 does not fit in memory"),
        (["bench", "--alpha", "1e300"], "benchmarking cifar-conv ...\nmondeq bench: solver "
         "alpha must be in [1e-30, 1e+30], got 1e+300"),
        (["import-locuslab", "x.pt", "--hidden", "0", "--out", "y.pt"], "mondeq "
         "import-locuslab: argument --hidden: must be an integer >= 1, got '0' (see mondeq "
         "import-locuslab --help)"),
        (["import-locuslab", "x.pt", "--hidden", "5", "--in-shape", "0,6,6", "--out", "y.pt"],
         "mondeq import-locuslab: argument --in-shape: expected C,H,W of positive integers "
         "(e.g. 1,28,28), got '0,6,6' (see mondeq import-locuslab --help)"),
    ],
)  # fmt: skip
def test_model_core_commands_check_their_flags(capsys, args, message):
    assert run(capsys, *args) == (2, message + "\n")


def test_import_locuslab_checks_normalisation_against_the_shape(tmp_path, capsys):
    from problems import reference_state_dict

    src = tmp_path / "sd.pt"
    torch.save(reference_state_dict(), src)
    common = ["import-locuslab", src, "--hidden", "9", "--in-shape", "1,6,6"]
    code, err = run(capsys, *common, "--mean", "0.1,0.2", "--out", tmp_path / "o.pt")
    assert (code, err) == (
        2,
        "mondeq import-locuslab: --mean needs 1 values (one per channel), got 2\n",
    )
    code, err = run(capsys, *common, "--std", "0", "--out", tmp_path / "o.pt")
    assert (code, err) == (2, "mondeq import-locuslab: --std values must be > 0, got [0.0]\n")
    assert not (tmp_path / "o.pt").exists()


def test_serve_settings_are_refused_in_one_line(capsys, monkeypatch):
    monkeypatch.setenv("MONDEQ_MAX_QUEUE", "0")
    code, err = run(capsys, "serve", "--port", "-1", "--poll-interval", "-1")
    assert (code, err) == (
        2,
        "mondeq serve: --port: input should be greater than or equal to 0, got -1; "
        "MONDEQ_MAX_QUEUE: input should be greater than or equal to 1, got '0'; "
        "--poll-interval: input should be greater than or equal to 0, got -1.0\n",
    )
