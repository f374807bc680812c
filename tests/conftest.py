"""Shared fixtures. Tests import the *installed* uae_fast (pytest runs with --import-mode=importlib)."""

from __future__ import annotations

import os

# Triton kernels run on the CPU only through its interpreter, which must be enabled before any @triton.jit function
# is defined, i.e. before uae_fast.kernels modules are imported (tests marked `triton` use it).
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _quiet_and_deterministic():
    import diffusers
    import transformers

    transformers.logging.set_verbosity_error()
    diffusers.logging.set_verbosity_error()
    torch.use_deterministic_algorithms(False)


@pytest.fixture(scope="session")
def tiny():
    """The tiny UAE in llm conditioning (fp32, CPU). Treat as read-only."""
    import uae_fast

    return uae_fast.load("tiny", device="cpu")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny):
    """The tiny UAE saved in the released layout."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    tiny.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def demo():
    from uae_fast.data.demo import demo_images

    return [d.image for d in demo_images()]
