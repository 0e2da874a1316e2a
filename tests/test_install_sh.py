"""install.sh's build decision: llama-cpp-python gets a CUDA build only when `nvidia-smi -L` lists a GPU AND nvcc
exists; nvcc alone (CI machines: CUDA's nvcc, no GPU) never starts one. Run on a PATH made for each case: the
script's own tools, plus shell stubs for the external binaries nvidia-smi and nvcc."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GPU_LISTED = 'echo "GPU 0: NVIDIA H200 (UUID: GPU-0d1e2f)"'
NO_DEVICE = 'echo "No devices were found"; exit 6'  # what nvidia-smi says with a driver and no GPU
NO_DRIVER = ('echo "NVIDIA-SMI has failed because it couldn\'t communicate with the NVIDIA driver."; exit 9')


def _detect(tmp_path: Path, nvidia_smi: str | None, nvcc: bool, cpu_flags: str = "fpu sse avx2") \
        -> subprocess.CompletedProcess:
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    for tool in ("sed", "grep", "dirname"):
        os.symlink(shutil.which(tool), bin_ / tool)
    stubs = {"nvidia-smi": nvidia_smi, "nvcc": 'echo "Cuda compilation tools, release 13.0"' if nvcc else None}
    for name, body in stubs.items():
        if body is not None:
            (bin_ / name).write_text(f"#!/bin/sh\n{body}\n")
            (bin_ / name).chmod(0o755)
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {cpu_flags}\n")
    return subprocess.run([shutil.which("bash"), str(ROOT / "install.sh"), "--detect"], capture_output=True,
                          text=True, env={"PATH": str(bin_), "HOME": str(tmp_path), "MOECLI_CPUINFO": str(cpuinfo)},
                          timeout=30)


@pytest.mark.parametrize("smi, nvcc, torch, llama, why", [
    (None, True, "cpu", "cpu", "lists no GPU"),            # CI: nvcc on the PATH, no nvidia-smi at all
    (NO_DEVICE, True, "cpu", "cpu", "lists no GPU"),       # a driver, no device
    (NO_DRIVER, True, "cpu", "cpu", "lists no GPU"),       # nvidia-smi without a working driver
    (GPU_LISTED, False, "cuda", "cpu", "nvcc is not on the PATH"),
    (GPU_LISTED, True, "cuda", "cuda", "nvidia-smi lists a GPU"),
    (None, False, "cpu", "cpu", "lists no GPU"),
])
def test_cuda_build_only_with_a_listed_gpu_and_nvcc(tmp_path, smi, nvcc, torch, llama, why):
    r = _detect(tmp_path, smi, nvcc)
    assert r.returncode == 0, r.stderr
    lines = dict(line.split(": ", 1) for line in r.stdout.strip().splitlines())
    assert lines["torch"] == torch
    assert lines["llama-cpp-python"].split()[0] == llama
    assert lines["llama-cpp-python"].endswith("(0.3.36)")  # the pin read from pyproject.toml
    assert why in r.stderr


def test_cuda_build_bypasses_the_wheel_cache():
    """pip's wheel cache ignores CMAKE_ARGS: the CUDA build must not be able to reuse a cached CPU wheel."""
    text = (ROOT / "install.sh").read_text()
    line = next(l for l in text.splitlines() if "-DGGML_CUDA=on" in l)
    block = line + text.split(line, 1)[1].split("\n", 2)[1]
    assert "--no-cache-dir" in block and "--force-reinstall" in block


@pytest.mark.parametrize("flags, amx", [("fpu avx512f amx_bf16 amx_tile amx_int8", "off"), ("fpu avx512f avx2", "none")])
def test_llama_cpp_is_built_without_amx_where_the_cpu_lists_it(tmp_path, flags, amx):
    """ggml's AMX matmul (on with -march=native where the CPU has AMX) segfaults on every quantized model in
    llama-cpp-python 0.3.36 (measured on a Xeon VM listing amx_tile): install.sh builds without it there."""
    r = _detect(tmp_path, None, False, flags)
    assert r.returncode == 0, r.stderr
    line = dict(l.split(": ", 1) for l in r.stdout.strip().splitlines())["llama.cpp AMX kernels"]
    assert line.split()[0] == amx and (amx == "none" or "-mno-amx-int8" in line)


def test_amx_rebuild_follows_the_install_that_may_reuse_a_cached_wheel():
    """pip's wheel cache ignores CMAKE_ARGS: `pip install -e .` may bring back a wheel built with AMX, so the check
    that rebuilds without it runs after that install, and drops the cached wheel (found from a clean clone: the
    check ran before, saw no llama_cpp yet, and the cached AMX wheel was installed)."""
    text = (ROOT / "install.sh").read_text()
    install, check = text.index('pip install -q -e ".${extra}"'), text.index("b'AMX_INT8 = 1'")
    assert install < check and "pip cache remove llama_cpp_python" in text[check:]
