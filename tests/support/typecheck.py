"""``mypy --strict`` on a user's module, outside the repository: flowtrace is then found
as an installed package, as in a user's project."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def strict_mypy(tmp_path: Path, module: str, code: str) -> tuple[int, str]:
    """mypy's exit code and report for ``code`` saved as ``<module>.py`` in ``tmp_path``."""
    (tmp_path / f"{module}.py").write_text(code)
    checked = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental",
         "--cache-dir", str(tmp_path / "cache"), f"{module}.py"],
        cwd=tmp_path, capture_output=True, text=True, timeout=170, check=False,
    )
    return checked.returncode, checked.stdout + checked.stderr
