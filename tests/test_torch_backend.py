"""The torch backend: Keras semantics made explicit, each trap of DESIGN.md checked by value.

    tox -e torch -- tests/test_torch_backend.py
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")

from conftest import ROOT  # noqa: E402

from backends.base import EvalData, ModelInput, TrainData, bce  # noqa: E402
from backends.torch_backend import (  # noqa: E402
    KerasAdam,
    TorchBackend,
    bce_logits_loss,
    bce_loss,
    build_layers,
    same_padding,
)
from harness.data.augment import apply_augmentation_numpy  # noqa: E402
from harness.errors import UserError  # noqa: E402
from harness.shapes import infer_layer, infer_model  # noqa: E402
from harness.spec import AugmentationSpec, Loss, SequentialModel, load_spec  # noqa: E402

PAPER = ROOT / "specs" / "paper.yaml"
KERAS_AUG = ROOT / "tests" / "data" / "keras_aug_reference.npz"


@pytest.fixture
def backend() -> TorchBackend:
    b = TorchBackend(device="cpu")
    b.seed(0, deterministic=True)
    return b


def sequential(layers: list[dict], lr: float = 1e-3) -> SequentialModel:
    return SequentialModel.model_validate({
        "name": "m", "kind": "sequential", "layers": layers,
        "train": {"optimizer": {"name": "adam", "learning_rate": lr}, "epochs": 1, "batch_size": 4},
    })


def smooth_images(n: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    """Low-frequency images (sums of broad blobs): bilinear resampling is well conditioned."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    out = np.zeros((n, h, w))
    for i in range(n):
        for _ in range(4):
            cy, cx = rng.uniform(0, h), rng.uniform(0, w)
            sd = rng.uniform(0.2, 0.4) * min(h, w)
            r2 = (yy - cy) ** 2 + (xx - cx) ** 2
            out[i] += rng.uniform(40, 120) * np.exp(-r2 / (2 * sd**2))
    return np.clip(out, 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# Parameter counts: the paper's printed numbers, harness.shapes, and the base table


def test_paper_cnn_counts(backend):
    spec = load_spec(PAPER)
    model = spec.model("cnn")
    handle = backend.build(model, ModelInput(224, 3, "rescale"))
    c = backend.count_params(handle)
    inf = infer_model(spec, model)
    assert (c.total, c.trainable, c.non_trainable) == (3_309_921, 3_309_441, 480)
    assert (c.total, c.trainable, c.non_trainable) == (
        inf.counts.total, inf.counts.trainable, inf.counts.non_trainable)
    assert handle.rows == [(r.name, r.shape) for r in inf.rows]


def test_paper_densenet_counts(backend):
    spec = load_spec(PAPER, ["models.densenet.base.weights=none"])
    model = spec.model("densenet")
    handle = backend.build(model, ModelInput(224, 3, "imagenet"))
    c = backend.count_params(handle)
    inf = infer_model(spec, model)
    assert (c.total, c.trainable, c.non_trainable) == (12_644_545, 1_665, 12_642_880)
    assert (c.total, c.trainable, c.non_trainable) == (
        inf.counts.total, inf.counts.trainable, inf.counts.non_trainable)
    assert handle.rows == [(r.name, r.shape) for r in inf.rows]  # (7, 7, 1664) after the ReLU


@pytest.mark.slow
@pytest.mark.parametrize("base", ["densenet121", "densenet201", "vgg16", "resnet50"])
@pytest.mark.parametrize("frozen", [True, False])
def test_other_bases_against_base_table(backend, base, frozen):
    spec = load_spec(PAPER, ["data.image_size=64", f"models.densenet.base.name={base}",
                             "models.densenet.base.weights=none",
                             f"models.densenet.base.frozen={str(frozen).lower()}"])
    model = spec.model("densenet")
    c = backend.count_params(backend.build(model, ModelInput(64, 3, "imagenet")))
    inf = infer_model(spec, model).counts
    if base == "resnet50":
        # Keras' ResNet50 (v1) gives its 53 convolutions biases (26,560 values, trainable);
        # torchvision's (v1.5) has none: a real architecture difference, not a counting one.
        assert inf.total - c.total == 26_560
        assert inf.non_trainable - c.non_trainable == (26_560 if frozen else 0)
    else:
        assert (c.total, c.trainable, c.non_trainable) == (
            inf.total, inf.trainable, inf.non_trainable)


# ---------------------------------------------------------------------------------------------
# Shapes and padding


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


def _inferred(model: SequentialModel, shape: tuple[int, ...]):
    rows = []
    for i, layer in enumerate(model.layers):
        shape, counts = infer_layer(layer, shape, i)
        rows.append((shape, counts))
    return rows


LAYER_SPECS = {
    "valid_strided": [
        {"type": "conv2d", "filters": 4, "kernel": 3, "strides": 2, "padding": "valid"},
        {"type": "maxpool2d", "pool": 3, "strides": 2, "padding": "valid"},
        {"type": "conv2d", "filters": 6, "kernel": [2, 3], "strides": [2, 1], "use_bias": False},
        {"type": "flatten"},
        {"type": "dense", "units": 1, "activation": "sigmoid"},
    ],
    "same_asymmetric": [
        {"type": "conv2d", "filters": 4, "kernel": 4, "strides": 2, "padding": "same",
         "activation": "gelu"},
        {"type": "maxpool2d", "pool": 2, "strides": 2, "padding": "same"},
        {"type": "conv2d", "filters": 5, "kernel": 2, "padding": "same", "activation": "swish"},
        {"type": "avgpool2d", "pool": 3, "strides": 2, "padding": "same"},
        {"type": "global_avg_pool"},
        {"type": "dense", "units": 1, "activation": "sigmoid"},
    ],
    "avgpool_bn_variants": [
        {"type": "conv2d", "filters": 8, "kernel": 3, "padding": "same", "use_bias": False},
        {"type": "batchnorm", "center": False},
        {"type": "activation", "activation": "elu"},
        {"type": "avgpool2d", "pool": 2, "padding": "valid"},
        {"type": "batchnorm", "scale": False, "center": False, "epsilon": 0.01},
        {"type": "dropout", "rate": 0.5},
        {"type": "flatten"},
        {"type": "dense", "units": 3, "activation": "selu", "kernel_initializer": "lecun_normal"},
        {"type": "batchnorm", "scale": False, "momentum": 0.9},
        {"type": "dense", "units": 1, "activation": "sigmoid", "use_bias": False},
    ],
}


@pytest.mark.parametrize("name", sorted(LAYER_SPECS))
@pytest.mark.parametrize("size", [31, 32])
def test_layer_shapes_and_counts_equal_inference(backend, name, size):
    model = sequential(LAYER_SPECS[name])
    handle = backend.build(model, ModelInput(size, 1, "rescale"))
    rows = _inferred(model, (size, size, 1))
    assert _forward_shapes(handle, size, 1) == [s for s, _ in rows]
    assert [s for _, s in handle.rows] == [s for s, _ in rows]
    c = backend.count_params(handle)
    assert (c.total, c.trainable, c.non_trainable) == (
        sum(r.total for _, r in rows), sum(r.trainable for _, r in rows),
        sum(r.non_trainable for _, r in rows))


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


def test_unknown_layer_type_lists_the_table():
    class Conv3D:
        type = "conv3d"

    with pytest.raises(UserError, match=r"unknown layer type 'conv3d'; known: conv2d, batchnorm"):
        build_layers((Conv3D(),), (1, 8, 8))


# ---------------------------------------------------------------------------------------------
# BatchNorm, initializers, loss, optimizers


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


def test_bce_form_probabilities_is_keras_formula_on_clipped_probabilities():
    p = torch.tensor([0.9, 0.2, 1.0, 0.0, 0.5])
    y = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0])
    eps = 1e-7
    hi = float(np.float32(1 - eps))  # float32 clip bound, as in Keras: 1 - 1.19e-7
    lo = float(np.float32(eps))
    by_hand = -(math.log(0.9) + math.log(0.8) + math.log(hi) + math.log(lo) + math.log(0.5)) / 5
    got = bce_loss(p, y, Loss(form="probabilities", epsilon=eps)).item()
    assert got == pytest.approx(by_hand, rel=1e-6)
    ls = 0.2  # Keras: y (1 - ls) + ls / 2 -> 0.9 / 0.1
    ys = [0.9, 0.1, 0.9, 0.9, 0.1]
    pc = [0.9, 0.2, hi, lo, 0.5]
    terms = [t * math.log(q) + (1 - t) * math.log(1 - q) for t, q in zip(ys, pc, strict=True)]
    by_hand = -sum(terms) / 5
    smoothed = bce_loss(p, y, Loss(epsilon=eps, label_smoothing=ls)).item()
    assert smoothed == pytest.approx(by_hand, rel=1e-5)
    inside = slice(0, 2)  # unsaturated: the harness's float64 numpy bce agrees
    assert bce_loss(p[inside], y[inside], Loss()).item() == pytest.approx(
        bce(y[inside].numpy(), p[inside].numpy()), rel=1e-6)
    # the clip stops the gradient at saturation, as tf.clip_by_value does
    q = torch.tensor([1.0], requires_grad=True)
    bce_loss(q, torch.tensor([0.0]), Loss()).backward()
    assert q.grad.item() == 0.0


def stable_bce(labels, logits, label_smoothing=0.0):
    """max(x, 0) - x y + log(1 + exp(-|x|)) per sample, float64: the logits form, by hand."""
    x = np.asarray(logits, np.float64)
    y = np.asarray(labels, np.float64) * (1 - label_smoothing) + 0.5 * label_smoothing
    return np.maximum(x, 0) - x * y + np.log1p(np.exp(-np.abs(x)))


def clipped_bce(labels, probs, epsilon=1e-7, label_smoothing=0.0):
    """The probabilities form, by hand, with float32's clip bounds (as in Keras)."""
    lo, hi = float(np.float32(epsilon)), float(np.float32(1 - epsilon))
    p = np.clip(np.asarray(probs, np.float64), lo, hi)
    y = np.asarray(labels, np.float64) * (1 - label_smoothing) + 0.5 * label_smoothing
    return -(y * np.log(p) + (1 - y) * np.log(1 - p))


LOGITS = np.array([40.0, -3.0, 0.5])
LOGIT_LABELS = np.array([0.0, 1.0, 1.0])


def test_bce_logits_is_the_stable_formula():
    z = torch.tensor(LOGITS, dtype=torch.float32)
    y = torch.tensor(LOGIT_LABELS, dtype=torch.float32)
    got = bce_logits_loss(z, y, Loss()).item()
    assert got == pytest.approx(stable_bce(LOGIT_LABELS, LOGITS).mean(), rel=1e-6)
    assert got == pytest.approx((40 + 3.048587351573742 + 0.47407698418010663) / 3, rel=1e-6)
    smoothed = bce_logits_loss(z, y, Loss(label_smoothing=0.1)).item()
    assert smoothed == pytest.approx(stable_bce(LOGIT_LABELS, LOGITS, 0.1).mean(), rel=1e-6)
    per_sample = bce_logits_loss(z, y, Loss(), reduction="none").double().numpy()
    np.testing.assert_allclose(per_sample, stable_bce(LOGIT_LABELS, LOGITS), rtol=1e-6)
    # the clipped formula caps the confidently wrong prediction at -log(1.19e-7) = 15.94
    clipped = bce_loss(torch.sigmoid(z), y, Loss(form="probabilities")).item()
    assert clipped == pytest.approx((15.942385 + 3.048587 + 0.474077) / 3, rel=1e-5)
    assert clipped == pytest.approx(
        clipped_bce(LOGIT_LABELS, torch.sigmoid(z).double().numpy()).mean(), rel=1e-6)


def test_bce_gradient_at_saturation_nonzero_from_logits_zero_from_clipped_probabilities():
    z = torch.tensor([40.0], requires_grad=True)
    bce_logits_loss(z, torch.tensor([0.0]), Loss()).backward()
    assert z.grad.item() == pytest.approx(1.0)  # sigmoid(40) - 0
    z = torch.tensor([40.0], requires_grad=True)
    bce_loss(torch.sigmoid(z), torch.tensor([0.0]), Loss(form="probabilities")).backward()
    assert z.grad.item() == 0.0


def linear_unit(form: str, lr: float = 1e-12, smoothing: float = 0.0, last: str = "dense"):
    """A 1x1-pixel model whose logit is 0.5 * pixel - 3: pixels 86, 0, 7 give 40, -3, 0.5."""
    layers = [{"type": "flatten"}, {"type": "dense", "units": 1, "activation": "sigmoid"}]
    if last == "activation":
        layers = [{"type": "flatten"}, {"type": "dense", "units": 1},
                  {"type": "activation", "activation": "sigmoid"}]
    return SequentialModel.model_validate({
        "name": "unit", "kind": "sequential", "layers": layers,
        "train": {"optimizer": {"name": "sgd", "learning_rate": lr}, "epochs": 1,
                  "batch_size": 3, "shuffle": False,
                  "loss": {"form": form, "label_smoothing": smoothing}},
    })


def unit_handle(backend, model):
    handle = backend.build(model, ModelInput(1, 1, "none"))
    dense = handle.net.head.dense_1
    with torch.no_grad():
        dense.weight.fill_(0.5)
        dense.bias.fill_(-3.0)
    return handle


UNIT_IMAGES = np.array([86, 0, 7], np.uint8).reshape(3, 1, 1)
NO_AUG = AugmentationSpec(enabled=False)


@pytest.mark.parametrize("last", ["dense", "activation"])
def test_loss_forms_by_hand_in_training_and_validation(backend, last):
    stable = stable_bce(LOGIT_LABELS, LOGITS).mean()
    for form, expected in [("auto", stable), ("probabilities", None)]:
        model = linear_unit(form, last=last)
        handle = unit_handle(backend, model)
        probs = backend.predict(handle, UNIT_IMAGES)
        np.testing.assert_allclose(probs, 1 / (1 + np.exp(-LOGITS)), rtol=1e-6)
        if expected is None:
            expected = clipped_bce(LOGIT_LABELS, probs).mean()
            assert expected == pytest.approx((15.942385 + 3.048587 + 0.474077) / 3, rel=1e-5)
        assert model.train.loss.on_logits(model.layers[-1]) == (form == "auto")
        train = TrainData(UNIT_IMAGES, np.arange(3), LOGIT_LABELS.astype(np.float32), NO_AUG,
                          seed=0, shuffle=False)
        hist = backend.fit(handle, train, EvalData(UNIT_IMAGES, LOGIT_LABELS), model.train)
        assert hist[0].loss == pytest.approx(expected, rel=1e-6), form  # lr 1e-12: no change
        if form == "probabilities":  # validation: the harness's float64 `bce` (clip 1 - 1e-7,
            expected = bce(LOGIT_LABELS, probs)  # not float32's 1 - 1.19e-7): 16.118, not 15.942
            assert expected == pytest.approx((16.118096 + 3.048587 + 0.474077) / 3, rel=1e-5)
        assert hist[0].val_loss == pytest.approx(expected, rel=1e-6), form
        v_loss, v_probs = backend.evaluate_loss(handle, UNIT_IMAGES, LOGIT_LABELS, model.train)
        assert v_loss == pytest.approx(expected, rel=1e-6)
        np.testing.assert_allclose(v_probs, probs, rtol=1e-7)


def test_training_at_saturation_moves_weights_only_from_logits(backend):
    wrong = np.array([255, 255, 255], np.uint8).reshape(3, 1, 1)  # logit 124.5, label 0
    labels = np.zeros(3, np.float32)
    moved = {}
    for form in ("auto", "probabilities"):
        model = linear_unit(form, lr=0.01)
        handle = unit_handle(backend, model)
        train = TrainData(wrong, np.arange(3), labels, NO_AUG, seed=0, shuffle=False)
        backend.fit(handle, train, None, model.train)
        dense = handle.net.head.dense_1
        moved[form] = (dense.weight.item() - 0.5, dense.bias.item() + 3)
    # from logits: d loss / d logit = sigmoid(124.5) - 0 = 1 -> kernel -= 0.01 * 255, bias -= 0.01
    assert moved["auto"] == pytest.approx((-2.55, -0.01), rel=1e-5)
    assert moved["probabilities"] == (0.0, 0.0)  # the clip stops the gradient


def test_sigmoid_of_logits_is_the_model_output(backend):
    _, model = tiny_cnn()
    handle = backend.build(model, ModelInput(32, 3, "rescale"))
    imgs, _ = tiny_data(5)
    handle.net.eval()
    with torch.no_grad():
        x = backend._preprocess(backend._to_device(imgs), handle)
        z = handle.net.logits(x).reshape(-1)
        assert torch.equal(torch.sigmoid(z), handle.net(x).reshape(-1))
    np.testing.assert_array_equal(torch.sigmoid(z).double().numpy(), backend.predict(handle, imgs))


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
# Pretrained bases: weights, offline errors, frozen semantics


def densenet121_model(weights: str = "none", frozen: bool = True, lr: float = 1e-2):
    spec = load_spec(PAPER, ["data.image_size=32", "models.densenet.base.name=densenet121",
                             f"models.densenet.base.weights={weights}",
                             f"models.densenet.base.frozen={str(frozen).lower()}",
                             f"models.densenet.train.optimizer.learning_rate={lr}",
                             "models.densenet.train.epochs=2",
                             "models.densenet.train.batch_size=4"])
    return spec, spec.model("densenet")


def test_imagenet_weights_offline_error_names_file_folder_and_alternative(backend, tmp_path,
                                                                          monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    spec = load_spec(PAPER)
    with pytest.raises(UserError) as e:
        backend.build(spec.model("densenet"), ModelInput(224, 3, "imagenet"))
    msg = str(e.value)
    assert "densenet169-b2777c0a.pth" in msg and "weights: none" in msg
    assert str(tmp_path / "hub" / "checkpoints") in msg
    assert "\n" not in msg


def test_missing_local_weights_file(backend, tmp_path):
    _, model = densenet121_model(weights=str(tmp_path / "nope.pth"))
    with pytest.raises(UserError, match=r"weights file '.*nope\.pth' not found"):
        backend.build(model, ModelInput(32, 3, "imagenet"))


def test_local_weights_file_with_legacy_keys_round_trips(backend, tmp_path):
    torch.manual_seed(123)
    state = torchvision.models.densenet121(weights=None).state_dict()
    legacy = {re.sub(r"(denselayer\d+\.)(norm|relu|conv)([12])\.", r"\1\2.\3.", k): v
              for k, v in state.items()}
    assert any(".norm.1." in k for k in legacy)
    path = tmp_path / "densenet121-local.pth"
    torch.save(legacy, path)
    _, model = densenet121_model(weights=str(path))
    net = backend.build(model, ModelInput(32, 3, "imagenet")).net
    loaded = net.base.state_dict()
    for key in ("features.conv0.weight", "features.denseblock1.denselayer1.norm1.running_var",
                "features.denseblock4.denselayer16.conv2.weight", "features.norm5.bias"):
        assert torch.equal(loaded[key], state[key])


def test_local_weights_file_of_another_model_is_a_user_error(backend, tmp_path):
    path = tmp_path / "vgg.pth"
    torch.save({"features.0.weight": torch.zeros(1)}, path)
    _, model = densenet121_model(weights=str(path))
    with pytest.raises(UserError, match="does not match torchvision's densenet121"):
        backend.build(model, ModelInput(32, 3, "imagenet"))


def test_frozen_base_is_unchanged_by_training_and_head_learns(backend):
    spec, model = densenet121_model(frozen=True)
    handle = backend.build(model, ModelInput(32, 3, "imagenet"))
    c = backend.count_params(handle)
    assert (c.trainable, c.total) == (1025, 7_038_529)
    before = {k: v.clone() for k, v in handle.net.state_dict().items()}
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 255, size=(12, 32, 32)).astype(np.uint8)
    labels = (np.arange(12) % 2).astype(np.float32)
    train = TrainData(imgs, np.arange(8), labels[:8], spec.augmentation, seed=0)
    hist = backend.fit(handle, train, EvalData(imgs[8:], labels[8:]), model.train)
    assert len(hist) == 2 and all(np.isfinite(h.loss) for h in hist)
    handle.net.train()
    assert not handle.net.base.training and handle.net.head.training
    after = handle.net.state_dict()
    base_keys = [k for k in before if k.startswith("base.")]
    assert any(k.endswith("running_mean") for k in base_keys)
    assert all(torch.equal(before[k], after[k]) for k in base_keys)
    assert not torch.equal(before["head.dense_1.weight"], after["head.dense_1.weight"])
    p = backend.predict(handle, imgs)
    assert p.shape == (12,) and p.dtype == np.float64 and np.all((p >= 0) & (p <= 1))


# ---------------------------------------------------------------------------------------------
# Training loop, prediction, seeding, devices


def tiny_cnn(epochs: int = 1):
    spec = load_spec(PAPER, ["data.image_size=32", "models.cnn.layers[17].units=8",
                             f"models.cnn.train.epochs={epochs}", "models.cnn.train.batch_size=8"])
    return spec, spec.model("cnn")


def tiny_data(n: int = 20, size: int = 32, seed: int = 0):
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 255, size=(n, size, size)).astype(np.uint8),
            (np.arange(n) % 2).astype(np.float32))


def test_fit_history_and_predict(backend):
    spec, model = tiny_cnn(epochs=2)
    imgs, labels = tiny_data(26)
    handle = backend.build(model, ModelInput(32, 3, "rescale"))
    seen = []
    train = TrainData(imgs, np.arange(21), labels[:21], spec.augmentation, seed=0)
    hist = backend.fit(handle, train, EvalData(imgs[21:], labels[21:]), model.train, seen.append)
    assert seen == hist and [h.epoch for h in hist] == [1, 2]
    assert all(h.images == 21 for h in hist)  # the last, partial batch (5) is kept
    assert hist[0].first_step_seconds > 0 and hist[1].first_step_seconds is None
    assert all(h.seconds >= h.train_seconds > 0 for h in hist)
    assert all(0 <= h.accuracy <= 1 and h.val_loss is not None for h in hist)
    p = backend.predict(handle, imgs[21:], batch_size=2)
    assert p.shape == (5,) and p.dtype == np.float64 and np.all((p >= 0) & (p <= 1))
    # form auto, model ending in a sigmoid: the validation loss is from the logits
    handle.net.eval()
    with torch.no_grad():
        x = backend._preprocess(backend._to_device(imgs[21:]), handle)
        z = handle.net.logits(x).reshape(-1).double().numpy()
    assert hist[-1].val_loss == pytest.approx(stable_bce(labels[21:], z).mean(), rel=1e-6)
    assert hist[-1].val_loss == pytest.approx(bce(labels[21:], p), rel=1e-5)  # unsaturated


def test_same_seed_same_training_in_process():
    spec, model = tiny_cnn()
    imgs, labels = tiny_data(20)
    outs = []
    for _ in range(2):
        b = TorchBackend(device="cpu")
        b.seed(5, deterministic=True)
        h = b.build(model, ModelInput(32, 3, "rescale"))
        b.fit(h, TrainData(imgs, np.arange(16), labels[:16], spec.augmentation, seed=5), None,
              model.train)
        outs.append(b.predict(h, imgs[16:]))
    assert np.array_equal(outs[0], outs[1])


def test_nan_loss_raises_with_epoch_and_step(backend, monkeypatch):
    import backends.torch_backend as tb

    spec, model = tiny_cnn()
    imgs, labels = tiny_data(20)
    handle = backend.build(model, ModelInput(32, 3, "rescale"))
    calls = {"n": 0}
    real = tb.bce_logits_loss  # form auto, model ending in a sigmoid: the logits form

    def poisoned(z, y, loss):
        calls["n"] += 1
        out = real(z, y, loss)
        return out * float("nan") if calls["n"] == 2 else out

    monkeypatch.setattr(tb, "bce_logits_loss", poisoned)
    with pytest.raises(FloatingPointError, match="loss became NaN at epoch 1 step 2"):
        backend.fit(handle, TrainData(imgs, np.arange(20), labels, spec.augmentation, seed=0),
                    None, model.train)


def test_environment_and_memory_on_cpu(backend):
    env = backend.environment()
    assert env["name"] == "torch" and env["device"] == "cpu"
    assert env["versions"]["torch"] == torch.__version__
    assert env["determinism"]["use_deterministic_algorithms"] is True
    assert env["determinism"]["cudnn_benchmark"] is False
    assert env["threads"] == torch.get_num_threads()
    assert backend.peak_memory() == {}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_gpu_request_without_cuda_is_a_user_error():
    with pytest.raises(UserError, match="device: gpu requested"):
        TorchBackend(device="gpu")


def test_pre_import_env_table():
    from backends.torch_env import PRE_IMPORT_ENV

    assert PRE_IMPORT_ENV["deterministic"]["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert set(PRE_IMPORT_ENV) == {"deterministic", "default"}


# ---------------------------------------------------------------------------------------------
# Augmentation on the device against the harness's numpy oracle (and Keras', when present)


def _params(n, angle=0.0, scale=1.0, hflip=False, vflip=False):
    return (np.full(n, angle, np.float32), np.full(n, scale, np.float32),
            np.full(n, hflip), np.full(n, vflip))


def test_augment_identity_and_flips_are_exact(backend):
    imgs = np.random.default_rng(0).integers(0, 255, size=(3, 9, 12)).astype(np.uint8)
    assert np.array_equal(backend.augment(imgs, *_params(3)), imgs.astype(np.float32))
    assert np.array_equal(backend.augment(imgs, *_params(3, hflip=True)),
                          imgs[:, :, ::-1].astype(np.float32))
    assert np.array_equal(backend.augment(imgs, *_params(3, vflip=True)),
                          imgs[:, ::-1, :].astype(np.float32))


def test_augment_rot90_of_a_square_image(backend):
    imgs = np.random.default_rng(1).integers(0, 255, size=(2, 16, 16)).astype(np.uint8)
    out = backend.augment(imgs, *_params(2, angle=90.0))
    np.testing.assert_allclose(out, np.rot90(imgs, 1, axes=(1, 2)).astype(np.float32), atol=1e-4)


@pytest.mark.parametrize("shape", [(32, 32), (24, 40), (41, 29)])
def test_augment_agrees_with_numpy_oracle(backend, shape):
    n = 16
    imgs = smooth_images(n, *shape, seed=2)
    rng = np.random.default_rng(3)
    angle = rng.uniform(-30, 30, n).astype(np.float32)
    scale = rng.uniform(0.8, 1.25, n).astype(np.float32)
    hflip, vflip = rng.random(n) < 0.5, rng.random(n) < 0.5
    angle[0], scale[0] = 0.0, 1.0  # mixed batch: one identity-geometry sample
    ours = backend.augment(imgs, angle, scale, hflip, vflip)
    oracle = apply_augmentation_numpy(imgs, angle, scale, hflip, vflip)
    assert np.mean(np.abs(ours - oracle)) < 1 / 255
    assert np.max(np.abs(ours - oracle)) < 1e-3


def test_augment_agrees_with_keras_reference(backend):
    if not KERAS_AUG.exists():
        pytest.skip(f"{KERAS_AUG.relative_to(ROOT)} not there yet (written by the Keras backend "
                    "tests in the tf env)")
    ref = np.load(KERAS_AUG)
    keys = set(ref.files)
    pick = lambda *names: next((ref[k] for k in names if k in keys), None)  # noqa: E731
    images = pick("images", "inputs")
    outputs = pick("outputs", "augmented", "keras")
    params = [pick(k) for k in ("angle", "scale", "hflip", "vflip")]
    if images is None or outputs is None or any(p is None for p in params):
        pytest.skip(f"{KERAS_AUG.name} has keys {sorted(keys)}; expected images/inputs, "
                    "angle, scale, hflip, vflip, outputs/augmented")
    ours = backend.augment(images, *params)
    assert np.mean(np.abs(ours - np.asarray(outputs, np.float32).reshape(ours.shape))) < 1 / 255


def test_augmentation_is_applied_in_fit_only_when_enabled(backend, monkeypatch):
    import backends.torch_backend as tb

    spec, model = tiny_cnn()
    imgs, labels = tiny_data(8)
    handle = backend.build(model, ModelInput(32, 3, "rescale"))
    calls = []
    real = tb.augment_tensor
    monkeypatch.setattr(tb, "augment_tensor", lambda *a: calls.append(1) or real(*a))
    off = AugmentationSpec(enabled=False)
    backend.fit(handle, TrainData(imgs, np.arange(8), labels, off, seed=0), None, model.train)
    assert calls == []
    backend.fit(handle, TrainData(imgs, np.arange(8), labels, spec.augmentation, seed=0), None,
                model.train)
    assert len(calls) == 1
