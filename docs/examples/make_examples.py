"""Write the request examples of docs/examples/ from the Fashion-MNIST test split.

    .venv/bin/python docs/examples/make_examples.py [--index 0] [--data-dir DIR]

Writes, next to this file:

* ``fmnist-test-<index>.json``: a KServe V2 infer body with test image ``--index`` as a
  ``[1, 1, 28, 28]`` FP32 tensor of pixel intensities in [0, 1] (byte / 255), for
  ``/v2/models/fmnist-fc/infer`` (or fmnist-conv: both take that shape);
* ``fmnist-test-<index>.png``: the same image as an 8-bit greyscale PNG (its exact pixels:
  the server does not resample a 28 × 28 upload).

The data is read from Debian's ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``,
which ``make test`` installs) unless ``--data-dir`` names another folder of the IDX files.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from PIL import Image

from training.data import DEBIAN_FASHION_MNIST, FASHION_CLASSES, read_idx

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--index", type=int, default=0, help="test image index (default 0)")
    parser.add_argument("--data-dir", type=Path, default=DEBIAN_FASHION_MNIST)
    args = parser.parse_args()
    images = read_idx(args.data_dir / "t10k-images-idx3-ubyte.gz")
    labels = read_idx(args.data_dir / "t10k-labels-idx1-ubyte.gz")
    if not 0 <= args.index < len(images):
        parser.error(f"--index must be in [0, {len(images) - 1}]")
    image, label = images[args.index], int(labels[args.index])

    body = {
        "id": f"fmnist-test-{args.index}",
        "inputs": [
            {
                "name": "input",
                "shape": [1, 1, 28, 28],
                "datatype": "FP32",
                "data": [round(int(v) / 255, 6) for v in image.reshape(-1)],
            }
        ],
    }
    json_path = HERE / f"fmnist-test-{args.index}.json"
    json_path.write_text(json.dumps(body, separators=(",", ":")) + "\n")
    png_path = HERE / f"fmnist-test-{args.index}.png"
    Image.fromarray(image, mode="L").save(png_path, optimize=True)
    print(f"test image {args.index}: label {label} ({FASHION_CLASSES[label]})")
    print(f"wrote {json_path.relative_to(Path.cwd())} and {png_path.relative_to(Path.cwd())}")


if __name__ == "__main__":
    main()
