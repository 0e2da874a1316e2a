"""Building blocks shared by the architectures: weights on the device, norms, attention, routing (RoPE: rope.py)."""
from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as T

from moecli.formats.tensor import TensorData
from moecli.kernels import device_ops


def to_torch(t: TensorData, device: torch.device | str, dtype=torch.float32) -> torch.Tensor:
    """A checkpoint tensor as a dense torch tensor (dequantized) in numpy order."""
    return torch.from_numpy(np.ascontiguousarray(t.numpy())).to(device=device, dtype=dtype)


def _raw_bytes(t: TensorData, device) -> torch.Tensor:
    """The tensor's file bytes on `device` (on the CPU: the mmap itself, nothing copied; torch warns about
    read-only numpy arrays, and nothing here writes to them)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(t.raw).to(device)


class TorchLinear:
    """y = x W^T (+ b) on the device. GGUF weights stay in their quantized bytes and go through the Triton kernels
    (safetensors' bf16/fp16 stay bf16/fp16 the same way); types no kernel reads are dequantized once to bf16. Where
    Triton cannot run, and on the CPU device unless MOECLI_CPU_DENSE_KERNELS=1 (Triton's interpreter costs ~10 ms
    a launch), W is dequantized once by torch: float32 on the CPU device (the oracle tests' exact path), bf16
    elsewhere."""

    def __init__(self, weight: TensorData, device, bias: TensorData | None = None):
        device = torch.device(device)
        self.file_bytes = weight.nbytes
        self.bias = to_torch(bias, device) if bias is not None else None
        self.qweight = self.weight = None
        if len(weight.ne) == 2 and device_ops.dense_kernels(device.type):
            if weight.type in device_ops.TRITON_TYPES:
                self.qweight = device_ops.QuantWeight(_raw_bytes(weight, device), weight.type, weight.shape)
            else:
                device_ops.warn_fallback_type(weight.type)
                self.qweight = device_ops.QuantWeight(
                    to_torch(weight, device, torch.bfloat16).view(torch.uint8).reshape(-1), T.BF16, weight.shape)
        else:
            self.weight = to_torch(weight, device, torch.float32 if device.type == "cpu" else torch.bfloat16)

    @property
    def device_bytes(self) -> int:
        w = self.qweight.nbytes if self.qweight is not None else self.weight.numel() * self.weight.element_size()
        return w + (self.bias.numel() * self.bias.element_size() if self.bias is not None else 0)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.qweight is not None:
            n, k = self.qweight.shape
            y = device_ops.linear(x.reshape(-1, k), self.qweight, self.bias)
            return y.view(*x.shape[:-1], n)
        y = (x.to(self.weight.dtype) @ self.weight.T).float()
        return y + self.bias if self.bias is not None else y


def dense_weight(lin: TorchLinear) -> torch.Tensor:
    """A TorchLinear's weight as a float32 tensor [out, in] on its device (the quantized form dequantized)."""
    if lin.weight is not None:
        return lin.weight.float()
    from moecli.kernels import torch_dequant

    q = lin.qweight
    return torch_dequant.dequantize(q.raw, q.type, q.shape, dtype=torch.float32)


def dense_bytes(model) -> tuple[int, int]:
    """(device bytes, file bytes) of the TorchLinear weights of a model (its layers, tuples of them): what `chat -v`
    and `bench` print, to show that dense weights sit on the device at about their size in the file."""
    seen, dev, file = set(), 0, 0

    def walk(obj, depth):
        nonlocal dev, file
        if id(obj) in seen or depth > 3:
            return
        seen.add(id(obj))
        if isinstance(obj, TorchLinear):
            dev, file = dev + obj.device_bytes, file + obj.file_bytes
        elif isinstance(obj, (list, tuple)):
            for o in obj:
                walk(o, depth + 1)
        elif hasattr(obj, "__dict__") and not isinstance(obj, (torch.Tensor, type)):
            for o in vars(obj).values():
                if isinstance(o, (TorchLinear, list, tuple)) or type(o).__module__.startswith("moecli.models"):
                    walk(o, depth + 1)

    walk(model, 0)
    return dev, file


class Embedding:
    """Token embedding that dequantizes only the rows it is asked for (the table can be GBs in fp32), all missing
    rows of a call in one go."""

    def __init__(self, table: TensorData, device):
        self.table, self.device = table, device
        self._rows: dict[int, torch.Tensor] = {}

    def __call__(self, tokens: list[int]) -> torch.Tensor:
        missing = [t for t in dict.fromkeys(tokens) if t not in self._rows]
        if missing:
            t = self.table
            raw = t.raw.reshape(-1, t.row_bytes)[missing].reshape(-1)
            rows = to_torch(TensorData("rows", t.type, (t.ne[0], len(missing)), raw), self.device)
            self._rows.update(zip(missing, rows))
        return torch.stack([self._rows[tok] for tok in tokens])


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm rounded the way ggml rounds it: float32 squares summed in double, scale = 1.0f / sqrtf(mean + eps).
    The next matmul quantizes its input to Q8 for quantized weights, so 1-ulp differences here flip roundings."""
    mean = (x * x).double().sum(-1, keepdim=True) / x.shape[-1]
    scale = 1.0 / torch.sqrt((mean + eps).float())
    return (x * scale) * weight


def kv_dtype(device) -> torch.dtype:
    """The KV cache's element type: f16 on an accelerator (llama.cpp's default), float32 on the CPU device, where
    the oracle tests compare logits with llama.cpp's F32 KV cache."""
    return torch.float32 if torch.device(device).type == "cpu" else torch.float16


class KVCache:
    """Preallocated keys and values for every layer: [layer, position, kv_head, head_dim]."""

    def __init__(self, n_layer: int, n_ctx: int, n_head_kv: int, head_dim: int, device, dtype=None):
        dtype = dtype or kv_dtype(device)
        self.k = torch.zeros(n_layer, n_ctx, n_head_kv, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.n_ctx = n_ctx
        self.pos = 0  # tokens stored so far

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2


def begin_recurrent(cache, start: int) -> None:
    """A cache's `begin(start)` before a batch at `start`: a recurrent state (cache.conv / cache.ssm, None without)
    stands for every position before cache.state_pos at once, so it goes on only from there, or starts over at 0."""
    if getattr(cache, "conv", None) is None:
        return
    if start == 0:
        cache.conv.zero_()
        cache.ssm.zero_()
    elif start != cache.state_pos:
        from moecli.errors import MoecliError

        raise MoecliError(f"the recurrent state is at position {cache.state_pos}, not {start}: this model cannot "
                          "rewind its cache (recompute from a checkpoint or from the start)")
    cache.state_pos = start


def save_state(cache):
    """A copy of a cache's recurrent state and the position it stands for (None: no recurrent layers)."""
    if getattr(cache, "conv", None) is None:
        return None
    return cache.state_pos, cache.conv.clone(), cache.ssm.clone()


def restore_state(cache, saved) -> int:
    """Put a `save_state` copy back (the cache then goes on from its position, which it returns; 0 without)."""
    if saved is None:
        return 0
    pos, conv, ssm = saved
    cache.conv.copy_(conv)
    cache.ssm.copy_(ssm)
    cache.state_pos = cache.pos = pos
    return pos


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> torch.Tensor:
    """Causal GQA attention of n new queries at positions start.. over keys 0..start+n-1.

    q: [n, H, d]; k, v: [start+n, Hkv, d] -> [n, H*d]. Each KV head serves its group of query heads without the
    cache being repeated (which would copy the whole context every step).
    """
    if k.dtype != q.dtype:  # an f16 cache: attend in its type (fp32 accumulation inside), return float32
        return attend(q.to(k.dtype), k, v, start).float()
    n, n_head, d = q.shape
    n_kv = k.shape[1]
    if n == 1:  # decode: two batched matmuls over [Hkv, group, d] beat SDPA's GQA path ~10x at small sizes
        qg = q.view(n_kv, n_head // n_kv, d)
        scores = torch.softmax(torch.bmm(qg, k.permute(1, 2, 0)) * d ** -0.5, dim=-1)
        return torch.bmm(scores, v.transpose(0, 1)).reshape(1, n_head * d)
    # 4-D inputs (a batch of one) and, for a fresh prompt, plain causal masking put SDPA on its flash kernel,
    # which skips the masked half: 2x+ faster than 3-D inputs with an explicit mask
    mask = None
    if start:
        kpos = torch.arange(start + n, device=q.device)
        qpos = torch.arange(start, start + n, device=q.device)
        mask = kpos[None, :] <= qpos[:, None]
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                         attn_mask=mask, is_causal=mask is None, scale=d ** -0.5,
                                         enable_gqa=n_kv != n_head)
    return out[0].transpose(0, 1).reshape(n, n_head * d)


def route(c, logits: torch.Tensor, bias: torch.Tensor | None = None):
    """llama.cpp's build_moe_ffn routing for config `c` -> (scores [n, E], ids [n, k], weights [n, k]): softmax or
    sigmoid scores (+ a selection-only bias, the best `topk_group` of `n_group` groups), or gpt-oss's softmax over
    the top-k logits; weights renormalised (norm_topk), then times routed_scale."""
    k = c.n_expert_used
    if c.gating == "softmax_weight":
        top, ids = torch.topk(logits, k, dim=-1)
        probs, weights = torch.softmax(logits, -1), torch.softmax(top, -1)
    else:
        probs = torch.softmax(logits, -1) if c.gating == "softmax" else torch.sigmoid(logits)
        sel = probs + bias if bias is not None else probs  # the bias picks experts; weights come from probs
        if c.select_logits:  # llama4: picked by the logits themselves
            sel = logits
        if c.n_group > 1:
            n = sel.shape[0]
            groups = sel.view(n, c.n_group, c.n_expert // c.n_group)
            # each group scored by its two best experts (V3, llama.cpp), or its best one (transformers' V2)
            gscore = groups.amax(-1) if c.group_score == "max" else groups.topk(2, -1).values.sum(-1)
            keep = gscore.topk(c.topk_group, -1).indices
            masked = torch.full_like(groups, float("-inf"))
            idx = keep[:, :, None].expand(-1, -1, groups.shape[-1])
            sel = masked.scatter(1, idx, groups.gather(1, idx)).view(n, c.n_expert)
        ids = sel.topk(k, -1).indices
        weights = probs.gather(1, ids)
    if c.norm_topk:
        weights = weights / weights.sum(-1, keepdim=True).clamp(min=6.103515625e-5)
    if c.routed_scale not in (0.0, 1.0):
        weights = weights * np.float32(c.routed_scale).item()
    return probs, ids, weights
