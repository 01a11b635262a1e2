"""What every measuring module of bench/ uses: its log line and running a stage as a user would."""
from __future__ import annotations

import subprocess
import sys

from contract.paths import ROOT


def log(message: str) -> None:
    print(f"[bench] {message}", flush=True)


def run(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, check=True, capture_output=True,
                          text=True, **kwargs)
