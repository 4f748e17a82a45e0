"""What only the torch backend (backends/torch_backend.py) has: TensorFlow's 'same' padding
arithmetic, the NHWC flatten, BatchNorm and initializer conversions, KerasAdam against Keras'
update rule, torchvision's weights files and legacy keys, torch's own flags and pre-import
environment. Everything every backend must do is in test_backend_conformance.py.

    tox -e torch -- tests/test_torch_backend.py
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
from conftest import available_backends

if "torch" not in available_backends():
    pytest.skip("the torch backend is not this env's backend", allow_module_level=True)

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")

from backend_fixtures import paper, sequential  # noqa: E402
from tools.make_cross_framework_reference import ODD_LAYERS  # noqa: E402

from backends.base import ModelInput  # noqa: E402
from backends.torch_backend import (  # noqa: E402
    KerasAdam,
    TorchBackend,
    build_base,
    build_layers,
    same_padding,
)
from harness.errors import UserError  # noqa: E402
from harness.shapes import infer_layer  # noqa: E402


@pytest.fixture
def backend() -> TorchBackend:
    b = TorchBackend(device="cpu")
    b.seed(0, deterministic=True)
    return b


# ---------------------------------------------------------------------------------------------
# Shapes and padding (the conformance suite reads torch's shapes from the builder's rows:
# here the rows are checked against an actual forward pass)


def _forward_shapes(handle, size: int, channels: int) -> list[tuple[int, ...]]:
    shapes: list[tuple[int, ...]] = []
    hooks = [m.register_forward_hook(lambda _m, _i, o: shapes.append(tuple(o.shape[1:])))
             for m in handle.net.head]
    handle.net.eval()
    with torch.no_grad():
        handle.net(torch.zeros(2, channels, size, size))
    for h in hooks:
        h.remove()
    return [(*s[1:], s[0]) if len(s) == 3 else s for s in shapes]


@pytest.mark.parametrize("name", sorted(ODD_LAYERS))
@pytest.mark.parametrize("size", [31, 32])
def test_forward_shapes_equal_the_builders_rows_and_inference(backend, name, size):
    model = sequential(ODD_LAYERS[name])
    handle = backend.build(model, ModelInput(size, 1, "rescale"))
    shape, inferred = (size, size, 1), []
    for i, layer in enumerate(model.layers):
        shape, _ = infer_layer(layer, shape, i)
        inferred.append(shape)
    assert _forward_shapes(handle, size, 1) == [s for _, s in handle.rows] == inferred


def test_same_padding_puts_the_odd_pixel_after():
    assert same_padding(31, 4, 2) == (1, 2)  # out 16: total 3
    assert same_padding(32, 4, 2) == (1, 1)
    assert same_padding(32, 2, 1) == (0, 1)
    assert same_padding(5, 2, 2) == (0, 1)
    assert same_padding(6, 3, 2) == (0, 1)
    assert same_padding(7, 1, 3) == (0, 0)


def test_same_pools_match_tensorflow_by_hand():
    # 3x3 input 0..8, 2x2 windows, stride 2, 'same': TF pads one row/column at the bottom/right.
    x = torch.arange(9.0).view(1, 1, 3, 3)
    avg, _ = build_layers(sequential([{"type": "avgpool2d", "pool": 2, "padding": "same"},
                                      {"type": "flatten"}, {"type": "dense", "units": 1}]).layers,
                          (1, 3, 3))
    assert avg[0](x).flatten().tolist() == [2.0, 3.5, 6.5, 8.0]  # padding excluded from the mean
    mx, _ = build_layers(sequential([{"type": "maxpool2d", "pool": 2, "padding": "same"},
                                     {"type": "flatten"}, {"type": "dense", "units": 1}]).layers,
                         (1, 3, 3))
    assert mx[0](-x).flatten().tolist() == [0.0, -2.0, -6.0, -8.0]  # -inf padding, not 0


def test_same_conv_with_even_kernel_pads_bottom_right():
    model = sequential([{"type": "conv2d", "filters": 1, "kernel": 2, "padding": "same",
                         "use_bias": False}, {"type": "flatten"}, {"type": "dense", "units": 1}])
    layers, _ = build_layers(model.layers, (1, 3, 3))
    conv = layers[0]
    with torch.no_grad():
        conv.weight.fill_(1.0)
    x = torch.arange(9.0).view(1, 1, 3, 3)
    # TF: windows anchored top-left, zero row/column appended at the bottom/right
    expected = [[8, 12, 7], [20, 24, 13], [13, 15, 8]]
    assert conv(x)[0, 0].tolist() == expected


def test_flatten_is_nhwc_order():
    model = sequential([{"type": "flatten"}, {"type": "dense", "units": 1}])
    layers, rows = build_layers(model.layers, (3, 2, 4))
    x = torch.arange(24.0).view(1, 3, 2, 4)
    assert rows[0] == ("flatten_1", (24,))
    assert layers[0](x)[0].tolist() == x.permute(0, 2, 3, 1).flatten().tolist()
    assert layers[0](x.contiguous(memory_format=torch.channels_last))[0].tolist() == \
        x.permute(0, 2, 3, 1).flatten().tolist()


# ---------------------------------------------------------------------------------------------
# BatchNorm, initializers, optimizers: Keras' semantics in torch


def test_batchnorm_eps_and_momentum_are_converted(backend):
    model = sequential([
        {"type": "batchnorm"},
        {"type": "batchnorm", "epsilon": 1e-5, "momentum": 0.9},
        {"type": "flatten"}, {"type": "dense", "units": 1},
    ])
    net = backend.build(model, ModelInput(4, 1, "none")).net
    bn1, bn2 = net.head[0], net.head[1]
    assert (bn1.eps, bn1.momentum) == (1e-3, pytest.approx(0.01))
    assert (bn2.eps, bn2.momentum) == (1e-5, pytest.approx(0.1))
    x = torch.randn(8, 1, 4, 4) * 3 + 5
    bn1.train()
    bn1(x)
    # Keras: moving = 0.99 moving + 0.01 batch_mean, from moving = 0
    assert bn1.running_mean.item() == pytest.approx(0.01 * x.mean().item(), rel=1e-5)


def test_initializers_follow_keras(backend):
    model = sequential([
        {"type": "conv2d", "filters": 64, "kernel": 3},
        {"type": "conv2d", "filters": 64, "kernel": 3, "kernel_initializer": "he_normal",
         "bias_initializer": "ones"},
        {"type": "flatten"},
        {"type": "dense", "units": 1},
    ])
    head = backend.build(model, ModelInput(8, 32, "none")).net.head
    w1, w2 = head[0].weight, head[1].weight
    limit = math.sqrt(6 / (3 * 3 * 32 + 3 * 3 * 64))  # glorot: fans kh*kw*cin, kh*kw*cout
    assert w1.abs().max().item() <= limit and w1.abs().max().item() > 0.99 * limit
    assert torch.all(head[0].bias == 0)
    std = math.sqrt(2 / (3 * 3 * 64))  # he_normal: truncated at 2 sd of sd/0.8796, variance kept
    assert w2.abs().max().item() <= 2 * std / 0.87962566103423978 + 1e-6
    assert w2.std().item() == pytest.approx(std, rel=0.03)
    assert torch.all(head[1].bias == 1)


def keras_adam_reference(w, grads, lr, b1, b2, eps):
    """Keras 3 Adam.update_step, transcribed (float64)."""
    m, v = np.zeros_like(w), np.zeros_like(w)
    for t, g in enumerate(grads, start=1):
        alpha = lr * math.sqrt(1 - b2**t) / (1 - b1**t)
        m += (g - m) * (1 - b1)
        v += (g * g - v) * (1 - b2)
        w = w - m * alpha / (np.sqrt(v) + eps)
    return w


def test_keras_adam_matches_keras_update_rule():
    rng = np.random.default_rng(0)
    w0 = rng.normal(size=50)
    # gradients near epsilon, where Keras' and torch's epsilon placements differ most
    grads = [rng.normal(size=50) * 10.0 ** rng.uniform(-8, -5, size=50) for _ in range(6)]
    expected = keras_adam_reference(w0.copy(), grads, 1e-3, 0.9, 0.999, 1e-7)

    def run(cls, **kw):
        p = torch.nn.Parameter(torch.tensor(w0))
        opt = cls([p], lr=1e-3, betas=(0.9, 0.999), eps=1e-7, **kw)
        for g in grads:
            p.grad = torch.tensor(g)
            opt.step()
        return p.detach().numpy()

    ours = run(KerasAdam, amsgrad=False)
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-12)
    plain = run(torch.optim.Adam)
    assert np.max(np.abs(plain - expected)) > 1e-5  # the trap is real


# ---------------------------------------------------------------------------------------------
# torchvision weights files; torch's flags and pre-import environment


def densenet121_model(weights: str):
    spec = paper("data.image_size=32", "models.densenet.base.name=densenet121",
                 f"models.densenet.base.weights={weights}")
    return spec.model("densenet")


def test_local_weights_file_with_legacy_keys_round_trips(backend, tmp_path):
    torch.manual_seed(123)
    state = torchvision.models.densenet121(weights=None).state_dict()
    legacy = {re.sub(r"(denselayer\d+\.)(norm|relu|conv)([12])\.", r"\1\2.\3.", k): v
              for k, v in state.items()}
    assert any(".norm.1." in k for k in legacy)
    path = tmp_path / "densenet121-local.pth"
    torch.save(legacy, path)
    model = densenet121_model(str(path))
    net = backend.build(model, ModelInput(32, 3, "imagenet")).net
    loaded = net.base.state_dict()
    for key in ("features.conv0.weight", "features.denseblock1.denselayer1.norm1.running_var",
                "features.denseblock4.denselayer16.conv2.weight", "features.norm5.bias"):
        assert torch.equal(loaded[key], state[key])


def test_local_weights_file_of_another_model_is_a_user_error(backend, tmp_path):
    path = tmp_path / "vgg.pth"
    torch.save({"features.0.weight": torch.zeros(1)}, path)
    model = densenet121_model(str(path))
    with pytest.raises(UserError, match="does not match torchvision's densenet121"):
        backend.build(model, ModelInput(32, 3, "imagenet"))


def test_environment_reports_torch_flags_and_threads(backend):
    env = backend.environment()
    det = env["determinism"]
    assert (det["cudnn_deterministic"], det["cudnn_benchmark"]) == (True, False)
    assert (det["cuda_matmul_allow_tf32"], det["cudnn_allow_tf32"]) == (False, False)
    assert det["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert env["threads"] == torch.get_num_threads()
    assert env["versions"]["torchvision"] == torchvision.__version__


def test_pre_import_env_table():
    from backends.torch_env import PRE_IMPORT_ENV

    assert PRE_IMPORT_ENV["deterministic"]["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert set(PRE_IMPORT_ENV) == {"deterministic", "default"}


@pytest.mark.parametrize(("size", "pads"), [(32, (0, 1, 0, 1)), (33, (1, 1, 1, 1))])
def test_mobilenet_v2_pads_strided_convs_as_keras(size, pads):
    """Keras' MobileNetV2 pads before a stride-2 conv as TensorFlow's 'same' (correct_pad): an
    even input gets its extra row and column after only; torchvision pads 1 on every side."""
    base = build_base("mobilenet_v2", "none").eval()
    strided = [m for m in base.modules() if isinstance(m, torch.nn.Conv2d) and m.stride == (2, 2)]
    assert len(strided) == 5  # the stem and the four stride-2 depthwise convs
    norms = [m for m in base.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert {(m.eps, m.momentum) for m in norms} == {(1e-3, 0.001)}  # Keras' 1e-3 and 0.999
    stem = strided[0]
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    expected = torch.nn.functional.conv2d(torch.nn.functional.pad(x, pads), stem.weight,
                                          stride=2)
    assert stem.padding == (0, 0)
    torch.testing.assert_close(stem(x), expected, rtol=0, atol=0)
    assert stem(x).shape[-1] == -(-size // 2)
