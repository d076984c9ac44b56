"""The attention kernel as a tooling choice: `sdpa_backend` restricts scaled_dot_product_attention
to one kernel, each kernel is deterministic on a CPU, math and flash give other bits, the kernel
really used is recorded, and a kernel the device lacks fails in one line naming kernel and device."""

import pytest
import torch
import torch.nn.functional as F

from orchestrator import runner
from tests.test_runner import cuda_forbidden  # noqa: F401 - the fixture: any torch.cuda call raises
from workloads import data as datasets
from workloads import models
from workloads.train import AttentionUnavailable, TrainConfig, offered_backends, sdpa_backend, train

CPU = torch.device("cpu")


def qkv(seed: int = 0, shape=(1, 2, 128, 32)) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g).requires_grad_() for _ in range(3)]


def causal_attention(kernel: str) -> list[torch.Tensor]:
    """Output and the three input gradients of one causal attention under `kernel`."""
    q, k, v = qkv()
    with sdpa_backend(kernel, CPU):
        assert models.sdpa_choice(q, k, v, is_causal=True) == kernel  # what SDPA will dispatch to
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    out.square().sum().backward()
    return [out.detach(), q.grad, k.grad, v.grad]


def test_a_cpu_offers_math_and_flash_only():
    assert offered_backends(CPU) == ["math", "flash"]


def test_math_and_flash_are_each_deterministic_and_differ_in_bits():
    """Same inputs, same kernel: same bits, forward and backward. Math and flash compute the same
    function in another order (one softmax over each row vs an online softmax over blocks of keys),
    so the rounding differs on any CPU: over 2·128·32 outputs not every bit can tie."""
    math_runs, flash_runs = [causal_attention("math") for _ in range(2)], [causal_attention("flash") for _ in range(2)]
    for runs in (math_runs, flash_runs):
        assert all(torch.equal(a, b) for a, b in zip(*runs))
    assert not torch.equal(math_runs[0][0], flash_runs[0][0])  # output bits
    assert not torch.equal(math_runs[0][1], flash_runs[0][1])  # dQ bits
    for m, f in zip(math_runs[0], flash_runs[0]):
        torch.testing.assert_close(m, f, rtol=1e-4, atol=1e-5)  # same function


def gpt_run(kernel: str) -> tuple[str, str | None]:
    """A tiny GPT on modular arithmetic under `kernel`: its weights digest and the kernel recorded."""
    data = datasets.load("modular_arithmetic", p=11, train_fraction=0.5)
    torch.manual_seed(0)
    model = models.build("gpt", data.input_shape, data.num_classes, n_layer=1, n_head=2, n_embd=32)
    cfg = TrainConfig(epochs=1, batch_size=16, lr=3e-3, optimizer="adamw", weight_decay=0.1)
    with sdpa_backend(kernel, CPU):
        r = train(model, data, cfg, torch.Generator().manual_seed(1), torch.Generator().manual_seed(2), CPU)
    return runner.weights_digest(r.state_dict)[0], r.attention_backend


def test_training_under_each_kernel_is_reproducible_and_recorded():
    for kernel in ("math", "flash"):
        (a, used_a), (b, used_b) = gpt_run(kernel), gpt_run(kernel)
        assert a == b and used_a == used_b == kernel
    digest, used = gpt_run("auto")
    assert used in ("math", "flash")  # torch's own choice, recorded as made


def test_auto_leaves_torch_its_choice():
    flags = (torch.backends.cuda.math_sdp_enabled(), torch.backends.cuda.flash_sdp_enabled(),
             torch.backends.cuda.mem_efficient_sdp_enabled(), torch.backends.cuda.cudnn_sdp_enabled())
    with sdpa_backend("auto", CPU):
        assert (torch.backends.cuda.math_sdp_enabled(), torch.backends.cuda.flash_sdp_enabled(),
                torch.backends.cuda.mem_efficient_sdp_enabled(), torch.backends.cuda.cudnn_sdp_enabled()) == flags
    with sdpa_backend("math", CPU):
        assert not torch.backends.cuda.flash_sdp_enabled()
    assert torch.backends.cuda.flash_sdp_enabled() == flags[1]  # restored on exit


@pytest.mark.parametrize("kernel", ["efficient", "cudnn"])
def test_a_kernel_the_device_lacks_fails_at_once_in_one_line(kernel):
    body_ran = False
    with pytest.raises(AttentionUnavailable) as e:
        with sdpa_backend(kernel, CPU):
            body_ran = True
    message = str(e.value)
    assert not body_ran and "\n" not in message
    assert message.startswith(f"attention: the {kernel} kernel is not available on cpu (")
    assert message.endswith("available there: math, flash")


def test_a_kernel_that_refuses_the_inputs_fails_at_first_use_in_one_line():
    """CPU flash needs equal head sizes for q, k and v: a user's function passing v of another
    size gets torch's "no viable backend" as one line naming the kernel and the device."""
    q, k = torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16)
    v = torch.randn(1, 2, 8, 8)
    with pytest.warns(UserWarning) as caught:
        with pytest.raises(AttentionUnavailable, match=r"^attention: the flash kernel does not take this run's "
                                                       r"inputs on cpu \([^\n]*\); choose another attention backend$"):
            with sdpa_backend("flash", CPU):
                F.scaled_dot_product_attention(q, k, v)
    assert any("same last dimension" in str(w.message) for w in caught)  # torch says why, as a warning
    with sdpa_backend("math", CPU):
        assert F.scaled_dot_product_attention(q, k, v).shape == (1, 2, 8, 8)


def test_other_errors_pass_through_unchanged():
    with pytest.raises(ValueError, match="not about attention"):
        with sdpa_backend("math", CPU):
            raise ValueError("not about attention")


def test_choosing_a_kernel_on_a_cpu_never_calls_into_cuda(cuda_forbidden):  # noqa: F811
    """The kernel switches are torch.backends.cuda flags, yet a CPU run must not touch CUDA."""
    model = models.build("gpt", (8,), 5, n_layer=1, n_head=2, n_embd=16)
    with sdpa_backend("flash", CPU):
        model(torch.zeros(1, 8, dtype=torch.int64))
    assert models.attention_backend(model) == "flash"
    with pytest.raises(AttentionUnavailable, match="on cpu"):
        with sdpa_backend("cudnn", CPU):
            pass
