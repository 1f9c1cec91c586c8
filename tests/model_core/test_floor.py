"""model_core's floor: it imports and serves a real model with torch alone.

The statical half walks every module's imports. The other half builds, in ``tmp_path``, a venv
that holds torch, the distributions torch requires, pytest and ``model_core`` (symlinks into
the project's venv; no copies, no downloads) and runs the committed fmnist-fc model there: its
labels and logits must equal the full venv's, while fastapi, matplotlib and the other extras'
modules must be missing. The same venv, given ``mondeq_cli``, ``training``, ``service`` and the
project's metadata, shows that ``mondeq train`` / ``mondeq serve`` name the extra they need in
one line, and that the torch-only commands run.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, distribution, distributions
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[2]
MODEL = REPO / "models" / "fmnist-fc" / "1" / "model.pt"
IMAGES = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")

# Modules of the training and serving extras; the floor must not have a single one.
EXTRA_MODULES = [
    "fastapi", "matplotlib", "pydantic", "pydantic_settings", "uvicorn", "prometheus_client",
    "multipart", "PIL", "numpy", "tqdm", "yaml", "torchvision", "starlette",
]  # fmt: skip

# What the floor's packages may import: the standard library, torch and themselves.
ALLOWED = {
    "model_core": {"torch", "model_core"},
    "mondeq_cli": {"torch", "model_core", "mondeq_cli"},
}


def third_party_imports(package: str) -> dict[str, set[str]]:
    """``{module path: top-level names it imports that are neither stdlib nor allowed}``."""
    found = {}
    for path in sorted((REPO / package).rglob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name.partition(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.partition(".")[0])
        bad = names - sys.stdlib_module_names - ALLOWED[package]
        if bad:
            found[str(path.relative_to(REPO))] = bad
    return found


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_the_floor_imports_only_the_standard_library_and_torch(package):
    assert list((REPO / package).rglob("*.py")), f"{package} has no modules?"
    assert third_party_imports(package) == {}


def requirement_closure(*roots: str) -> list:
    """The installed distributions ``roots`` need, recursively (markers evaluated here,
    no extras), ``roots`` included."""
    seen: dict[str, object] = {}
    todo = list(roots)
    while todo:
        name = todo.pop()
        try:
            dist = distribution(name)
        except PackageNotFoundError:  # a requirement whose marker holds but that torch lacks
            continue
        key = dist.metadata["Name"].lower().replace("_", "-")
        if key in seen:
            continue
        seen[key] = dist
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return list(seen.values())


def link_distributions(dists, site: Path) -> None:
    """Symlink each distribution's top-level entries (packages, modules, dist-info, bundled
    libraries) into ``site``."""
    for dist in dists:
        assert dist.files, f"{dist.metadata['Name']} has no RECORD to link from"
        for top in {f.parts[0] for f in dist.files}:
            if top.startswith("..") or top == "__pycache__" or (site / top).exists():
                continue
            (site / top).symlink_to(dist.locate_file(top))


PROBE = r"""
import gzip, importlib, json, sys
import torch
import model_core
from model_core import build_model, load_checkpoint

def importable(name):
    try:
        importlib.import_module(name)
    except ModuleNotFoundError:
        return False
    return True

fc = build_model({"arch": "fc", "hidden": 87, "in_channels": 1, "image_size": 28})
model = load_checkpoint(sys.argv[1])
spec = torch.load(sys.argv[1], weights_only=True)["input_spec"]
with gzip.open(sys.argv[2]) as f:
    raw = f.read(16 + 16 * 28 * 28)[16:]
x = torch.frombuffer(bytearray(raw), dtype=torch.uint8).float().div(255).view(16, 1, 28, 28)
out = model.infer((x - spec["mean"][0]) / spec["std"][0])
print(json.dumps({
    "model_core": model_core.__file__,
    "fc_params": fc.num_parameters(),
    "labels": out.labels.tolist(),
    "logits": out.logits.tolist(),
    "iterations": out.stats.iterations.tolist(),
    "importable": {m: importable(m) for m in sys.argv[3:]},
}))
"""


@pytest.fixture(scope="module")
def floor(tmp_path_factory) -> Path:
    """A venv with torch, its requirements, pytest and model_core only; its python."""
    root = tmp_path_factory.mktemp("floor")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", root / "venv"], check=True)
    (site,) = (root / "venv" / "lib").glob("python3*/site-packages")
    link_distributions(requirement_closure("torch", "pytest"), site)
    (site / "model_core").symlink_to(REPO / "model_core", target_is_directory=True)
    return root / "venv" / "bin" / "python"


def probe(python: Path | str, env: dict | None = None) -> dict:
    run = subprocess.run(
        [python, "-c", PROBE, MODEL, IMAGES, "pytest", *EXTRA_MODULES],
        capture_output=True,
        text=True,
        timeout=300,
        cwd="/",  # not the repository: its folders would be importable from the cwd
        env=env,
    )
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


def clean_env() -> dict:
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}


@pytest.mark.slow
def test_model_core_runs_the_default_model_with_torch_alone(floor):
    assert IMAGES.exists(), "Fashion-MNIST IDX files (Debian dataset-fashion-mnist) missing"
    alone = probe(floor, clean_env())
    full = probe(sys.executable, clean_env())
    # The floor lacks every extra's module (the full venv has them), and keeps pytest.
    assert alone["importable"] == {"pytest": True, **dict.fromkeys(EXTRA_MODULES, False)}
    assert full["importable"] == {"pytest": True, **dict.fromkeys(EXTRA_MODULES, True)}
    assert Path(alone["model_core"]).parent.resolve() == REPO / "model_core"
    assert alone["fc_params"] == full["fc_params"] == 84_313  # FC 87, Table E1
    assert len(alone["labels"]) == 16
    assert alone["labels"] == full["labels"]
    assert alone["iterations"] == full["iterations"]
    assert alone["logits"] == full["logits"]  # the same torch on the same rows: bit for bit


@pytest.fixture(scope="module")
def cli_env(floor, tmp_path_factory) -> dict:
    """Environment that adds mondeq_cli, training, service and the project's metadata (entry
    points, extras) to the floor, still without any extra's distribution."""
    extra = tmp_path_factory.mktemp("cli")
    for package in ("mondeq_cli", "training", "service"):
        (extra / package).symlink_to(REPO / package, target_is_directory=True)
    # The installed dist-info (a source tree's mondeq.egg-info may be found first).
    (info,) = {
        Path(dist.locate_file(f)).parent
        for dist in distributions(name="mondeq")
        for f in dist.files or []
        if f.name == "METADATA" and f.parts[0].endswith(".dist-info")
    }
    (extra / info.name).symlink_to(info, target_is_directory=True)
    return {**clean_env(), "PYTHONPATH": str(extra)}


def mondeq_in_floor(floor, env, *args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [floor, "-m", "mondeq_cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd="/",
        env=env,
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "args,line",
    [
        (
            ["train", "--preset", "fmnist-fc", "--epochs", "1", "--out", "{tmp}/run"],
            "mondeq train needs the training extra: pip install 'mondeq[training]' (missing: "
            "torchvision, numpy, tqdm, matplotlib, pyyaml)",
        ),
        (
            ["serve", "--model-dir", "{tmp}/models"],
            "mondeq serve needs the serving extra: pip install 'mondeq[serving]' (missing: "
            "numpy, fastapi, uvicorn, pydantic, pydantic-settings, orjson, prometheus-client, "
            "python-multipart, pillow, simplejpeg, grpcio, protobuf)",
        ),
    ],
)
def test_a_command_without_its_extra_says_which_in_one_line(floor, cli_env, tmp_path, args, line):
    run = mondeq_in_floor(floor, cli_env, *(a.format(tmp=tmp_path) for a in args))
    assert (run.returncode, run.stdout, run.stderr) == (2, "", line + "\n")
    assert list(tmp_path.iterdir()) == []  # refused before writing anything


@pytest.mark.slow
def test_torch_only_commands_run_in_the_floor(floor, cli_env, tmp_path):
    run = mondeq_in_floor(floor, cli_env, "--help")
    assert run.returncode == 0, run.stderr
    for command in ("bench", "import-locuslab", "train", "serve"):
        assert f"\n    {command}" in run.stdout
    run = mondeq_in_floor(
        floor, cli_env, "bench", "--models", "cifar-multitier", "--batch-size", "2",
        "--repeats", "1", "--device", "cpu", "--json",
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    (row,) = json.loads(run.stdout)
    assert (row["model"], row["params"], row["batch"]) == ("cifar-multitier", 170_194, 2)


@pytest.mark.slow
def test_a_command_module_that_needs_its_extra_at_import_is_refused_too(floor, cli_env, tmp_path):
    """``mondeq serve`` registered from a module that imports fastapi at its top (as a serve
    whose flags come from the settings class would): help still works and lists it as
    unavailable, and running it prints the same one line."""
    stand_in = tmp_path / "path"
    (stand_in / "service").mkdir(parents=True)
    (stand_in / "service" / "__init__.py").write_text("")
    (stand_in / "service" / "cli.py").write_text("import fastapi\n\n\ndef serve(sub):\n    pass\n")
    for entry in Path(cli_env["PYTHONPATH"]).iterdir():
        if entry.name != "service":
            (stand_in / entry.name).symlink_to(entry.resolve(), target_is_directory=True)
    env = {**cli_env, "PYTHONPATH": str(stand_in)}
    line = (
        "mondeq serve needs the serving extra: pip install 'mondeq[serving]' (missing: numpy, "
        "fastapi, uvicorn, pydantic, pydantic-settings, orjson, prometheus-client, "
        "python-multipart, pillow, simplejpeg, grpcio, protobuf)"
    )
    run = mondeq_in_floor(floor, env, "serve", "--port", "8000")
    assert (run.returncode, run.stdout, run.stderr) == (2, "", line + "\n")
    run = mondeq_in_floor(floor, env, "--help")
    assert run.returncode == 0, run.stderr
    assert "unavailable: mondeq serve needs the serving extra" in " ".join(run.stdout.split())


@pytest.mark.slow
def test_the_model_core_suite_passes_in_the_floor(floor):
    """Every test of ``tests/model_core`` (but this file, which builds the floor) passes in
    the venv that has torch and pytest alone."""
    run = subprocess.run(
        [floor, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "tests/model_core",
         "--ignore", "tests/model_core/test_floor.py"],
        capture_output=True, text=True, timeout=1800, cwd=REPO, env=clean_env(),
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert " passed" in run.stdout.splitlines()[-1] and "failed" not in run.stdout.splitlines()[-1]
