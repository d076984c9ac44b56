"""Every registered model builds, runs forward, and draws its initial weights only from the seed;
the transformers attend as they should and record their attention kernel; torchvision and timm
models resolve by name, sized to the data."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from workloads.models import MODELS, TOKEN_MODELS, UnknownModel, attention_backend, build
from workloads.train import sdpa_backend

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
    "vit": [(3, 32, 32), (1, 8, 8)],
    "gpt": [(16,), (3,)],  # token windows: (context length,)
}
CASES = [(arch, shape) for arch, shapes in SHAPES.items() for shape in shapes]


def _seeded(arch: str, shape: tuple[int, int, int], seed: int, **options) -> nn.Module:
    torch.manual_seed(seed)
    return build(arch, shape, NUM_CLASSES, **options)


def _input(arch: str, shape: tuple[int, ...], batch: int = 2) -> torch.Tensor:
    """Images (B, C, H, W), or token ids (B, T) below the vocabulary size for a language model."""
    return torch.randint(NUM_CLASSES, (batch, *shape)) if arch in TOKEN_MODELS else torch.randn(batch, *shape)


def _first_conv(model: nn.Module) -> nn.Conv2d | None:
    return next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)


def test_every_registered_model_is_covered():
    assert set(SHAPES) == set(MODELS)


@pytest.mark.parametrize("arch, shape", CASES, ids=[f"{a}-{'x'.join(map(str, s))}" for a, s in CASES])
def test_forward_gives_one_logit_per_class(arch, shape):
    """Per image, or per token position for a language model (num_classes = vocabulary)."""
    model = _seeded(arch, shape, 0)
    out = model(_input(arch, shape))  # training mode, batch of 2: BatchNorm needs > 1 value
    expected = (2, *shape, NUM_CLASSES) if arch in TOKEN_MODELS else (2, NUM_CLASSES)
    assert out.shape == expected and torch.isfinite(out).all()
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


# --- transformers --------------------------------------------------------------------------------

def test_gpt_is_causal_and_the_vit_sees_every_patch():
    """Changing the last token leaves the logits of earlier positions bit-identical (is_causal);
    changing one corner of an image changes the ViT's output (bidirectional, class token)."""
    gpt = _seeded("gpt", (8,), 0, n_layer=2, n_embd=32, n_head=4).eval()
    idx = torch.randint(NUM_CLASSES, (1, 8), generator=torch.Generator().manual_seed(0))
    other = idx.clone()
    other[0, -1] = (idx[0, -1] + 1) % NUM_CLASSES
    a, b = gpt(idx), gpt(other)
    assert torch.equal(a[:, :-1], b[:, :-1]) and not torch.equal(a[:, -1], b[:, -1])
    vit = _seeded("vit", (1, 8, 8), 0, patch_size=2, n_layer=1, n_embd=32, n_head=2).eval()
    x = torch.randn(1, 1, 8, 8)
    y = x.clone()
    y[..., -1, -1] += 1  # the last patch only
    assert not torch.equal(vit(x), vit(y))


def test_transformer_init_follows_gpt2():
    """Weights N(0, 0.02), residual projections N(0, 0.02/sqrt(2·n_layer)), biases 0."""
    model = _seeded("gpt", (16,), 0, n_layer=4, n_embd=256, n_head=4)
    w = model.blocks[0].attn.qkv.weight
    proj = torch.cat([b.attn.proj.weight.flatten() for b in model.blocks])
    assert abs(w.std().item() / 0.02 - 1) < 0.02 and abs(proj.std().item() / (0.02 / 8 ** 0.5) - 1) < 0.02
    assert all(torch.equal(b.attn.qkv.bias, torch.zeros_like(b.attn.qkv.bias)) for b in model.blocks)


def test_vit_patch_size_must_divide_the_image():
    with pytest.raises(ValueError, match="patch_size 3 must divide the image size 8x8"):
        build("vit", (1, 8, 8), NUM_CLASSES, patch_size=3)


@pytest.mark.parametrize("arch, shape", [("gpt", (16,)), ("vit", (1, 8, 8))])
@pytest.mark.parametrize("kernel", ["math", "flash"])
def test_transformers_record_the_kernel_their_attention_ran(arch, shape, kernel):
    model = _seeded(arch, shape, 0, n_layer=1, n_embd=32, n_head=2)
    assert attention_backend(model) is None  # nothing ran yet
    with sdpa_backend(kernel, torch.device("cpu")):
        model(_input(arch, shape))
    assert attention_backend(model) == kernel
    assert attention_backend(_seeded("small_cnn", (1, 8, 8), 0)) is None  # no attention of ours to ask


# --- models by name ------------------------------------------------------------------------------

def test_torchvision_names_build_sized_to_the_data():
    """Any classification builder, untrained, num_classes outputs, first conv re-drawn for 1
    channel; ViT gets the image size (its position embeddings are built for one size)."""
    resnet = _seeded("torchvision:resnet18", (1, 32, 32), 0)
    assert _first_conv(resnet).in_channels == 1 and resnet(torch.randn(2, 1, 32, 32)).shape == (2, NUM_CLASSES)
    vit = _seeded("torchvision:vit_b_16", (3, 32, 32), 0)
    assert vit.image_size == 32 and vit(torch.randn(1, 3, 32, 32)).shape == (1, NUM_CLASSES)


def test_timm_names_build_sized_to_the_data():
    """timm's tiny test ViT: in_chans and num_classes from the data, img_size since its input size is fixed."""
    model = _seeded("timm:test_vit", (1, 32, 32), 0)
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, NUM_CLASSES)
    a, b = (_seeded("timm:test_vit", (1, 32, 32), s).state_dict() for s in (0, 0))
    assert all(torch.equal(a[k], b[k]) for k in a)  # drawn from the seeded global RNG, nothing downloaded


@pytest.mark.parametrize("arch, hint", [
    ("torchvision:resnet9000", "m.list_models(module=m)"),
    ("timm:vit_nope", "timm.list_models('vit*')"),
])
def test_unknown_names_say_how_to_list_valid_ones(arch, hint):
    with pytest.raises(UnknownModel, match="unknown") as e:
        build(arch, (3, 32, 32), NUM_CLASSES)
    assert hint in str(e.value) and "\n" not in str(e.value)


def test_timm_names_without_timm_say_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm raises ImportError
    with pytest.raises(UnknownModel, match=r"timm:test_vit needs timm, which is not installed: pip install -e '\.\[timm\]'"):
        build("timm:test_vit", (3, 32, 32), NUM_CLASSES)
