"""Models of the reference study, built from (arch, input shape, classes, options).

A builder draws every initial weight from torch's global RNG, which the runner seeds with the
`init` source inside `torch.random.fork_rng`, so initialisation is its own noise source.
"""

from __future__ import annotations

import importlib
from collections import OrderedDict
from typing import Callable

import torch
from torch import nn


def small_cnn(image_shape: tuple[int, int, int], num_classes: int, batch_norm: bool = False,
              width: int = 32) -> nn.Module:
    """The reference study's small CNN: three 3×3 convs (32, 64, 64), two max-pools, a 64-unit
    dense layer. `batch_norm` adds BatchNorm after each conv, as in the study's "with BN" variant.
    The head is sized from the shape ("same" convs, two 2× pools), not by a trial forward pass,
    which would update the BatchNorm running statistics before training starts."""
    c, h, w = image_shape
    chans = [c, width, 2 * width, 2 * width]
    layers: list[nn.Module] = []
    for i in range(3):
        layers.append(nn.Conv2d(chans[i], chans[i + 1], 3, padding=1))
        if batch_norm:
            layers.append(nn.BatchNorm2d(chans[i + 1]))
        layers.append(nn.ReLU())
        if i < 2:
            layers.append(nn.MaxPool2d(2))
    features = nn.Sequential(*layers, nn.Flatten())
    return nn.Sequential(features, nn.Linear(chans[3] * (h // 4) * (w // 4), 64), nn.ReLU(),
                         nn.Linear(64, num_classes))


def mlp(image_shape: tuple[int, int, int], num_classes: int, hidden: int = 128, depth: int = 2) -> nn.Module:
    """A plain ReLU MLP on the flattened image."""
    sizes = [int(torch.tensor(image_shape).prod())] + [hidden] * depth
    layers: list[nn.Module] = [nn.Flatten()]
    for a, b in zip(sizes, sizes[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(sizes[-1], num_classes))


def resnet18(image_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """torchvision's ResNet-18 with the CIFAR stem: a 3×3 stride-1 first conv and no max-pool,
    so 32×32 inputs keep their resolution (as in the reference study's CIFAR ResNet-18). The new
    conv is initialised as torchvision initialises every ResNet conv (Kaiming normal, fan_out)."""
    from torchvision.models import resnet18 as tv_resnet18

    model = tv_resnet18(num_classes=num_classes)
    model.conv1 = _torchvision_init(nn.Conv2d(image_shape[0], 64, 3, stride=1, padding=1, bias=False))
    model.maxpool = nn.Identity()
    return model


MEDIUM_CNN_KERNEL_SIZES = (1, 3, 5, 7)


def medium_cnn(image_shape: tuple[int, int, int], num_classes: int, kernel_size: int = 3) -> nn.Module:
    """The reference study's six-layer "medium" CNN: convs of 32, 32, 64, 64, 128, 128 channels, each
    with BatchNorm and ReLU, a 2×2 max-pool after every second conv, global average pooling, a linear
    head. `kernel_size` (1, 3, 5 or 7, "same" padding) changes which convolution algorithms, and so
    which nondeterministic kernels, a GPU backend can choose from."""
    if kernel_size not in MEDIUM_CNN_KERNEL_SIZES:
        raise ValueError(f"medium_cnn: kernel_size must be one of {MEDIUM_CNN_KERNEL_SIZES}, "
                         f"got {kernel_size}")
    chans = [image_shape[0], 32, 32, 64, 64, 128, 128]
    layers: list[nn.Module] = []
    for i in range(6):
        # No conv bias: the BatchNorm right after it would cancel it.
        layers += [nn.Conv2d(chans[i], chans[i + 1], kernel_size, padding=kernel_size // 2, bias=False),
                   nn.BatchNorm2d(chans[i + 1]), nn.ReLU()]
        if i % 2 == 1:
            layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(chans[-1], num_classes))


def _torchvision_init(conv: nn.Conv2d, mode: str = "fan_out") -> nn.Conv2d:
    """Re-draw a conv's weight as torchvision's models draw theirs (Kaiming normal for ReLU, `mode`
    fan_out, fan_in for DenseNet; zero bias), replacing PyTorch's default uniform init."""
    nn.init.kaiming_normal_(conv.weight, mode=mode, nonlinearity="relu")
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
    return conv


def _adapt_first_conv(model: nn.Module, in_channels: int, mode: str = "fan_out") -> nn.Module:
    """Give `model`'s first Conv2d `in_channels` inputs (grey-scale digits, say), keeping its other
    settings. The new weight is drawn as torchvision initialises these models' convs (Kaiming normal,
    `mode` fan_out, or fan_in for DenseNet), so only the shape differs from the stock stem."""
    name, conv = next((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d))
    if conv.in_channels == in_channels:
        return model
    new = _torchvision_init(nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                                      conv.padding, conv.dilation, conv.groups, conv.bias is not None,
                                      conv.padding_mode), mode)
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent), attr, new)
    return model


# Determinism-cost probes: torchvision's ImageNet architectures, untrained (weights=None: nothing is
# downloaded), unchanged except for the input channels and (VGG) the head. Their stems downsample 32×,
# so they run on 32×32 images but are meant for timing steps, not for CIFAR accuracy. In training mode
# their dropout (MobileNetV2, EfficientNet) and stochastic depth (EfficientNet) draw from the global RNG.

def resnet50(image_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """torchvision's ResNet-50 (ImageNet stem)."""
    from torchvision.models import resnet50 as tv_resnet50

    return _adapt_first_conv(tv_resnet50(weights=None, num_classes=num_classes), image_shape[0])


def vgg16(image_shape: tuple[int, int, int], num_classes: int, batch_norm: bool = False) -> nn.Module:
    """torchvision's VGG-16 convolutional stack (`batch_norm`: VGG-16-BN) with the usual small-image
    head: a 1×1 average pool and one Linear(512, num_classes) instead of the 7×7 pool and the
    25088-4096-4096 classifier with dropout. That head holds ~90% of the stock 134M parameters and would
    only tile the 1×1 feature map of a 32×32 image 49 times; it is never built (building and dropping it
    costs ~0.5 GB and over a second per model). Weights are drawn as torchvision's VGG draws them."""
    from torchvision.models.vgg import cfgs, make_layers

    model = nn.Sequential(OrderedDict(features=make_layers(cfgs["D"], batch_norm=batch_norm),
                                      avgpool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(),
                                      classifier=nn.Linear(512, num_classes)))
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    nn.init.normal_(model.classifier.weight, 0, 0.01)
    nn.init.zeros_(model.classifier.bias)
    return _adapt_first_conv(model, image_shape[0])


def densenet121(image_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """torchvision's DenseNet-121 (its convs use fan_in Kaiming init, hence the mode)."""
    from torchvision.models import densenet121 as tv_densenet121

    model = tv_densenet121(weights=None, num_classes=num_classes)
    return _adapt_first_conv(model, image_shape[0], mode="fan_in")


def mobilenet_v2(image_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """torchvision's MobileNetV2."""
    from torchvision.models import mobilenet_v2 as tv_mobilenet_v2

    return _adapt_first_conv(tv_mobilenet_v2(weights=None, num_classes=num_classes), image_shape[0])


def efficientnet_b0(image_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """torchvision's EfficientNet-B0."""
    from torchvision.models import efficientnet_b0 as tv_efficientnet_b0

    return _adapt_first_conv(tv_efficientnet_b0(weights=None, num_classes=num_classes), image_shape[0])


MODELS: dict[str, Callable[..., nn.Module]] = {
    "small_cnn": small_cnn,
    "mlp": mlp,
    "resnet18": resnet18,
    "medium_cnn": medium_cnn,
    "resnet50": resnet50,
    "vgg16": vgg16,
    "densenet121": densenet121,
    "mobilenet_v2": mobilenet_v2,
    "efficientnet_b0": efficientnet_b0,
}


def builder(arch: str) -> Callable[..., nn.Module]:
    """A registered name, or `package.module:function` for a model of the user's own, built with
    the same (image_shape, num_classes, **options) call. Raises KeyError/ImportError/AttributeError."""
    if ":" not in arch:
        return MODELS[arch]
    module, _, name = arch.partition(":")
    return getattr(importlib.import_module(module), name)


def build(arch: str, image_shape: tuple[int, int, int], num_classes: int, **options) -> nn.Module:
    """Build a model; `options` are the builder's keyword arguments."""
    return builder(arch)(image_shape, num_classes, **options)
