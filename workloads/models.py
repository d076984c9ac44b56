"""Models of the reference study, transformers on `scaled_dot_product_attention`, and models by
name from torchvision and timm, built from (arch, input shape, classes, options).

The input shape is (C, H, W) for images and (T,) for token windows (context length T); `num_classes`
is the vocabulary size for a language model, whose outputs are next-token logits.

A builder draws every initial weight from torch's global RNG, which the runner seeds with the
`init` source inside `torch.random.fork_rng`, so initialisation is its own noise source.
"""

from __future__ import annotations

import functools
import importlib
import math
from collections import OrderedDict
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend


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


# --- transformers on scaled_dot_product_attention -----------------------------------------------

# SDPA's kernels by the names a sweep uses (`attention: [math, flash, efficient, cudnn]`).
SDPA_BACKENDS = {"math": SDPBackend.MATH, "flash": SDPBackend.FLASH_ATTENTION,
                 "efficient": SDPBackend.EFFICIENT_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}
_SDPA_NAMES = {b.value: name for name, b in SDPA_BACKENDS.items()} | {SDPBackend.OVERRIDEABLE.value: "overrideable"}


def sdpa_choice(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool) -> str:
    """The kernel `F.scaled_dot_product_attention(q, k, v, is_causal=...)` runs for these inputs
    under the backend switches in force: `torch._fused_sdp_choice` is the function SDPA's own
    dispatcher asks. Autocast casts SDPA's inputs before that choice, so it is asked for the
    autocast dtype. q, k, v: (B, H, T, D)."""
    if torch.is_autocast_enabled(q.device.type):
        dtype = torch.get_autocast_dtype(q.device.type)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    return _SDPA_NAMES[torch._fused_sdp_choice(q, k, v, None, 0.0, is_causal)]


class SelfAttention(nn.Module):
    """Multi-head self-attention through `F.scaled_dot_product_attention`, whose kernel (math,
    flash, memory-efficient, cuDNN) is a tooling choice: the sweep's `attention` axis restricts it,
    and the first call records in `sdpa_used` the kernel really chosen (not when compiled: inductor
    may replace attention with kernels of its own, so `sdpa_used` stays None). No dropout inside
    attention: every kernel then computes the same function, and only its arithmetic differs."""

    def __init__(self, n_embd: int, n_head: int, causal: bool):
        super().__init__()
        if n_embd % n_head:
            raise ValueError(f"n_embd ({n_embd}) must be a multiple of n_head ({n_head})")
        self.n_head, self.causal = n_head, causal
        self.qkv = nn.Linear(n_embd, 3 * n_embd)
        self.proj = nn.Linear(n_embd, n_embd)
        self.sdpa_used: str | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape  # (B, T, C)
        q, k, v = self.qkv(x).view(b, t, 3, self.n_head, c // self.n_head).permute(2, 0, 3, 1, 4)  # (B, H, T, D)
        if not torch.compiler.is_compiling() and self.sdpa_used is None:
            self.sdpa_used = sdpa_choice(q, k, v, self.causal)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)  # (B, H, T, D)
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class Block(nn.Module):
    """Pre-LayerNorm transformer block (GPT-2, ViT): x + attn(ln(x)), then x + mlp(ln(x)); dropout
    (global RNG: the augment source) on each residual branch. (B, T, C) -> (B, T, C)."""

    def __init__(self, n_embd: int, n_head: int, dropout: float, causal: bool):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(n_embd), nn.LayerNorm(n_embd)
        self.attn = SelfAttention(n_embd, n_head, causal)
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.GELU(), nn.Linear(4 * n_embd, n_embd))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x)))
        return x + self.drop(self.mlp(self.ln2(x)))


def _init_transformer(model: GPT | ViT, n_layer: int) -> nn.Module:
    """GPT-2's initialisation: weights N(0, 0.02) (also the ViT's patch conv, class token and
    position embeddings), biases 0, LayerNorms (1, 0), and the projections back into the residual
    stream (attention output, MLP output) at 0.02/sqrt(2 · n_layer), so that the stream's variance
    does not grow with depth."""
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
    for block in model.blocks:
        for proj in (block.attn.proj, block.mlp[2]):
            nn.init.normal_(proj.weight, 0.0, 0.02 / math.sqrt(2 * n_layer))
    if isinstance(model, ViT):
        nn.init.normal_(model.cls, 0.0, 0.02)
        nn.init.normal_(model.pos, 0.0, 0.02)
    return model


class GPT(nn.Module):
    """A decoder-only transformer (nanoGPT's): token + learned position embeddings, `n_layer`
    causal blocks, a final LayerNorm and a linear head to next-token logits. The head is not tied
    to the token embedding: tied tensors share storage, which a safetensors weights file refuses.
    (B, T) int64 token ids -> (B, T, vocab) logits."""

    def __init__(self, vocab_size: int, context_length: int, n_layer: int, n_head: int, n_embd: int,
                 dropout: float):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab_size, n_embd), nn.Embedding(context_length, n_embd)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.Sequential(*[Block(n_embd, n_head, dropout, causal=True) for _ in range(n_layer)])
        self.ln = nn.LayerNorm(n_embd)
        self.head = nn.Linear(n_embd, vocab_size, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(idx.shape[1], device=idx.device)
        x = self.drop(self.tok(idx) + self.pos(positions))  # (B, T, C)
        return self.head(self.ln(self.blocks(x)))


def gpt(input_shape: tuple[int], num_classes: int, n_layer: int = 2, n_head: int = 4, n_embd: int = 128,
        dropout: float = 0.0) -> nn.Module:
    """A GPT for token windows of `input_shape` = (context length,) over a vocabulary of
    `num_classes` tokens. GPT-2 small is n_layer 12, n_head 12, n_embd 768."""
    (context_length,) = input_shape
    return _init_transformer(GPT(num_classes, context_length, n_layer, n_head, n_embd, dropout), n_layer)


class ViT(nn.Module):
    """A Vision Transformer (Dosovitskiy et al. 2021): non-overlapping patches embedded by a
    stride-`patch_size` conv, a class token, learned position embeddings, `n_layer` bidirectional
    blocks, LayerNorm, a linear head on the class token. (B, C, H, W) -> (B, num_classes)."""

    def __init__(self, image_shape: tuple[int, int, int], num_classes: int, patch_size: int, n_layer: int,
                 n_head: int, n_embd: int, dropout: float):
        super().__init__()
        c, h, w = image_shape
        if h % patch_size or w % patch_size:
            raise ValueError(f"vit: patch_size {patch_size} must divide the image size {h}x{w}")
        n_patches = (h // patch_size) * (w // patch_size)
        self.patch = nn.Conv2d(c, n_embd, patch_size, stride=patch_size)
        self.cls = nn.Parameter(torch.zeros(1, 1, n_embd))
        self.pos = nn.Parameter(torch.zeros(1, 1 + n_patches, n_embd))
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.Sequential(*[Block(n_embd, n_head, dropout, causal=False) for _ in range(n_layer)])
        self.ln = nn.LayerNorm(n_embd)
        self.head = nn.Linear(n_embd, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)  # (B, C, H/p, W/p) -> (B, N, C)
        x = torch.cat([self.cls.expand(len(x), -1, -1), x], dim=1) + self.pos  # (B, 1 + N, C)
        return self.head(self.ln(self.blocks(self.drop(x)))[:, 0])


def vit(image_shape: tuple[int, int, int], num_classes: int, patch_size: int = 4, n_layer: int = 4,
        n_head: int = 4, n_embd: int = 128, dropout: float = 0.0) -> nn.Module:
    """A ViT sized by its options; the default patch of 4 pixels gives 8×8 patches on 32×32 images.
    ViT-B/16 is patch_size 16, n_layer 12, n_head 12, n_embd 768 (at 224×224: 196 patches)."""
    return _init_transformer(ViT(image_shape, num_classes, patch_size, n_layer, n_head, n_embd, dropout), n_layer)


def attention_backend(model: nn.Module) -> str | None:
    """The SDPA kernel the model's first attention call ran (`math`, `flash`, `efficient`, `cudnn`),
    as recorded by `SelfAttention`; None for a model without it (CNNs, torchvision and timm models,
    a model of the user's own), before the first forward pass, and when compiled."""
    return next((m.sdpa_used for m in model.modules() if isinstance(m, SelfAttention)), None)


# --- models by name: torchvision and timm ---------------------------------------------------------

class UnknownModel(ValueError):
    """A `torchvision:<name>` or `timm:<name>` that does not resolve; the message says how to list
    the valid names (or how to install timm)."""


TORCHVISION_LIST = 'python -c "import torchvision.models as m; print(m.list_models(module=m))"'
TIMM_LIST = "python -c \"import timm; print(timm.list_models('{}*'))\""
# torchvision builders whose model is built for one input size (position embeddings, fixed grids)
TORCHVISION_SIZE_ARGS = {"vit_": lambda h, w: {"image_size": h}, "maxvit_": lambda h, w: {"input_size": (h, w)}}


def torchvision_model(name: str, image_shape: tuple[int, int, int], num_classes: int, **options) -> nn.Module:
    """Any classification builder of `torchvision.models`, untrained (weights=None: nothing is
    downloaded), with `num_classes` outputs, the first conv re-drawn for the input channels, and the
    image size passed to the builders that need one (ViT, MaxViT). `options` go to the builder."""
    from torchvision import models as tvm

    c, h, w = image_shape
    size = next((f(h, w) for prefix, f in TORCHVISION_SIZE_ARGS.items() if name.startswith(prefix)), {})
    return _adapt_first_conv(tvm.get_model(name, weights=None, num_classes=num_classes, **size, **options), c)


def timm_model(name: str, image_shape: tuple[int, int, int], num_classes: int, **options) -> nn.Module:
    """`timm.create_model(name, pretrained=False, ...)` with `num_classes` outputs, `in_chans` input
    channels and, for models built for one input size (timm's `fixed_input_size`: ViTs, Swin), the
    dataset's `img_size`. `options` go to create_model."""
    import timm

    c, h, w = image_shape
    cfg = timm.models.get_pretrained_cfg(name)
    size = {"img_size": (h, w)} if cfg is not None and cfg.fixed_input_size else {}
    return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=c, **size, **options)


def _torchvision_builder(name: str) -> Callable[..., nn.Module]:
    from torchvision import models as tvm

    if name not in tvm.list_models(module=tvm):
        raise UnknownModel(f"unknown torchvision model {name!r}; list the classification models with "
                           f"{TORCHVISION_LIST}")
    return functools.partial(torchvision_model, name)


def _timm_builder(name: str) -> Callable[..., nn.Module]:
    try:
        import timm
    except ImportError:
        raise UnknownModel(f"timm:{name} needs timm, which is not installed: pip install -e '.[timm]'") from None
    if not timm.is_model(name):
        raise UnknownModel(f"unknown timm model {name!r}; list them with {TIMM_LIST.format(name.split('_')[0])}")
    return functools.partial(timm_model, name)


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
    "vit": vit,
    "gpt": gpt,
}
TOKEN_MODELS = frozenset({"gpt"})  # take (B, T) token windows; every other registered model takes images
NAMED_MODELS = {"torchvision": _torchvision_builder, "timm": _timm_builder}  # `torchvision:<name>`, `timm:<name>`


def builder(arch: str) -> Callable[..., nn.Module]:
    """A registered name, `torchvision:<name>` or `timm:<name>`, or `package.module:function` for a
    model of the user's own, built with the same (input_shape, num_classes, **options) call. Raises
    UnknownModel for a torchvision/timm name that does not resolve, else KeyError/ImportError/AttributeError."""
    if ":" not in arch:
        return MODELS[arch]
    module, _, name = arch.partition(":")
    if module in NAMED_MODELS:
        return NAMED_MODELS[module](name)
    return getattr(importlib.import_module(module), name)


def build(arch: str, input_shape: tuple[int, ...], num_classes: int, **options) -> nn.Module:
    """Build a model; `options` are the builder's keyword arguments."""
    return builder(arch)(input_shape, num_classes, **options)
