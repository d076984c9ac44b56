"""Every registered model builds, runs forward, and draws its initial weights only from the seed."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from workloads.models import MODELS, build

NUM_CLASSES = 5

# Per model: a 3-channel and a 1-channel input it should handle. VGG-16 and DenseNet-121 pool
# 32× with fixed windows, so 8×8 collapses to nothing: they get 1×32×32 instead.
SHAPES = {
    "small_cnn": [(3, 32, 32), (1, 8, 8)],
    "mlp": [(3, 32, 32), (1, 8, 8)],
    "resnet18": [(3, 32, 32), (1, 8, 8)],
    "medium_cnn": [(3, 32, 32), (1, 8, 8)],
    "resnet50": [(3, 32, 32), (1, 8, 8)],
    "vgg16": [(3, 32, 32), (1, 32, 32)],
    "densenet121": [(3, 32, 32), (1, 32, 32)],
    "mobilenet_v2": [(3, 32, 32), (1, 8, 8)],
    "efficientnet_b0": [(3, 32, 32), (1, 8, 8)],
}
CASES = [(arch, shape) for arch, shapes in SHAPES.items() for shape in shapes]


def _seeded(arch: str, shape: tuple[int, int, int], seed: int, **options) -> nn.Module:
    torch.manual_seed(seed)
    return build(arch, shape, NUM_CLASSES, **options)


def _first_conv(model: nn.Module) -> nn.Conv2d | None:
    return next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)


def test_every_registered_model_is_covered():
    assert set(SHAPES) == set(MODELS)


@pytest.mark.parametrize("arch, shape", CASES, ids=[f"{a}-{'x'.join(map(str, s))}" for a, s in CASES])
def test_forward_gives_one_logit_per_class(arch, shape):
    model = _seeded(arch, shape, 0)
    out = model(torch.randn(2, *shape))  # training mode, batch of 2: BatchNorm needs > 1 value
    assert out.shape == (2, NUM_CLASSES) and torch.isfinite(out).all()
    conv = _first_conv(model)
    assert conv is None or conv.in_channels == shape[0]


@pytest.mark.parametrize("arch", SHAPES)
def test_same_seed_same_weights_other_seed_other_weights(arch):
    shape = SHAPES[arch][1]  # 1 channel: covers the re-drawn first conv too
    a, b, c = (_seeded(arch, shape, seed).state_dict() for seed in (0, 0, 1))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_adapted_first_conv_keeps_its_geometry():
    stock, adapted = _seeded("mobilenet_v2", (3, 32, 32), 0), _seeded("mobilenet_v2", (1, 32, 32), 0)
    s, a = _first_conv(stock), _first_conv(adapted)
    assert (a.in_channels, a.out_channels, a.kernel_size, a.stride, a.padding, a.bias) == \
        (1, s.out_channels, s.kernel_size, s.stride, s.padding, None)


@pytest.mark.parametrize("kernel_size", [1, 3, 5, 7])
def test_medium_cnn_kernel_sizes(kernel_size):
    model = _seeded("medium_cnn", (3, 32, 32), 0, kernel_size=kernel_size)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 6 and all(c.kernel_size == (kernel_size, kernel_size) for c in convs)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, NUM_CLASSES)


def test_medium_cnn_rejects_other_kernel_sizes():
    with pytest.raises(ValueError, match="kernel_size"):
        build("medium_cnn", (3, 32, 32), NUM_CLASSES, kernel_size=4)


def test_vgg16_small_image_head_and_batch_norm_option():
    model = _seeded("vgg16", (3, 32, 32), 0, batch_norm=True)
    assert isinstance(model.classifier, nn.Linear) and model.classifier.in_features == 512
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, NUM_CLASSES)


def test_small_cnn_with_batch_norm_starts_with_untouched_running_stats():
    """Sizing the head must not run the features: a trial forward pass in train mode would leave
    running means of the conv biases and a batch count of 1 before training starts."""
    model = _seeded("small_cnn", (1, 8, 8), 0, batch_norm=True)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 3 and model.training
    for bn in bns:
        assert torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))
        assert torch.equal(bn.running_var, torch.ones_like(bn.running_var))
        assert int(bn.num_batches_tracked) == 0


@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 8, 8), (3, 30, 30)])
def test_small_cnn_head_fits_its_features(shape):
    model = _seeded("small_cnn", shape, 0)
    features, head = model[0], model[1]
    assert features(torch.zeros(2, *shape)).shape[1] == head.in_features


def test_resnet18_cifar_stem_is_initialised_as_torchvision_inits_convs():
    """Kaiming normal, fan_out, ReLU gain: std sqrt(2 / (64 · 3 · 3)) ≈ 0.059, mean 0. PyTorch's
    default init (uniform, bound 1/sqrt(fan_in)) gives std 1/sqrt(3 · 27) ≈ 0.111 for 3 channels."""
    for seed in range(3):
        w = _seeded("resnet18", (3, 32, 32), seed).conv1.weight.detach()
        assert w.shape == (64, 3, 3, 3)
        assert abs(w.std().item() / (2 / (64 * 9)) ** 0.5 - 1) < 0.1
        assert abs(w.mean().item()) < 0.01
