"""The torch-free C++ core builds on its own and passes its ctest suite (no Python, no torch)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _cmake() -> str:
    exe = shutil.which("cmake")
    if exe is None:  # scikit-build-core may have used the PyPI cmake; it installs this module
        cmake = pytest.importorskip("cmake", reason="cmake is needed to build the C++ tests")
        exe = str(Path(cmake.CMAKE_BIN_DIR) / "cmake")
    return exe


@pytest.mark.slow
def test_ctest_suite_passes(tmp_path):
    cmake = _cmake()
    build = tmp_path / "build"
    subprocess.run(
        [cmake, "-S", str(ROOT), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release"], check=True, capture_output=True
    )
    subprocess.run([cmake, "--build", str(build), "-j", "2"], check=True, capture_output=True)
    ctest = str(Path(cmake).with_name("ctest"))
    result = subprocess.run([ctest, "--test-dir", str(build), "--output-on-failure"], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "100% tests passed" in result.stdout
