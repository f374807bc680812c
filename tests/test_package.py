"""Importing uae_fast from a source checkout (the current directory shadows the install) fails in one clear line."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import uae_fast


def test_source_tree_import_says_what_to_do(tmp_path):
    source = Path(uae_fast.__file__).parent
    shutil.copytree(source, tmp_path / "uae_fast", ignore=shutil.ignore_patterns("kernels", "_C*", "__pycache__"))
    # An editable install's import hook would find the real package first: leave it out, as a plain install has none.
    code = (
        "import sys; sys.meta_path[:] = [f for f in sys.meta_path if 'skbc' not in type(f).__module__]; import uae_fast"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: uae_fast is being imported from its source folder")
    assert "pip install --no-build-isolation -e ." in last
