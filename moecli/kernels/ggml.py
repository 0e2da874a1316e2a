"""The ONLY module that talks to ggml: ctypes over the libggml-base / libggml-cpu that llama-cpp-python ships.

What it provides
- a layout check at import (our ctypes `ggml_tensor` must be the one the library was built with);
- `to_float` / `quantize`: ggml's own (de)quantizers, bit-identical to what llama.cpp computes with;
- one persistent `ggml_threadpool` (`set_threads`), and `Graph`: a built graph plus its plan, computed under a lock
  because the threadpool and the shared work buffer serve one graph at a time;
- `matmul(weight, x)`: a quantized 2-D weight times float32 activations, graphs prebuilt per (weight, n) for decode;
- small helpers `Graph` builders use (`Ctx`, `tensor_ptr`...) for `moecli.runtime.cpu_experts`.

Graphs here never use ggml's allocator: every tensor lives in a `no_alloc` context and we point its `data` at memory
we own (numpy buffers) or at the memory-mapped checkpoint (weights: zero-copy). A cached graph therefore costs only
its metadata, and computing it again costs one ctypes call.
"""
from __future__ import annotations

import ctypes as C
import os
import threading
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from moecli.errors import MoecliError
from moecli.formats.tensor import TensorData

T = GGMLQuantizationType
LLAMA_CPP_PYTHON_VERSION = "0.3.36"  # the release whose ggml structs the ctypes declarations below mirror
GGML_MAX_DIMS, GGML_MAX_SRC, GGML_MAX_NAME, GGML_MAX_OP_PARAMS, GGML_MAX_N_THREADS = 4, 10, 64, 64, 512
GGML_OBJECT_SIZE = 32  # sizeof(struct ggml_object): ggml_tensor_overhead() = this + sizeof(struct ggml_tensor)


class ggml_tensor(C.Structure):
    _fields_ = [
        ("type", C.c_int),
        ("buffer", C.c_void_p),
        ("ne", C.c_int64 * GGML_MAX_DIMS),
        ("nb", C.c_size_t * GGML_MAX_DIMS),
        ("op", C.c_int),
        ("op_params", C.c_int32 * (GGML_MAX_OP_PARAMS // 4)),
        ("flags", C.c_int32),
        ("src", C.c_void_p * GGML_MAX_SRC),
        ("view_src", C.c_void_p),
        ("view_offs", C.c_size_t),
        ("data", C.c_void_p),
        ("name", C.c_char * GGML_MAX_NAME),
        ("extra", C.c_void_p),
        ("padding", C.c_char * 8),
    ]


class ggml_init_params(C.Structure):
    _fields_ = [("mem_size", C.c_size_t), ("mem_buffer", C.c_void_p), ("no_alloc", C.c_bool)]


class ggml_cplan(C.Structure):
    _fields_ = [
        ("work_size", C.c_size_t),
        ("work_data", C.c_void_p),
        ("n_threads", C.c_int),
        ("threadpool", C.c_void_p),
        ("abort_callback", C.c_void_p),
        ("abort_callback_data", C.c_void_p),
        ("use_ref", C.c_bool),
    ]


class ggml_threadpool_params(C.Structure):
    _fields_ = [
        ("cpumask", C.c_bool * GGML_MAX_N_THREADS),
        ("n_threads", C.c_int),
        ("prio", C.c_int),
        ("poll", C.c_uint32),
        ("strict_cpu", C.c_bool),
        ("paused", C.c_bool),
    ]


_to_float_t = C.CFUNCTYPE(None, C.c_void_p, C.c_void_p, C.c_int64)
_from_float_t = C.CFUNCTYPE(None, C.c_void_p, C.c_void_p, C.c_int64)


class ggml_type_traits(C.Structure):
    _fields_ = [
        ("type_name", C.c_char_p),
        ("blck_size", C.c_int64),
        ("blck_size_interleave", C.c_int64),
        ("type_size", C.c_size_t),
        ("is_quantized", C.c_bool),
        ("to_float", C.c_void_p),
        ("from_float_ref", C.c_void_p),
    ]


class ggml_type_traits_cpu(C.Structure):
    _fields_ = [("from_float", C.c_void_p), ("vec_dot", C.c_void_p), ("vec_dot_type", C.c_int), ("nrows", C.c_int64)]


def _load():
    try:
        import llama_cpp
    except ImportError as e:  # the CPU kernels are not optional: say what to install
        raise MoecliError(f"llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} is required for the CPU kernels ({e})") from None
    lib = Path(llama_cpp.__file__).parent / "lib"
    # Load the files under their sonames (`.so.0`): libllama and libggml-cpu name those as dependencies, and the
    # package ships the `.so`, `.so.0`, `.so.0.x` names as separate copies; loading another name would give a second
    # ggml in the process with its own global state.
    try:
        base = C.CDLL(str(lib / "libggml-base.so.0"), mode=C.RTLD_GLOBAL)
        cpu = C.CDLL(str(lib / "libggml-cpu.so.0"), mode=C.RTLD_GLOBAL)
    except OSError as e:
        raise MoecliError(f"cannot load ggml from llama-cpp-python ({e}); reinstall llama-cpp-python=="
                          f"{LLAMA_CPP_PYTHON_VERSION}") from None
    return getattr(llama_cpp, "__version__", "?"), base, cpu


_version, _base, _cpu = _load()


def _fn(lib, name, restype, *argtypes):
    f = getattr(lib, name)
    f.restype, f.argtypes = restype, list(argtypes)
    return f


_P, _T = C.c_void_p, C.POINTER(ggml_tensor)
ggml_tensor_overhead = _fn(_base, "ggml_tensor_overhead", C.c_size_t)
ggml_graph_overhead_custom = _fn(_base, "ggml_graph_overhead_custom", C.c_size_t, C.c_size_t, C.c_bool)
ggml_init = _fn(_base, "ggml_init", _P, ggml_init_params)
ggml_free = _fn(_base, "ggml_free", None, _P)
ggml_new_tensor_1d = _fn(_base, "ggml_new_tensor_1d", _T, _P, C.c_int, C.c_int64)
ggml_new_tensor_2d = _fn(_base, "ggml_new_tensor_2d", _T, _P, C.c_int, C.c_int64, C.c_int64)
ggml_new_tensor_3d = _fn(_base, "ggml_new_tensor_3d", _T, _P, C.c_int, C.c_int64, C.c_int64, C.c_int64)
ggml_mul_mat = _fn(_base, "ggml_mul_mat", _T, _P, _T, _T)
ggml_mul_mat_id = _fn(_base, "ggml_mul_mat_id", _T, _P, _T, _T, _T)
ggml_swiglu_split = _fn(_base, "ggml_swiglu_split", _T, _P, _T, _T)
# gpt-oss experts: per-expert biases (dst[:, i1, i2] = a[:, i1, i2] + b[:, ids[i1, i2]]) and the clamped SwiGLU
ggml_add_id = _fn(_base, "ggml_add_id", _T, _P, _T, _T, _T)
ggml_reglu_split = _fn(_base, "ggml_reglu_split", _T, _P, _T, _T)
ggml_swiglu_oai = _fn(_base, "ggml_swiglu_oai", _T, _P, _T, _T, C.c_float, C.c_float)
# a whole forward pass as llama.cpp builds it (moecli.runtime.ggml_forward): the attention block ...
_f = C.c_float
ggml_nbytes = _fn(_base, "ggml_nbytes", C.c_size_t, _T)
ggml_rms_norm = _fn(_base, "ggml_rms_norm", _T, _P, _T, _f)
ggml_mul = _fn(_base, "ggml_mul", _T, _P, _T, _T)
ggml_add = _fn(_base, "ggml_add", _T, _P, _T, _T)
ggml_reshape_1d = _fn(_base, "ggml_reshape_1d", _T, _P, _T, C.c_int64)
ggml_reshape_2d = _fn(_base, "ggml_reshape_2d", _T, _P, _T, C.c_int64, C.c_int64)
ggml_reshape_3d = _fn(_base, "ggml_reshape_3d", _T, _P, _T, C.c_int64, C.c_int64, C.c_int64)
ggml_permute = _fn(_base, "ggml_permute", _T, _P, _T, C.c_int, C.c_int, C.c_int, C.c_int)
ggml_transpose = _fn(_base, "ggml_transpose", _T, _P, _T)
ggml_view_1d = _fn(_base, "ggml_view_1d", _T, _P, _T, C.c_int64, C.c_size_t)
ggml_view_2d = _fn(_base, "ggml_view_2d", _T, _P, _T, C.c_int64, C.c_int64, C.c_size_t, C.c_size_t)
ggml_view_3d = _fn(_base, "ggml_view_3d", _T, _P, _T, C.c_int64, C.c_int64, C.c_int64, C.c_size_t, C.c_size_t,
                   C.c_size_t)
ggml_cpy = _fn(_base, "ggml_cpy", _T, _P, _T, _T)
ggml_cont_2d = _fn(_base, "ggml_cont_2d", _T, _P, _T, C.c_int64, C.c_int64)
ggml_soft_max_ext = _fn(_base, "ggml_soft_max_ext", _T, _P, _T, _T, _f, _f)
ggml_soft_max_add_sinks = _fn(_base, "ggml_soft_max_add_sinks", None, _T, _T)
ggml_flash_attn_ext = _fn(_base, "ggml_flash_attn_ext", _T, _P, _T, _T, _T, _T, _f, _f, _f)
ggml_flash_attn_ext_add_sinks = _fn(_base, "ggml_flash_attn_ext_add_sinks", None, _T, _T)
ggml_rope_ext = _fn(_base, "ggml_rope_ext", _T, _P, _T, _T, _T, C.c_int, C.c_int, C.c_int, _f, _f, _f, _f, _f, _f)
GGML_ROPE_TYPE_NORMAL, GGML_ROPE_TYPE_NEOX = 0, 2
# ... the MoE block and the rest of a forward pass (moecli.runtime.ggml_forward)
ggml_get_rows = _fn(_base, "ggml_get_rows", _T, _P, _T, _T)
ggml_soft_max = _fn(_base, "ggml_soft_max", _T, _P, _T)
ggml_argsort_top_k = _fn(_base, "ggml_argsort_top_k", _T, _P, _T, C.c_int)
ggml_sum_rows = _fn(_base, "ggml_sum_rows", _T, _P, _T)
ggml_div = _fn(_base, "ggml_div", _T, _P, _T, _T)
ggml_clamp = _fn(_base, "ggml_clamp", _T, _P, _T, _f, _f)
ggml_silu = _fn(_base, "ggml_silu", _T, _P, _T)
ggml_cont = _fn(_base, "ggml_cont", _T, _P, _T)
ggml_set_output = _fn(_base, "ggml_set_output", None, _T)
# ... and deepseek2's MLA (decompressed cache), sigmoid gating and grouped top-k
ggml_concat = _fn(_base, "ggml_concat", _T, _P, _T, _T, C.c_int)
ggml_repeat_4d = _fn(_base, "ggml_repeat_4d", _T, _P, _T, C.c_int64, C.c_int64, C.c_int64, C.c_int64)
ggml_rope_set_offset = _fn(_base, "ggml_rope_set_offset", _T, _T, C.c_int)
ggml_reshape_4d = _fn(_base, "ggml_reshape_4d", _T, _P, _T, C.c_int64, C.c_int64, C.c_int64, C.c_int64)
ggml_sigmoid = _fn(_base, "ggml_sigmoid", _T, _P, _T)
ggml_scale = _fn(_base, "ggml_scale", _T, _P, _T, _f)
ggml_fill = _fn(_base, "ggml_fill", _T, _P, _T, _f)
ggml_set_rows = _fn(_base, "ggml_set_rows", _T, _P, _T, _T, _T)
# ... and the Gated DeltaNet layers of qwen3next / qwen35moe (short causal conv, gated delta rule, IMRoPE)
ggml_softplus = _fn(_base, "ggml_softplus", _T, _P, _T)
ggml_ssm_conv = _fn(_base, "ggml_ssm_conv", _T, _P, _T, _T)
ggml_gated_delta_net = _fn(_base, "ggml_gated_delta_net", _T, _P, _T, _T, _T, _T, _T, _T, C.c_int64)
ggml_view_4d = _fn(_base, "ggml_view_4d", _T, _P, _T, C.c_int64, C.c_int64, C.c_int64, C.c_int64, C.c_size_t,
                   C.c_size_t, C.c_size_t, C.c_size_t)
ggml_cont_3d = _fn(_base, "ggml_cont_3d", _T, _P, _T, C.c_int64, C.c_int64, C.c_int64)
ggml_rope_multi = _fn(_base, "ggml_rope_multi", _T, _P, _T, _T, _T, C.c_int, C.POINTER(C.c_int), C.c_int, C.c_int,
                      _f, _f, _f, _f, _f, _f)
GGML_ROPE_TYPE_IMROPE = 40
ggml_backend_cpu_buffer_type = _fn(_base, "ggml_backend_cpu_buffer_type", _P)
ggml_gallocr_new = _fn(_base, "ggml_gallocr_new", _P, _P)
ggml_gallocr_free = _fn(_base, "ggml_gallocr_free", None, _P)
ggml_gallocr_alloc_graph = _fn(_base, "ggml_gallocr_alloc_graph", C.c_bool, _P, _P)
ggml_new_graph_custom = _fn(_base, "ggml_new_graph_custom", _P, _P, C.c_size_t, C.c_bool)
ggml_build_forward_expand = _fn(_base, "ggml_build_forward_expand", None, _P, _T)
ggml_row_size = _fn(_base, "ggml_row_size", C.c_size_t, C.c_int, C.c_int64)
ggml_quantize_chunk = _fn(_base, "ggml_quantize_chunk", C.c_size_t, C.c_int, _P, _P, C.c_int64, C.c_int64,
                          C.c_int64, _P)
ggml_quantize_requires_imatrix = _fn(_base, "ggml_quantize_requires_imatrix", C.c_bool, C.c_int)
ggml_get_type_traits = _fn(_base, "ggml_get_type_traits", C.POINTER(ggml_type_traits), C.c_int)
ggml_threadpool_params_init = _fn(_base, "ggml_threadpool_params_init", None, C.POINTER(ggml_threadpool_params),
                                  C.c_int)
ggml_cpu_init = _fn(_cpu, "ggml_cpu_init", None)
ggml_get_type_traits_cpu = _fn(_cpu, "ggml_get_type_traits_cpu", C.POINTER(ggml_type_traits_cpu), C.c_int)
ggml_graph_plan = _fn(_cpu, "ggml_graph_plan", ggml_cplan, _P, C.c_int, _P)
ggml_graph_compute = _fn(_cpu, "ggml_graph_compute", C.c_int, _P, C.POINTER(ggml_cplan))
ggml_threadpool_new = _fn(_cpu, "ggml_threadpool_new", _P, C.POINTER(ggml_threadpool_params))
ggml_threadpool_free = _fn(_cpu, "ggml_threadpool_free", None, _P)

# The layout check: if llama-cpp-python was upgraded, the struct we write `data` into may have moved. Refuse rather
# than corrupt memory.
if ggml_tensor_overhead() != GGML_OBJECT_SIZE + C.sizeof(ggml_tensor):
    raise MoecliError(
        f"llama-cpp-python {_version} has a ggml_tensor layout this moecli does not know "
        f"({ggml_tensor_overhead()} != {GGML_OBJECT_SIZE + C.sizeof(ggml_tensor)} bytes); install "
        f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}")
ggml_cpu_init()  # fp16 tables and CPU feature detection; idempotent
GGML_TYPE_I32 = 26  # not a GGMLQuantizationType (gguf never stores it)
TENSOR_OVERHEAD = ggml_tensor_overhead()


# ---------------------------------------------------------------------------------------------------------------
# (de)quantization


def _traits(ggml_type: int) -> ggml_type_traits:
    return ggml_get_type_traits(int(ggml_type)).contents


def vec_dot_type(ggml_type: int) -> GGMLQuantizationType:
    """The type ggml converts activations to before a matmul with weights of `ggml_type` (Q8_0, Q8_K, F16, ...)."""
    return T(ggml_get_type_traits_cpu(int(ggml_type)).contents.vec_dot_type)


def _row_call(fn_ptr: int, src: np.ndarray, dst: np.ndarray, n: int) -> None:
    _to_float_t(fn_ptr)(src.ctypes.data, dst.ctypes.data, n)


def to_float(t: TensorData) -> np.ndarray:
    """Float32 copy of `t` in numpy order, through ggml's own `to_float` for the type (any ggml type)."""
    out = np.empty(t.shape, dtype=np.float32)
    if t.type == T.F32:
        out.reshape(-1)[:] = t.raw.view(np.float32)
        return out
    fn = _traits(t.type).to_float
    if not fn:
        raise MoecliError(f"{t.name}: ggml cannot dequantize type {t.type.name}")
    raw = np.ascontiguousarray(t.raw)
    _row_call(fn, raw, out, t.n_elements)
    return out


def quantize(x: np.ndarray, ggml_type: int, imatrix: np.ndarray | None = None) -> np.ndarray:
    """Quantize float32 rows `x` (numpy order, last axis = row) to `ggml_type` with ggml_quantize_chunk.

    Returns the raw bytes as a 1-D uint8 array (the layout a GGUF file stores); `imatrix` has one weight per column.
    """
    ggml_type = T(ggml_type)
    x = np.ascontiguousarray(x, dtype=np.float32)
    n_per_row = x.shape[-1]
    nrows = x.size // n_per_row
    block = GGML_QUANT_SIZES[ggml_type][0]
    if n_per_row % block:
        raise MoecliError(f"cannot quantize rows of {n_per_row} values to {ggml_type.name} (block {block})")
    if imatrix is None and ggml_quantize_requires_imatrix(ggml_type):
        raise MoecliError(f"{ggml_type.name} needs an importance matrix")
    if imatrix is not None:
        imatrix = np.ascontiguousarray(imatrix, dtype=np.float32)
        assert imatrix.shape == (n_per_row,)
    out = np.empty(nrows * ggml_row_size(ggml_type, n_per_row), dtype=np.uint8)
    n = ggml_quantize_chunk(ggml_type, x.ctypes.data, out.ctypes.data, 0, nrows, n_per_row,
                            None if imatrix is None else imatrix.ctypes.data)
    assert n == out.nbytes
    return out


def quantize_activations(x: np.ndarray, ggml_type: int) -> np.ndarray:
    """Round-trip float32 rows through the CPU `from_float` of `ggml_type` and back: the values a matmul sees after
    ggml converted its activations to `vec_dot_type(weight type)` (tests build exact references with this)."""
    ggml_type = T(ggml_type)
    x = np.ascontiguousarray(x, dtype=np.float32)
    if ggml_type == T.F32:
        return x.copy()
    q = np.empty(x.size // x.shape[-1] * ggml_row_size(ggml_type, x.shape[-1]), dtype=np.uint8)
    _from_float_t(ggml_get_type_traits_cpu(ggml_type).contents.from_float)(x.ctypes.data, q.ctypes.data, x.size)
    fn = _traits(ggml_type).to_float
    if not fn and ggml_type == T.Q8_K:  # ggml has no to_float for its activation-only Q8_K: float d, int8 qs[256]
        blocks = q.reshape(-1, 292)
        d = blocks[:, :4].copy().view(np.float32)
        return (d * blocks[:, 4:260].view(np.int8)).reshape(x.shape).astype(np.float32)
    out = np.empty_like(x)
    _row_call(fn, q, out, x.size)
    return out


# ---------------------------------------------------------------------------------------------------------------
# threads


def physical_cores() -> int:
    """Physical cores this process may run on (ggml's matmuls gain nothing from SMT siblings)."""
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    cores = set()
    for cpu in allowed:
        try:
            cores.add(Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/core_cpus_list").read_text().strip())
        except OSError:
            cores.add(str(cpu))
    return max(1, len(cores))


_lock = threading.RLock()  # one graph at a time: the threadpool and the work buffer are shared
_pool = None
_pool_threads = 0
_pool_generation = 0  # bumps when the pool changes, so cached plans are redone
_work = np.empty(0, dtype=np.uint8)


def set_threads(n: int | None = None, poll: int = 50) -> int:
    """(Re)create the persistent threadpool with `n` threads (default: physical cores). `poll` is ggml's spin level
    (0-100) before a worker sleeps between graphs: spinning makes back-to-back decode graphs start sooner."""
    global _pool, _pool_threads, _pool_generation
    n = int(n or physical_cores())
    with _lock:
        if _pool is not None:
            ggml_threadpool_free(_pool)
        p = ggml_threadpool_params()
        ggml_threadpool_params_init(C.byref(p), n)
        p.poll = poll
        _pool = ggml_threadpool_new(C.byref(p))
        if not _pool:
            raise MoecliError(f"ggml could not start a threadpool of {n} threads")
        _pool_threads = n
        _pool_generation += 1
    return n


def n_threads() -> int:
    if _pool is None:
        set_threads()
    return _pool_threads


# ---------------------------------------------------------------------------------------------------------------
# graphs


class Ctx:
    """A `no_alloc` ggml context: tensor and graph metadata only; every tensor's data is set by us."""

    def __init__(self, n_tensors: int, graph_size: int = 0):
        size = n_tensors * TENSOR_OVERHEAD + (ggml_graph_overhead_custom(graph_size, False) if graph_size else 0)
        self.ptr = ggml_init(ggml_init_params(size + 1024, None, True))
        if not self.ptr:
            raise MemoryError("ggml_init failed")

    def tensor(self, ggml_type: int, *ne: int, data: int | None = None) -> C.POINTER(ggml_tensor):
        t = (ggml_new_tensor_1d, ggml_new_tensor_2d, ggml_new_tensor_3d)[len(ne) - 1](self.ptr, int(ggml_type), *ne)
        if data is not None:
            t.contents.data = data
        return t

    def __del__(self):
        if getattr(self, "ptr", None) and ggml_free is not None:
            ggml_free(self.ptr)
            self.ptr = None


class Graph:
    """A built graph: `ctx` owns its metadata, `keep` the buffers its tensors point at. `compute()` runs it on the
    shared threadpool (GIL released by ctypes for the duration)."""

    def __init__(self, ctx: Ctx, outputs, n_nodes: int = 16, keep=()):
        self.ctx, self.keep = ctx, list(keep)
        self.ptr = ggml_new_graph_custom(ctx.ptr, n_nodes, False)
        for out in outputs:
            ggml_build_forward_expand(self.ptr, out)
        self._gen, self._plan = -1, None

    def compute(self) -> None:
        global _work
        if _pool is None:
            set_threads()
        with _lock:
            if self._gen != _pool_generation:
                self._plan = ggml_graph_plan(self.ptr, _pool_threads, _pool)
                self._gen = _pool_generation
            plan = self._plan
            if plan.work_size > _work.nbytes:
                _work = np.empty(plan.work_size * 5 // 4 + 4096, dtype=np.uint8)
            if plan.work_size and plan.work_data != _work.ctypes.data:
                plan.work_data = _work.ctypes.data
            status = ggml_graph_compute(self.ptr, C.byref(plan))
        if status != 0:
            raise MoecliError(f"ggml_graph_compute failed (status {status})")


def ptr(a) -> int:
    """Address of a numpy array's or CPU torch tensor's first element."""
    return a.data_ptr() if hasattr(a, "data_ptr") else a.ctypes.data


# Weight tensors: metadata made once per checkpoint tensor, pointing at the mmap (zero-copy).
_weights_lock = threading.Lock()
_weight_ctxs: list[Ctx] = []
_weight_left = 0
_weight_tensors: dict[tuple, C.POINTER(ggml_tensor)] = {}


def weight_tensor(t: TensorData, repacked: bool = True):
    """A ggml tensor over `t`'s bytes (cached by address, type and shape), or its repacked copy if it has one (see
    `repack`) and `repacked`; `t.raw` must outlive it."""
    global _weight_left
    if repacked and t.repacked is not None:
        return t.repacked.tensor
    key = (t.raw.ctypes.data, int(t.type), t.ne)
    w = _weight_tensors.get(key)
    if w is None:
        if t.raw.nbytes != t.n_elements // GGML_QUANT_SIZES[t.type][0] * GGML_QUANT_SIZES[t.type][1]:
            raise MoecliError(f"{t.name}: byte size does not match its type and shape")
        with _weights_lock:
            if _weight_left == 0:
                _weight_ctxs.append(Ctx(4096))
                _weight_left = 4096
            _weight_left -= 1
            w = _weight_tensors[key] = _weight_ctxs[-1].tensor(t.type, *t.ne, data=key[0])
    return w


# ---------------------------------------------------------------------------------------------------------------
# repacked weights: llama.cpp's CPU_REPACK buffer type, rows interleaved for its AVX2 / NEON kernels

ggml_backend_cpu_reg = _fn(_cpu, "ggml_backend_cpu_reg", _P)
ggml_backend_reg_dev_get = _fn(_base, "ggml_backend_reg_dev_get", _P, _P, C.c_size_t)
ggml_backend_reg_get_proc_address = _fn(_base, "ggml_backend_reg_get_proc_address", _P, _P, C.c_char_p)
ggml_backend_buft_name = _fn(_base, "ggml_backend_buft_name", C.c_char_p, _P)
ggml_backend_buft_get_alloc_size = _fn(_base, "ggml_backend_buft_get_alloc_size", C.c_size_t, _P, _T)
ggml_backend_buft_alloc_buffer = _fn(_base, "ggml_backend_buft_alloc_buffer", _P, _P, C.c_size_t)
ggml_backend_buffer_get_base = _fn(_base, "ggml_backend_buffer_get_base", _P, _P)
ggml_backend_buffer_free = _fn(_base, "ggml_backend_buffer_free", None, _P)
ggml_backend_tensor_alloc = _fn(_base, "ggml_backend_tensor_alloc", C.c_int, _P, _T, _P)
ggml_backend_tensor_set = _fn(_base, "ggml_backend_tensor_set", None, _T, _P, C.c_size_t, C.c_size_t)
_libc = C.CDLL(None)
_MADV_DONTNEED, _PAGE = 4, os.sysconf("SC_PAGE_SIZE")


def trim_heap() -> None:
    """Give the C heap's free memory back to the OS (glibc's malloc_trim): ggml's compute buffers are freed into
    the heap, which otherwise keeps their pages resident."""
    trim = getattr(_libc, "malloc_trim", None)
    if trim is not None:
        trim(0)


def _repack_buffer_type():
    """The CPU backend's CPU_REPACK buffer type (None where this build has none)."""
    reg = ggml_backend_cpu_reg()
    fn = ggml_backend_reg_get_proc_address(reg, b"ggml_backend_dev_get_extra_bufts")
    if not fn:
        return None
    bufts = C.CFUNCTYPE(C.POINTER(_P), _P)(fn)(ggml_backend_reg_dev_get(reg, 0))
    i = 0
    while bufts[i]:
        if ggml_backend_buft_name(bufts[i]) == b"CPU_REPACK":
            return bufts[i]
        i += 1
    return None


_REPACK_BUFT = _repack_buffer_type()


class Repacked:
    """A weight in its own CPU_REPACK buffer; ggml's mul_mat / mul_mat_id pick the repacked kernel from the tensor's
    buffer type. Freed with the checkpoint tensor that holds it."""

    def __init__(self, ctx: Ctx, tensor, buffer):
        self.ctx, self.tensor, self.buffer = ctx, tensor, buffer
        self.experts = self.experts_ctx = None  # per-expert 2-D views (repacked_experts)

    def __del__(self):
        if self.buffer and ggml_backend_buffer_free is not None:
            ggml_backend_buffer_free(self.buffer)
            self.buffer = None


def repacked_experts(t: TensorData) -> list | None:
    """2-D ggml tensors over each expert of `t`'s repacked copy (a 3-D stack repacked by `repack`), or None. They
    share the copy's buffer and kernel traits, so mul_mat on them runs the repacked gemm: with rows interleaved in
    groups of 8 within an expert, expert e's repacked rows sit where its rows sat, at e * nb[2]."""
    if t.repacked is None or len(t.ne) != 3:
        return None
    views = t.repacked.experts
    if views is None:
        r = t.repacked.tensor.contents
        ctx = Ctx(t.ne[2])
        views = []
        for e in range(t.ne[2]):
            v = ctx.tensor(t.type, t.ne[0], t.ne[1], data=r.data + e * r.nb[2])
            v.contents.buffer, v.contents.extra = r.buffer, r.extra
            views.append(v)
        t.repacked.experts, t.repacked.experts_ctx = views, ctx
    return views


def repack(t: TensorData, release_source: bool = True) -> bool:
    """Give `t` a repacked copy that `weight_tensor(t)` returns from now on, when ggml has a repack kernel for its
    type and shape on this CPU (llama.cpp's rule: e.g. Q4_0/Q4_K/IQ4_NL/MXFP4 with rows % 8 == 0 on AVX2). With
    `release_source` the file pages it was read from are dropped from this process (they are not read again), so
    the copy costs no resident memory. Returns whether it repacked."""
    if t.repacked is not None:
        return True
    if _REPACK_BUFT is None or t.type in (T.F32, T.F16, T.BF16) or len(t.ne) not in (2, 3):
        return False
    from moecli.kernels.llama_log import quiet_llama

    quiet_llama()  # ggml logs every repacked tensor
    ctx = Ctx(1)
    w = ctx.tensor(t.type, *t.ne)
    buf = ggml_backend_buft_alloc_buffer(_REPACK_BUFT, ggml_backend_buft_get_alloc_size(_REPACK_BUFT, w))
    if not buf:
        return False
    if ggml_backend_tensor_alloc(buf, w, ggml_backend_buffer_get_base(buf)) != 0 or not w.contents.extra:
        ggml_backend_buffer_free(buf)  # no repack kernel for this type / shape: the tensor stays as it is
        return False
    src = np.ascontiguousarray(t.raw)
    ggml_backend_tensor_set(w, src.ctypes.data, 0, src.nbytes)
    object.__setattr__(t, "repacked", Repacked(ctx, w, buf))
    if release_source:
        start = -(-t.raw.ctypes.data // _PAGE) * _PAGE
        end = (t.raw.ctypes.data + t.raw.nbytes) // _PAGE * _PAGE
        if end > start:
            _libc.madvise(C.c_void_p(start), C.c_size_t(end - start), _MADV_DONTNEED)
    return True


# ---------------------------------------------------------------------------------------------------------------
# matmul (the CPU-only mode's linear layers)

MATMUL_CACHE_MAX_N = 16  # graphs for n <= this are kept (decode, short drafts); bigger batches build one per call
_mm_graphs: dict[tuple, tuple] = {}


def _matmul_graph(w, n_in: int, n_out: int, n: int):
    ctx = Ctx(3, 4)  # x, the mul_mat result, and the graph
    x = ctx.tensor(T.F32, n_in, n)
    y = ggml_mul_mat(ctx.ptr, w, x)
    return Graph(ctx, [y], 4), x.contents, y.contents


def matmul(weight: TensorData, x, repacked: bool = True):
    """`x @ dequant(weight).T` computed by ggml on the quantized weight in place: weight ne = (in, out), x float32
    [n, in] (numpy or CPU torch) -> [n, out] of the same kind. ggml first converts x to `vec_dot_type(weight.type)`
    (Q8_0/Q8_K for quantized weights), exactly as llama.cpp does. `repacked`: use the weight's repacked copy if it
    has one."""
    if len(weight.ne) != 2:
        raise MoecliError(f"{weight.name}: matmul needs a 2-D weight, got ne={weight.ne}")
    n_in, n_out = weight.ne
    is_torch = hasattr(x, "data_ptr")
    if is_torch:
        import torch

        if x.dtype != torch.float32 or x.device.type != "cpu":
            raise MoecliError("matmul: x must be a float32 CPU tensor")
        x = x.contiguous()
    else:
        x = np.ascontiguousarray(x, dtype=np.float32)
    squeeze = x.ndim == 1
    if squeeze:
        x = x.reshape(1, -1)
    if x.ndim != 2 or x.shape[1] != n_in:
        raise MoecliError(f"{weight.name}: matmul expects x [n, {n_in}], got {tuple(x.shape)}")
    n = x.shape[0]
    w = weight_tensor(weight, repacked)
    if n <= MATMUL_CACHE_MAX_N:
        key = (C.addressof(w.contents), n)
        entry = _mm_graphs.get(key)
        if entry is None:
            entry = _mm_graphs[key] = _matmul_graph(w, n_in, n_out, n)
    else:
        entry = _matmul_graph(w, n_in, n_out, n)
    graph, xt, yt = entry
    if is_torch:
        y = torch.empty((n, n_out), dtype=torch.float32)
    else:
        y = np.empty((n, n_out), dtype=np.float32)
    with _lock:  # the cached graph's pointers are shared state
        xt.data, yt.data = ptr(x), ptr(y)
        graph.compute()
    return y[0] if squeeze else y


# ---------------------------------------------------------------------------------------------------------------
# a whole SwiGLU FFN in one graph (dense layers and shared experts in the CPU-only mode)

_ffn_graphs: dict[tuple, tuple] = {}


def _ffn_graph(wg, wu, wd, n_in: int, ff: int, n: int):
    ctx = Ctx(6, 8)
    x = ctx.tensor(T.F32, n_in, n)
    g = ggml_mul_mat(ctx.ptr, wg, x)
    u = ggml_mul_mat(ctx.ptr, wu, x)
    a = ggml_swiglu_split(ctx.ptr, g, u)  # llama.cpp's own fused silu(gate) * up for these FFNs
    y = ggml_mul_mat(ctx.ptr, wd, a)
    scratch = np.empty((3, n, ff), dtype=np.float32)
    for t, buf in zip((g, u, a), scratch):
        t.contents.data = buf.ctypes.data
    return Graph(ctx, [y], 8, keep=[scratch]), x.contents, y.contents


def swiglu_ffn(gate: TensorData, up: TensorData, down: TensorData, x):
    """down(silu(gate x) * up x) on quantized weights in ONE graph: one threadpool wake-up instead of three, and the
    activation rounded exactly as llama.cpp rounds it. x: float32 [n, in] numpy or CPU torch -> the same kind."""
    n_in, ff = gate.ne
    is_torch = hasattr(x, "data_ptr")
    if is_torch:
        import torch

        x = x.contiguous()
    else:
        x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != n_in or up.ne != gate.ne or down.ne != (ff, n_in):
        raise MoecliError(f"{gate.name}: FFN shapes disagree (x {tuple(x.shape)}, gate {gate.ne}, down {down.ne})")
    n = x.shape[0]
    w = [weight_tensor(t) for t in (gate, up, down)]
    if n <= MATMUL_CACHE_MAX_N:
        key = (C.addressof(w[0].contents), n)
        entry = _ffn_graphs.get(key)
        if entry is None:
            entry = _ffn_graphs[key] = _ffn_graph(*w, n_in, ff, n)
    else:
        entry = _ffn_graph(*w, n_in, ff, n)
    graph, xt, yt = entry
    y = torch.empty((n, n_in), dtype=torch.float32) if is_torch else np.empty((n, n_in), dtype=np.float32)
    with _lock:  # the cached graph's pointers are shared state
        xt.data, yt.data = ptr(x), ptr(y)
        graph.compute()
    return y
