"""Shared fixtures. Tests import the *installed* uae_fast (pytest runs with --import-mode=importlib)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_configure(config):
    """Triton kernels run on CPU tensors only through the interpreter, which must be chosen before any @triton.jit
    function is defined, i.e. before uae_fast.kernels is imported by a test module (collection comes after this
    hook). `pytest -m cuda` on a machine with CUDA runs the compiled kernels instead (the CPU-interpreter tests are
    deselected there); an explicit TRITON_INTERPRET in the environment always wins."""
    markexpr = config.getoption("markexpr", "") or ""
    compiled = markexpr.strip() == "cuda" and torch.cuda.is_available()
    os.environ.setdefault("TRITON_INTERPRET", "0" if compiled else "1")


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


CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _dom(html_file: Path, tmp_path: Path, fragment: str = "") -> str:
    """The DOM of `html_file` after headless Chromium ran its scripts (`fragment`: a URL #fragment)."""
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.fail(
            "chromium is not installed: the HTML report must be checked in a real browser (apt-get install -y chromium)"
        )
    profile = tmp_path / f"chromium-profile-{len(fragment)}"
    profile.mkdir(exist_ok=True)
    url = html_file.resolve().as_uri() + fragment
    proc = subprocess.run(
        [exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--dump-dom", url],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


@pytest.fixture(scope="session")
def browser_dom():
    """`browser_dom(html_file, tmp_path, fragment="")`: an HTML report as rendered by headless Chromium."""
    return _dom


def _load_script(path: Path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def benchmark_module():
    """`with benchmark_module("bench_x") as module:` — the script benchmarks/bench_x.py loaded as a module, with
    benchmarks/ on sys.path meanwhile (the scripts import their `utils` and `*_setup` helpers from there)."""
    import contextlib
    import sys

    folder = Path(__file__).resolve().parents[1] / "benchmarks"

    @contextlib.contextmanager
    def load(name: str):
        sys.path.insert(0, str(folder))
        try:
            yield _load_script(folder / f"{name}.py")
        finally:
            sys.path.remove(str(folder))

    return load


@pytest.fixture(scope="session")
def script_module():
    """`script_module("x")`: the script scripts/x.py loaded as a module."""
    folder = Path(__file__).resolve().parents[1] / "scripts"
    return lambda name: _load_script(folder / f"{name}.py")
