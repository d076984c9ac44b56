"""The training loop's options and guarantees: augmentation driven by its own generator, tooling
options (precision, channels-last, compile) that run on a CPU and land in the run row, divergence
caught, and run ids that stay put for default tooling."""

import math

import pytest
import torch

from orchestrator import axes, runner, spec
from workloads import data as datasets
from workloads import models
from workloads import train as train_module
from workloads.train import Diverged, TrainConfig, augment, set_tf32, train

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def digits():
    return datasets.load("digits")


def batch(seed: int = 0, shape=(8, 3, 16, 16)) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def fit(data, epochs=1, seed=0, **options):
    """small_cnn on `data` with fixed seeds; options go to TrainConfig."""
    torch.manual_seed(seed)
    model = models.build("small_cnn", data.image_shape, data.num_classes)
    cfg = TrainConfig(epochs=epochs, batch_size=64, lr=0.002, optimizer="adam", **options)
    return train(model, data, cfg, torch.Generator().manual_seed(1), torch.Generator().manual_seed(2), CPU)


# --- augmentation ------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["crop", "flip", "crop+flip"])
def test_augment_keeps_shape_and_follows_its_generator(mode):
    x = batch()
    a = augment(x, mode, torch.Generator().manual_seed(7))
    b = augment(x, mode, torch.Generator().manual_seed(7))
    c = augment(x, mode, torch.Generator().manual_seed(8))
    assert a.shape == x.shape and a.dtype == x.dtype
    assert torch.equal(a, b)  # same seed, same crops and flips, bit for bit
    assert not torch.equal(a, c)  # another seed, other crops or flips
    assert not torch.equal(a, x)


def test_crop_is_a_shift_of_the_zero_padded_image():
    x = batch(shape=(64, 1, 8, 8))
    out = augment(x, "crop", torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1))  # pad = 8 // 8 = 1 pixel
    for i in range(len(x)):
        assert any(torch.equal(out[i], padded[i, :, dy:dy + 8, dx:dx + 8]) for dy in range(3) for dx in range(3))


def test_flip_mirrors_whole_images_only():
    x = batch(shape=(64, 3, 4, 4))
    out = augment(x, "flip", torch.Generator().manual_seed(0))
    flipped = [torch.equal(o, xi.flip(2)) for o, xi in zip(out, x)]
    kept = [torch.equal(o, xi) for o, xi in zip(out, x)]
    assert all(f or k for f, k in zip(flipped, kept)) and 10 < sum(flipped) < 54


# --- tooling options -----------------------------------------------------------------------------

def test_tf32_switches_are_set_both_ways():
    assert set_tf32(True) == {"cuda_matmul": "tf32", "cudnn": "tf32"}
    assert torch.backends.cuda.matmul.fp32_precision == "tf32" and torch.backends.cudnn.conv.fp32_precision == "tf32"
    set_tf32(False)  # fp32 means IEEE fp32: cuDNN's TF32 default is switched off explicitly
    assert torch.backends.cuda.matmul.fp32_precision == "ieee" and torch.backends.cudnn.conv.fp32_precision == "ieee"


def test_precision_and_layout_options_train_on_cpu(digits):
    base = fit(digits)
    digests = {}
    for name, options in {"fp32": {}, "tf32": {"precision": "tf32"}, "bf16": {"precision": "bf16"},
                          "channels_last": {"channels_last": True}}.items():
        r = fit(digits, **options)
        assert r.test_accuracy > 0.2 and math.isfinite(r.test_loss), name
        assert list(r.state_dict) == list(base.state_dict), name  # plain keys, not the layout's
        digests[name] = runner.weights_digest(r.state_dict)[0]
    assert digests["tf32"] == digests["fp32"]  # TF32 is a CUDA switch: bit-identical on a CPU
    assert digests["bf16"] != digests["fp32"]  # bf16 autocast changes the arithmetic
    # NCHW-contiguous weights whatever the training layout: safetensors refuses strided tensors
    assert all(t.is_contiguous() for t in fit(digits, channels_last=True).state_dict.values())


@pytest.mark.integration
def test_compile_trains_and_keeps_plain_weight_names(digits, monkeypatch):
    """Also: every run really compiles, in a worker that already compiled earlier runs' models. Each
    new model recompiles the same code objects (training and evaluation: 2 graphs); past dynamo's
    recompile limit (lowered to 2 here, 8 by default) it would silently run eagerly."""
    from torch._dynamo.utils import counters

    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 2)
    cfg = TrainConfig(epochs=1, batch_size=64, lr=0.002, optimizer="adam", compile=True)
    for _ in range(2):
        graphs = counters["stats"]["unique_graphs"]
        torch.manual_seed(0)
        model = models.build("mlp", digits.image_shape, digits.num_classes)
        r = train(model, digits, cfg, torch.Generator().manual_seed(1), torch.Generator().manual_seed(2), CPU)
        assert r.test_accuracy > 0.5 and not any(k.startswith("_orig_mod") for k in r.state_dict)
        assert counters["stats"]["unique_graphs"] - graphs == 2


def test_tooling_options_are_recorded_in_the_row(tmp_path):
    s = spec.parse({"name": "tool", "replicas": 1, "noise": ["control"],
                    "tooling": {"precision": ["fp32", "bf16"], "channels_last": [False, True]},
                    "workloads": [{"arch": "small_cnn", "dataset": "digits", "epochs": 1, "batch_size": 64,
                                   "lr": 0.002, "optimizer": "adam"}]})
    runs = spec.expand(s)
    assert len(runs) == 4 and len({r.run_id for r in runs}) == 4
    rows = [runner.run(r, str(tmp_path)) for r in runs]
    assert all(r["status"] == "ok" for r in rows), [r.get("error") for r in rows]
    got = {(r["precision"], r["channels_last"], r["compiled"]) for r in rows}
    assert got == {("fp32", False, False), ("fp32", True, False), ("bf16", False, False), ("bf16", True, False)}
    from orchestrator import store

    df = store.read_runs(str(tmp_path)).to_pandas()
    assert sorted(zip(df.precision, df.channels_last)) == [("bf16", False), ("bf16", True),
                                                           ("fp32", False), ("fp32", True)]
    assert df.compiled.eq(False).all()
    assert all(len(losses) == 1 and math.isfinite(losses[0]) for losses in df.epoch_loss)  # built-in loop's


def test_default_tooling_keeps_run_ids():
    doc = {"name": "ids", "replicas": 1, "noise": ["control"], "workloads": [{"arch": "mlp", "dataset": "digits"}]}
    plain = spec.expand(spec.parse(doc))[0]
    explicit = spec.expand(spec.parse(doc | {"tooling": {"num_threads": [1], "precision": ["fp32"],
                                                         "channels_last": [False], "compile": [False],
                                                         "cudnn_benchmark": [False]}}))[0]
    w = spec.parse(doc).workloads[0]
    defaults = {a.name: a.default for a in axes.AXES}
    assert plain.run_id == explicit.run_id == spec.run_id(spec.parse(doc), w, "control", "any", 0, defaults)
    bf16 = spec.expand(spec.parse(doc | {"tooling": {"precision": ["bf16"]}}))[0]
    assert bf16.run_id != plain.run_id and bf16.precision == "bf16"


# --- divergence -------------------------------------------------------------------------------

def test_huge_learning_rate_raises_diverged(digits):
    torch.manual_seed(0)
    model = models.build("mlp", digits.image_shape, digits.num_classes)
    cfg = TrainConfig(epochs=3, batch_size=64, lr=1e12, optimizer="sgd")
    with pytest.raises(Diverged, match="diverged at epoch"):
        train(model, digits, cfg, torch.Generator().manual_seed(1), torch.Generator().manual_seed(2), CPU)


# --- optimisers, schedules, clipping ---------------------------------------------------------------

def mlp_run(data, **options):
    torch.manual_seed(0)
    model = models.build("mlp", data.image_shape, data.num_classes)
    start = [p.detach().clone() for p in model.parameters()]
    cfg = TrainConfig(**{"epochs": 1, "batch_size": 64, "lr": 0.01, "optimizer": "adamw"} | options)
    r = train(model, data, cfg, torch.Generator().manual_seed(1), torch.Generator().manual_seed(2), CPU)
    moved = torch.cat([(p.detach() - s).flatten() for p, s in zip(model.parameters(), start)]).norm().item()
    return r, moved


def test_cosine_schedule_with_warmup_gives_the_configured_lr_per_epoch(digits):
    """1,347 digits at batch 64: 22 steps per epoch, 88 in 4 epochs, 22 of them warming up
    linearly; then a half cosine from lr to 0 over the other 66 steps. Each epoch's first step
    runs at lr · (1/22), lr, lr · (1 + cos(π/3))/2, lr · (1 + cos(2π/3))/2."""
    r, _ = mlp_run(digits, epochs=4, schedule="cosine", warmup_epochs=1)
    assert r.epoch_lr == pytest.approx([0.01 / 22, 0.01, 0.0075, 0.0025], rel=1e-9)


def test_constant_and_onecycle_schedules(digits):
    constant, _ = mlp_run(digits, epochs=2)
    assert constant.epoch_lr == [0.01, 0.01]
    onecycle, _ = mlp_run(digits, epochs=3, schedule="onecycle", optimizer="sgd")
    assert onecycle.epoch_lr[0] == pytest.approx(0.01 / 25)  # torch's OneCycleLR starts at max_lr / 25
    assert onecycle.epoch_lr[1] > 0.009  # near its peak a third of the way in


def test_gradient_clipping_bounds_every_step(digits):
    """Plain SGD at lr 1: each step moves the weights by lr · (clipped gradient), whose norm is at
    most grad_clip, so 22 steps move them at most 22 · 1e-6 in L2."""
    _, clipped = mlp_run(digits, optimizer="sgd", momentum=0.0, lr=1.0, grad_clip=1e-6)
    _, free = mlp_run(digits, optimizer="sgd", momentum=0.0, lr=1.0)
    assert 0 < clipped <= 22e-6 * (1 + 1e-4) and free > 1


class EvalBatches(torch.nn.Module):
    """Wraps a model; records the batch size of every forward pass in evaluation mode."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner, self.sizes = inner, []

    def forward(self, x):
        if not self.training:
            self.sizes.append(len(x))
        return self.inner(x)


@pytest.mark.parametrize("eval_batch_size, expected", [(None, [64] * 7 + [2]), (100, [100] * 4 + [50])])
def test_evaluation_runs_at_eval_batch_size_default_the_training_batch(digits, eval_batch_size, expected):
    torch.manual_seed(0)
    model = EvalBatches(models.build("mlp", digits.image_shape, digits.num_classes))
    cfg = TrainConfig(epochs=1, batch_size=64, lr=0.002, optimizer="adam", eval_batch_size=eval_batch_size)
    r = train(model, digits, cfg, torch.Generator().manual_seed(1), torch.Generator().manual_seed(2), CPU)
    assert model.sizes == expected and len(r.predictions) == 450


# --- token datasets through the same loop ----------------------------------------------------------

def test_gpt_on_tokens_predicts_every_evaluation_position(tmp_path):
    """Windows of tokens train through the image loop: predictions are one arg-max token per
    evaluation position (every position of the test windows), per-class accuracy is per token,
    evaluation batches count windows, and the channels-last and bf16 options leave tokens alone."""
    (tmp_path / "t.txt").write_text("abcdefgh" * 80)  # 640 characters: the last 64 test, 7 windows of 8
    data = datasets.load("text", str(tmp_path / "t.txt"), context_length=8)
    for options in ({}, {"channels_last": True}, {"precision": "bf16"}):
        torch.manual_seed(0)
        model = EvalBatches(models.build("gpt", data.input_shape, data.num_classes, n_layer=1, n_head=2, n_embd=32))
        cfg = TrainConfig(epochs=3, batch_size=8, lr=1e-2, optimizer="adamw", eval_batch_size=4, **options)
        r = train(model, data, cfg, torch.Generator().manual_seed(1), torch.Generator().manual_seed(2), CPU)
        assert model.sizes == [4, 3] and len(r.predictions) == len(data.test_y) == 7 * 8, options
        assert len(r.per_class_accuracy) == 8 and r.attention_backend in ("math", "flash"), options
        assert r.test_accuracy > 0.5, options  # "abcdefgh" repeated: the next letter is learnable at once


def test_epoch_loss_is_each_epochs_mean_training_loss(digits):
    """`epoch_loss` is the per-example mean of the losses of each epoch's steps (1,347 digits at
    batch 64: 21 full batches and one of 3, weighted by size), one number per epoch, falling as the
    model learns, and it reaches the run row."""
    steps = []
    original = train_module.train_step

    def recording(model, opt, xb, yb, cfg):
        loss = original(model, opt, xb, yb, cfg)
        steps.append((loss.item(), len(yb)))
        return loss

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_module, "train_step", recording)
        r, _ = mlp_run(digits, epochs=3)
    assert len(r.epoch_loss) == 3 and len(steps) == 66
    first = steps[:22]
    assert r.epoch_loss[0] == pytest.approx(sum(v * n for v, n in first) / sum(n for _, n in first), rel=1e-6)
    assert r.epoch_loss[2] < r.epoch_loss[0]
