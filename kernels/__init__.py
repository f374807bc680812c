"""Triton kernels of uae_fast, installed as `uae_fast.kernels`.

One op per module; each also holds its pure-PyTorch `<op>_ref`, the CPU path and test oracle. Triton is used only on
CUDA tensors (or under TRITON_INTERPRET=1 in tests). The ops arrive with their issues (reward, GRPO loss).
"""

__all__: list[str] = []
