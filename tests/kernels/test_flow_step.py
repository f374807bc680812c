"""The fused Flow-GRPO step kernel (Triton interpreter, and a real GPU under -m cuda) vs flow_step_ref.

flow_step_ref itself is checked against the Gaussian maths in tests/rl/test_flow_grpo.py; here the kernel must give
the reference's values and the gradients autograd takes through it.
"""

from __future__ import annotations

import os

import pytest
import torch

import uae_fast.kernels.flow_step as mod
from uae_fast.kernels.flow_step import flow_step_logprob, flow_step_ref

interpreter = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="CPU tensors run Triton only under TRITON_INTERPRET=1"
)


def _case(b, n, dtype=torch.float32, seed=0, device="cpu"):
    """A step x → x' of size ~0.1 with noise of ~std, a reference velocity near the policy's, per-row scalars in the
    ranges the SDE/CPS steps produce."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, generator=g)
    v = torch.randn(b, n, generator=g)
    drift_x = -0.05 * torch.rand(b, generator=g)
    drift_v = -0.1 - 0.2 * torch.rand(b, generator=g)
    std = 0.05 + 0.3 * torch.rand(b, generator=g)
    x_next = x + drift_x[:, None] * x + drift_v[:, None] * v + std[:, None] * torch.randn(b, n, generator=g)
    v_ref = v + 0.1 * torch.randn(b, n, generator=g)
    big = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    small = lambda t: t.to(device=device)  # noqa: E731
    return big(v), big(x), x_next.to(device), big(v_ref), small(drift_x), small(drift_v), small(std)


def _both(v, x, xp, v_ref, dx, dv, std, *, backend, tile=None, with_ref=True):
    """log_prob, kl and d(w·log_prob + u·kl)/dv for fixed random row weights w, u."""
    vel = v.clone().requires_grad_(True)
    lp, kl = flow_step_logprob(vel, x, xp, dx, dv, std, v_ref if with_ref else None, backend=backend, tile=tile)
    g = torch.Generator().manual_seed(11)
    w, u = torch.randn(v.shape[0], generator=g).to(v.device), torch.randn(v.shape[0], generator=g).to(v.device)
    total = (w * lp).sum() + ((u * kl).sum() if with_ref else 0)
    (grad,) = torch.autograd.grad(total, vel)
    return lp, kl, grad


@pytest.mark.triton
@interpreter
@pytest.mark.parametrize(
    "b, n, tile",
    [
        (3, 300, (64, 2)),  # 3 programs per row, the last one mostly masked
        (2, 256, None),  # the default tile: one block per row
        (1, 1, None),  # a single element
        (4, 5000, None),  # default 1024-wide blocks, 4 per program: two programs per row
    ],
)
@pytest.mark.parametrize("with_ref", [True, False])
def test_triton_matches_reference(b, n, tile, with_ref):
    args = _case(b, n)
    lp, kl, grad = _both(*args, backend="triton", tile=tile, with_ref=with_ref)
    lp_r, kl_r, grad_r = _both(*args, backend="torch", with_ref=with_ref)
    torch.testing.assert_close(lp, lp_r, atol=1e-5, rtol=1e-6)
    if with_ref:
        torch.testing.assert_close(kl, kl_r, atol=1e-8, rtol=1e-5)
    else:
        assert kl is None and kl_r is None
    torch.testing.assert_close(grad, grad_r, atol=1e-7, rtol=1e-5)


@pytest.mark.triton
@interpreter
def test_triton_bf16_error_within_twice_the_reference_error():
    v, x, xp, v_ref, dx, dv, std = _case(3, 700)
    v16, x16, vr16 = v.bfloat16(), x.bfloat16(), v_ref.bfloat16()
    # The exact answer for the bf16 values: float64 through the reference.
    exact = _both(v16.double(), x16.double(), xp.double(), vr16.double(), dx, dv, std, backend="torch")
    ref = _both(v16, x16, xp, vr16, dx, dv, std, backend="torch")
    tri = _both(v16, x16, xp, vr16, dx, dv, std, backend="triton", tile=(128, 2))
    for k in range(2):  # log_prob, kl: fp32 sums of the same bf16 values
        err_ref = (ref[k].double() - exact[k]).abs().max().item()
        err_tri = (tri[k].double() - exact[k]).abs().max().item()
        assert err_tri <= 2 * err_ref + 1e-6 * exact[k].abs().max().item(), (k, err_tri, err_ref)
    # The gradient comes back in the velocity's dtype, each element within one bf16 ulp (2^-7 relative at most) of
    # the exact value: the interpreter truncates when it casts to bf16 where a GPU rounds to nearest.
    assert tri[2].dtype == torch.bfloat16
    grad_exact = exact[2]
    bound = 2**-7 * grad_exact.abs() + 1e-6 * grad_exact.abs().max()
    assert ((tri[2].double() - grad_exact).abs() <= bound).all()


def test_auto_dispatch_uses_pytorch_on_cpu(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("Triton launched for a CPU tensor")

    monkeypatch.setattr(mod._FlowStepTriton, "apply", boom)
    lp, kl = flow_step_logprob(*_case(2, 10)[:3], *_case(2, 10)[4:])  # backend="auto", no ref
    assert lp.shape == (2,) and kl is None


def test_reference_keeps_float64_and_bad_input_is_named():
    v, x, xp, v_ref, dx, dv, std = _case(2, 10, dtype=torch.float64)
    lp, kl = flow_step_ref(v, x, xp, dx, dv, std, v_ref)
    assert lp.dtype == kl.dtype == torch.float64
    with pytest.raises(ValueError, match="float64"):
        flow_step_logprob(v, x, xp, dx, dv, std, backend="triton")
    with pytest.raises(ValueError, match="prev_sample must be"):
        flow_step_logprob(v, x, xp[:, :4], dx, dv, std)
    with pytest.raises(ValueError, match="std must be"):
        flow_step_logprob(v, x, xp, dx, dv, std[:1])
    with pytest.raises(ValueError, match="backend"):
        flow_step_logprob(v, x, xp, dx, dv, std, backend="cuda")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_kernel_at_a_real_shape(dtype):
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("the compiled kernel needs TRITON_INTERPRET=0: TRITON_INTERPRET=0 pytest -m cuda")
    args = _case(8, 16 * 64 * 64, dtype=dtype, device="cuda")  # B = 8 samples of SD3.5 latents at 512²
    tri = _both(*args, backend="auto")
    ref = _both(*args, backend="torch")
    exact = _both(*(t.double() for t in args), backend="torch")
    for k in range(3):
        err_ref = (ref[k].double() - exact[k]).abs().max().item()
        err_tri = (tri[k].double() - exact[k]).abs().max().item()
        assert err_tri <= 2 * err_ref + 1e-6 * exact[k].abs().max().item(), (k, err_tri, err_ref)
    assert tri[2].dtype == dtype
