"""Fixtures of the CUDA tests (`pytest -m cuda`). Every module here starts with
`pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]`.

The Triton kernels must be compiled, not interpreted: `tests/conftest.py` leaves TRITON_INTERPRET unset for a
`-m cuda` run on a machine with CUDA; anywhere else (or with TRITON_INTERPRET=1 set by hand) the kernel tests skip
with that reason.
"""

from __future__ import annotations

import os

import pytest
import torch


@pytest.fixture
def compiled_triton():
    """Skip unless the Triton kernels run compiled (TRITON_INTERPRET is not 1)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("the compiled Triton kernels need TRITON_INTERPRET=0: TRITON_INTERPRET=0 pytest -m cuda")


def _max_err(got: torch.Tensor, exact: torch.Tensor) -> float:
    return (got.double() - exact.double()).abs().max().item()


def _assert_within_rule(name: str, got, same_dtype_ref, exact, rel_atol: float = 1e-5) -> None:
    err, ref_err = _max_err(got, exact), _max_err(same_dtype_ref, exact)
    atol = rel_atol * max(exact.double().abs().max().item(), 1e-30)
    assert err <= 2 * ref_err + atol, f"{name}: kernel error {err:.3e} > 2 x reference error {ref_err:.3e} + {atol:.1e}"


@pytest.fixture
def within_rule():
    """`within_rule(name, kernel_out, same_dtype_ref_out, exact)`: the numerics rule of DESIGN.md —
    |kernel − exact| ≤ 2 × |same-dtype reference − exact| + atol, atol = rel_atol × max|exact| (default 1e-5)."""
    return _assert_within_rule
