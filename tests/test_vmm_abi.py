"""csrc/cuda_driver.h declares the CUDA driver types the VMM layer passes to libcuda (the package
never includes cuda.h): compile csrc/checks/cuda_abi_check.cpp, whose static_asserts compare every
layout, constant and signature with the real header, wherever a CUDA toolkit is installed."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _cuda_include():
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "include" / "cuda.h").is_file():
            return Path(home) / "include"
    return None


@pytest.mark.skipif(_cuda_include() is None or shutil.which("g++") is None,
                    reason="needs the CUDA toolkit's cuda.h and g++")
def test_driver_declarations_match_cuda_h():
    cmd = ["g++", "-std=c++17", "-fsyntax-only", f"-I{_cuda_include()}", f"-I{ROOT / 'csrc'}",
           str(ROOT / "csrc" / "checks" / "cuda_abi_check.cpp")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
