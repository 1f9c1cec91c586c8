"""User mistakes with real files that were tracebacks, wasted work or silent wrong results:
a damaged gzip data file, an empty test split, MNIST's IDX files offline, a checkpoint
evaluated on another dataset, and ``--resume`` given the run's own options or its file.
"""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import pytest

from mondeq_cli.main import main
from training import TrainOptions, train
from training.data import DEBIAN_FASHION_MNIST

FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
         "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")  # fmt: skip


def run(capsys, *args) -> tuple[int, str]:
    """``mondeq ARGS`` in-process: (exit status, stderr)."""
    try:
        code = main([str(a) for a in args])
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def idx_copy(folder: Path, *, test_images: int | None = None, gz: bool = True) -> Path:
    """Fashion-MNIST's four IDX files in ``folder``; ``test_images`` cuts the test split."""
    folder.mkdir(parents=True)
    for stem in FILES:
        raw = gzip.decompress((DEBIAN_FASHION_MNIST / f"{stem}.gz").read_bytes())
        if test_images is not None and stem.startswith("t10k"):
            header = 16 if "images" in stem else 8
            item = 784 if "images" in stem else 1
            raw = raw[:4] + test_images.to_bytes(4, "big") + raw[8:header]
            raw += gzip.decompress((DEBIAN_FASHION_MNIST / f"{stem}.gz").read_bytes())[
                header : header + test_images * item
            ]
        if gz:
            (folder / f"{stem}.gz").write_bytes(gzip.compress(raw, compresslevel=1))
        else:
            (folder / stem).write_bytes(raw)
    return folder


@pytest.fixture(scope="module")
def fashion_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fashion") / "run"
    train(TrainOptions(preset="fmnist-fc", out=str(out), epochs=1, steps_per_epoch=1,
                       eval_limit=16, tune_alpha=False, progress=False))  # fmt: skip
    return out


def test_a_damaged_gzip_data_file_is_one_line(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    for stem in FILES:
        shutil.copy(DEBIAN_FASHION_MNIST / f"{stem}.gz", data)
    labels = data / "train-labels-idx1-ubyte.gz"
    raw = bytearray(labels.read_bytes())
    for i in range(100, 400):  # inside the deflate stream: zlib.error, not an OSError
        raw[i] ^= 0x5A
    labels.write_bytes(bytes(raw))
    code, err = run(capsys, "train", "--preset", "fmnist-fc", "--data-dir", data,
                    "--out", tmp_path / "run")  # fmt: skip
    assert code == 2 and err.count("\n") == 1
    assert err.startswith(f"mondeq train: cannot read {labels}: Error -3 while decompressing")
    assert not (tmp_path / "run").exists()


def test_an_empty_test_split_is_refused_before_training(tmp_path, capsys):
    # Was: a whole epoch trained, then "evaluation set is empty" and nothing kept.
    data = idx_copy(tmp_path / "data", test_images=0)
    out = tmp_path / "run"
    code, err = run(capsys, "train", "--preset", "fmnist-fc", "--data-dir", data, "--out", out,
                    "--epochs", "1", "--steps-per-epoch", "1", "--no-progress")  # fmt: skip
    assert (code, err) == (
        2,
        f"mondeq train: fashion-mnist from {data}, test split: holds no images\n",
    )
    assert not out.exists() or not any(out.iterdir())


def test_mnist_idx_files_are_read_offline_gzipped_or_not(tmp_path, capsys, fashion_run):
    # torchvision's MNIST answered the .gz files its own layout names with "not found".
    for gz in (True, False):
        root = tmp_path / f"gz{gz}"
        idx_copy(root / "MNIST" / "raw", test_images=40, gz=gz)
        code, err = run(capsys, "eval", fashion_run / "last.pt", "--dataset", "mnist",
                        "--data-dir", root)  # fmt: skip
        # Read, and then refused as another dataset than the checkpoint's (next test).
        assert (code, err) == (
            2,
            f"mondeq eval: {fashion_run / 'last.pt'} was trained on fashion-mnist, not mnist: "
            "pass --dataset fashion-mnist\n",
        )
    out = tmp_path / "mnist-run"
    code, err = run(capsys, "train", "--preset", "mnist-fc", "--data-dir", tmp_path / "gzTrue",
                    "--out", out, "--epochs", "1", "--steps-per-epoch", "1", "--eval-limit",
                    "40", "--no-progress", "--no-tune-alpha")  # fmt: skip
    assert code == 0 and f"mnist from {tmp_path / 'gzTrue' / 'MNIST' / 'raw'} (60,000" in err
    assert (out / "last.pt").is_file()


def test_eval_refuses_a_checkpoint_of_another_dataset(tmp_path, capsys, fashion_run):
    # Was: a Fashion-MNIST model scored on digits, "accuracy 9.x%", exit 0.
    root = tmp_path / "mnist"
    idx_copy(root / "MNIST" / "raw", test_images=40, gz=False)
    code, err = run(capsys, "eval", fashion_run / "last.pt", "--dataset", "mnist",
                    "--data-dir", root, "--json")  # fmt: skip
    assert code == 2 and "was trained on fashion-mnist, not mnist" in err
    # The right dataset, under either name, and synthetic smoke data still evaluate.
    for name in ("fashion-mnist", "fmnist", "synthetic"):
        code, err = run(capsys, "eval", fashion_run / "last.pt", "--dataset", name,
                        "--eval-limit", "16", "--json")  # fmt: skip
        assert code == 0, err


def test_resume_accepts_the_run_s_own_options_and_names_a_changed_one(tmp_path, capsys):
    out = tmp_path / "run"
    common = ["--preset", "fmnist-fc", "--dataset", "synthetic", "--synthetic-size", "256",
              "--batch-size", "64", "--steps-per-epoch", "1", "--eval-limit", "16",
              "--no-progress", "--no-tune-alpha"]  # fmt: skip
    assert run(capsys, "train", *common, "--epochs", "1", "--out", out)[0] == 0
    # The same command with --resume and more epochs: was "cannot change ['batch_size',
    # 'dataset', 'preset', ...]" although nothing changed.
    code, err = run(capsys, "train", *common, "--epochs", "2", "--resume", out)
    assert code == 0 and "epoch 2/2" in err
    code, err = run(capsys, "train", *common, "--epochs", "3", "--batch-size", "32",
                    "--resume", out)  # fmt: skip
    assert (code, err) == (
        2,
        "mondeq train: --resume keeps the run's options; cannot change ['batch_size'] "
        "(--batch-size 64 in the run, 32 given)\n",
    )
    code, err = run(capsys, "train", "--resume", out, "--lr", "0.5")
    assert (code, err) == (
        2,
        "mondeq train: --resume keeps the run's options; cannot change ['lr'] "
        "(--lr the preset's default in the run, 0.5 given)\n",
    )
    # Was: "cannot resume: DIR/last.pt/last.pt: no such file".
    code, err = run(capsys, "train", "--resume", out / "last.pt")
    assert (code, err) == (
        2,
        f"mondeq train: --resume takes the run folder, not a file: pass --resume {out}\n",
    )
