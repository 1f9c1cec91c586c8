"""The typed contract: ModelConfig (dict form, checks, registry dispatch) and InputSpec (checks,
the one normalisation, the dict view older callers read)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from model_core import (
    ArchitectureParts,
    InputSpec,
    ModelConfig,
    SolverSettings,
    build_model,
    load_checkpoint,
    normalize_config,
    register_architecture,
    save_checkpoint,
)
from model_core.config import ARCHITECTURES
from model_core.nonlinearity import ReLU
from model_core.operators import FCOperator

FC = {"arch": "fc", "in_channels": 1, "image_size": 6, "hidden": 8}
CONV = {"arch": "conv", "in_channels": 2, "image_size": 6, "channels": 3}
MT = {"arch": "multi_tier", "in_channels": 1, "image_size": 6, "channels": [2, 3]}

# ---- ModelConfig ----------------------------------------------------------------------------


@pytest.mark.parametrize("config", [FC, CONV, MT], ids=lambda c: c["arch"])
def test_build_model_takes_the_dict_or_the_model_config_alike(config):
    cfg = ModelConfig.from_dict(config)
    assert cfg.to_dict() == normalize_config(config)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    torch.manual_seed(0)
    from_dict = build_model(config)
    torch.manual_seed(0)
    from_cfg = build_model(cfg)
    assert from_cfg.model_config == from_dict.model_config == cfg
    assert from_cfg.config == from_dict.config == cfg.to_dict()
    a, b = from_dict.state_dict(), from_cfg.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    x = torch.rand(2, config["in_channels"], 6, 6)
    assert torch.equal(from_dict.infer(x).logits, from_cfg.infer(x).logits)


def test_the_dict_form_fills_the_defaults_in_a_fixed_order():
    assert list(normalize_config(MT).items()) == [
        ("arch", "multi_tier"),
        ("channels", [2, 3]),
        ("m", 1.0),
        ("solver", SolverSettings().to_dict()),
        ("in_channels", 1),
        ("image_size", 6),
        ("num_classes", 10),
    ]
    cfg = ModelConfig.from_dict({**MT, "m": 2, "num_classes": 3, "solver": {"tol": 1e-4}})
    assert (cfg.m, cfg.num_classes, cfg.solver.tol, cfg.arch_params["channels"]) == (
        2.0,
        3,
        1e-4,
        (2, 3),
    )


@pytest.mark.parametrize(
    "config, message",
    [
        ({**FC, "channels": 4}, "fc config has unknown keys ['channels']"),
        ({**FC, "hiden": 4}, "fc config has unknown keys ['hiden']"),
        ({**MT, "hidden": 4}, "multi_tier config has unknown keys ['hidden']"),
        (
            {"arch": "fc", "in_channels": 1, "image_size": 6},
            "fc config needs a positive int 'hidden', got None",
        ),
        ({**FC, "hidden": True}, "fc config needs a positive int 'hidden', got True"),
        ({**CONV, "channels": 0}, "conv config needs a positive int 'channels', got 0"),
        ({**MT, "channels": [2, 0]}, "multi_tier config needs 'channels' as a list of >= 2 ints"),
        ({**FC, "num_classes": 0}, "config 'num_classes' must be a positive int, got 0"),
        ({**FC, "in_channels": 1.0}, "config 'in_channels' must be a positive int, got 1.0"),
        ({k: v for k, v in FC.items() if k != "image_size"}, "config 'image_size' must be a"),
        ({**FC, "m": float("nan")}, "m must be > 0 for a monotone operator, got nan"),
        ({**FC, "m": "1"}, "m must be > 0 for a monotone operator, got '1'"),
        ({**FC, "solver": 3}, "config 'solver' must be a mapping of solver settings, got 3"),
        ({"in_channels": 1, "image_size": 6}, "config 'arch' must be one of "),
        ({**FC, "arch": "rnn"}, "config 'arch' must be one of ['fc', 'conv', 'multi_tier'"),
        ([("arch", "fc")], "model config must be a dict, got list"),
    ],
)
def test_a_wrong_model_config_says_what_is_wrong(config, message):
    with pytest.raises(ValueError) as err:
        ModelConfig.from_dict(config)
    assert str(err.value).startswith(message)
    with pytest.raises(ValueError):
        build_model(config)


def test_model_config_is_frozen():
    cfg = ModelConfig.from_dict(MT)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.arch = "fc"
    with pytest.raises(TypeError):
        cfg.arch_params["channels"] = (5, 5)
    assert cfg.replace(num_classes=3).num_classes == 3 and cfg.num_classes == 10
    assert hash(cfg) == hash(ModelConfig.from_dict(MT)) and cfg != cfg.replace(m=2.0)
    with pytest.raises(ValueError, match="odd"):  # replace checks like a new config
        cfg.replace(image_size=28, arch_params={"channels": [2] * 4})


def test_the_model_holds_m_and_the_solver_settings_once(tmp_path):
    """The config a model reports (and a checkpoint stores) reads them off op and deq."""
    model = build_model(FC)
    model.set_solver(alpha=0.25)
    model.op.m = 0.5
    assert model.model_config.solver is model.solver_settings
    assert (model.model_config.m, model.config["solver"]["alpha"]) == (0.5, 0.25)
    loaded = load_checkpoint(save_checkpoint(model, tmp_path / "m.pt"))
    assert (loaded.op.m, loaded.solver_settings.alpha) == (0.5, 0.25)
    x = torch.rand(3, 1, 6, 6)
    assert torch.equal(loaded.infer(x).logits, model.infer(x).logits)


# ---- the architecture registry -----------------------------------------------------------


def _first_half(op, z):
    return z[:, : z.shape[1] // 2]


def _half_params(params, config):
    hidden = params.pop("hidden", None)
    if not isinstance(hidden, int) or hidden < 2 or hidden % 2:
        raise ValueError(f"fc_half config needs an even 'hidden' >= 2, got {hidden!r}")
    if params:
        raise ValueError(f"fc_half config has unknown keys {sorted(params)}")
    return {"hidden": hidden}


def _build_half(cfg):
    c, s, n = cfg.in_channels, cfg.image_size, cfg.arch_params["hidden"]
    return ArchitectureParts(FCOperator(c * s * s, n, m=cfg.m), ReLU(), _first_half, n // 2, 1.0)


@pytest.fixture()
def fc_half():
    register_architecture("fc_half", _build_half, params=_half_params)
    yield
    del ARCHITECTURES["fc_half"]


def test_a_new_architecture_is_one_registration(fc_half, tmp_path):
    """Built, solved, certified, saved and loaded without a change elsewhere."""
    torch.manual_seed(0)
    model = build_model({"arch": "fc_half", "in_channels": 1, "image_size": 6, "hidden": 8})
    assert model.head.in_features == 4 and model.pool_norm() == 1.0
    with pytest.raises(ValueError, match="even 'hidden'"):
        build_model({"arch": "fc_half", "in_channels": 1, "image_size": 6, "hidden": 7})
    x = torch.rand(5, 1, 6, 6)
    out = model.infer(x, tol=1e-3)  # above float32's certified floor here (2e-4 to 4e-4)
    assert out.logits.shape == (5, 10) and bool(out.stats.converged.all())
    loaded = load_checkpoint(save_checkpoint(model, tmp_path / "m.pt"))
    assert loaded.arch == "fc_half"
    assert torch.equal(loaded.infer(x, tol=1e-3).logits, out.logits)


def test_registry_dispatch_keeps_the_paper_heads():
    """conv average-pools z by 4 (‖pool‖ = 1/4); multi-tier reads its last tier whole."""
    torch.manual_seed(0)
    conv, mt = build_model(CONV), build_model(MT)
    z = torch.randn(2, *conv.op.z_shape)
    assert torch.equal(conv.features(z), F.avg_pool2d(z, 4).flatten(1))
    assert conv.pool_norm() == 0.25 and conv.head.in_features == 3 * 2 * 2  # 8 // 4 = 2
    z = torch.randn(2, *mt.op.z_shape)
    assert torch.equal(mt.features(z), mt.op.split(z)[-1].flatten(1))
    assert mt.pool_norm() == 1.0 and mt.head.in_features == 3 * 5 * 5  # tiers 8, 5


# ---- InputSpec --------------------------------------------------------------------------------

CIFAR = InputSpec((3, 4, 4), (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), ("a", "b"))


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"shape": [1, 6], "mean": [0.0], "std": [1.0], "class_names": ["a"]},
         "input_spec shape must be [C, H, W] of positive ints, got [1, 6]"),
        ({"shape": [2, 6, 6], "mean": [0.0], "std": [1.0, 1.0], "class_names": ["a"]},
         "input_spec mean must be 2 finite numbers, got [0.0]"),
        ({"shape": [1, 6, 6], "mean": [0.0], "std": [-1.0], "class_names": ["a"]},
         "input_spec std must be 1 finite numbers > 0, got [-1.0]"),
        ({"shape": [1, 6, 6], "mean": [0.0], "std": [1.0], "class_names": []},
         "input_spec class_names must be a list of strings, got []"),
        ({"shape": [1, 6, 6], "mean": [0.0], "std": [1.0]},
         "input_spec class_names must be a list of strings, got None"),
        ({"shape": [1, 6, 6], "mean": [0.0], "std": [1.0], "class_names": ["a"], "scale": 255},
         "input_spec has unknown keys ['scale']; it holds ['shape', 'mean', 'std', 'class_names']"),
        ([1, 2], "input_spec must be a mapping, got list"),
    ],
)  # fmt: skip
def test_a_wrong_input_spec_says_what_is_wrong(spec, message):
    with pytest.raises(ValueError) as err:
        InputSpec.from_dict(spec)
    assert str(err.value) == message


def test_input_spec_checked_against_the_model_config():
    cfg = ModelConfig.from_dict({**FC, "num_classes": 3})
    spec = InputSpec.from_dict({"shape": [1, 6, 6], "mean": [0.5], "std": [0.5]}, cfg)
    assert spec.class_names == ("0", "1", "2")  # absent: the config's K, named by index
    with pytest.raises(ValueError, match=r"^input_spec shape \[1, 5, 5\] is not \[1, 6, 6\]$"):
        InputSpec.from_dict({**spec, "shape": [1, 5, 5]}, cfg)
    with pytest.raises(ValueError, match=r"^input_spec class_names must be 3 strings, got"):
        InputSpec((1, 6, 6), (0.5,), (0.5,), ("a",)).check(cfg)
    model = build_model(cfg)
    with pytest.raises(ValueError, match="input_spec shape"):
        model.input_spec = CIFAR
    model.input_spec = {"shape": [1, 6, 6], "mean": [1], "std": [2], "class_names": list("xyz")}
    assert model.input_spec == InputSpec((1, 6, 6), (1.0,), (2.0,), ("x", "y", "z"))
    assert isinstance(model.input_spec.mean[0], float)


def test_input_spec_reads_as_the_dict_it_was():
    """Compatibility for callers that read ``spec["mean"]`` and friends."""
    d = CIFAR.to_dict()
    assert d == {
        "shape": [3, 4, 4],
        "mean": [0.4914, 0.4822, 0.4465],
        "std": [0.2470, 0.2435, 0.2616],
        "class_names": ["a", "b"],
    }
    assert dict(CIFAR) == {**CIFAR} == d
    assert CIFAR.__eq__(d) is True and CIFAR.__eq__({**d, "mean": [0, 0, 0]}) is False
    assert CIFAR["shape"] == [3, 4, 4] and CIFAR.get("class_names") == ["a", "b"]
    assert CIFAR.get("scale") is None and "mean" in CIFAR and len(CIFAR) == 4
    assert CIFAR.shape == (3, 4, 4) and InputSpec.from_dict(d) == CIFAR
    assert hash(InputSpec.from_dict(d)) == hash(CIFAR)
    with pytest.raises(dataclasses.FrozenInstanceError):
        CIFAR.mean = (0.0,)


def _pixels(n=5, dtype=torch.uint8):
    g = torch.Generator().manual_seed(3)
    return torch.randint(0, 256, (n, 3, 4, 4), generator=g, dtype=torch.uint8).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_normalize_is_bit_for_bit_the_former_four(dtype):
    """What training, evaluation, the server (requests and calibration batch) and the load
    bench each computed before this one method, written out as they were."""
    spec, p = CIFAR, _pixels()
    mean_l, std_l = list(spec.mean), list(spec.std)
    # training.data.Normalizer (training and `mondeq eval`), at the run's dtype
    mean = torch.tensor(mean_l, dtype=dtype).view(1, -1, 1, 1)
    std = torch.tensor(std_l, dtype=dtype).view(1, -1, 1, 1)
    trainer = (p.to(dtype) / 255.0 - mean) / std
    assert torch.equal(spec.normalize(p, dtype=dtype), trainer)
    # service.engine: float32 pixels in [0, 1] from a request; uint8 calibration pixels
    m32 = torch.tensor(mean_l, dtype=torch.float32).view(1, 3, 1, 1)
    s32 = torch.tensor(std_l, dtype=torch.float32).view(1, 3, 1, 1)
    request = p.float() / 255.0
    served = (request.to(torch.float32) - m32) / s32
    assert torch.equal(spec.normalize(request, dtype=torch.float32), served)
    assert torch.equal(spec.normalize(p), (p.float() / 255.0 - m32) / s32)
    # bench/service_load: float pixels, torch's default-dtype mean and std
    bench = (request - torch.tensor(mean_l).view(1, 3, 1, 1)) / torch.tensor(std_l).view(1, 3, 1, 1)
    assert torch.equal(spec.normalize(request), bench)


def test_normalize_keeps_device_and_dtype_and_refuses_other_pixels():
    p = _pixels()
    assert spec_out(p) == (torch.float32, torch.device("cpu"))
    assert spec_out(p.double() / 255) == (torch.float64, torch.device("cpu"))
    assert spec_out(p.half() / 255, dtype=torch.float32) == (torch.float32, torch.device("cpu"))
    if torch.cuda.is_available():
        out = CIFAR.normalize(p.cuda())
        assert out.device.type == "cuda" and torch.equal(out.cpu(), CIFAR.normalize(p))
    with pytest.raises(ValueError, match=r"^pixels must be \(B, 3, 4, 4\), got \(3, 4, 4\)$"):
        CIFAR.normalize(p[0])
    with pytest.raises(TypeError, match=r"pixels must be uint8 .* got torch.int64"):
        CIFAR.normalize(p.long())
    with pytest.raises(TypeError, match=r"^dtype must be a floating dtype, got torch.int32$"):
        CIFAR.normalize(p, dtype=torch.int32)


def spec_out(p, **kw):
    out = CIFAR.normalize(p, **kw)
    return out.dtype, out.device


@pytest.mark.parametrize("arch", ["fc", "conv", "multi_tier"])
def test_configs_and_models_deep_copy_and_pickle(arch):
    """A model is deep-copied (a fresh copy to compare against) and pickled (to worker
    processes); its frozen config must survive both, equal to the original."""
    import copy
    import pickle

    configs = {
        "fc": {"arch": "fc", "in_channels": 1, "image_size": 6, "hidden": 8},
        "conv": {"arch": "conv", "in_channels": 2, "image_size": 6, "channels": 4},
        "multi_tier": {"arch": "multi_tier", "in_channels": 1, "image_size": 6, "channels": [3, 4]},
    }
    model = build_model(configs[arch])
    for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert twin.model_config == model.model_config
        assert twin.config == model.config
        x = torch.randn(2, model.input_spec.shape[0], 6, 6)
        torch.testing.assert_close(twin.infer(x).logits, model.infer(x).logits, rtol=0, atol=0)
