"""Host overhead of a decode step, counted: torch ops dispatched per MoE layer, and device->host reads.

`count_decode_ops(model)` runs one decode step of a loaded hybrid (or torch) model under a TorchDispatchMode and
attributes every dispatched aten op to the layer whose attention block or FFN was running (the rest: embedding,
head). A Triton launcher registered as a torch.library custom op counts once, as one kernel launch would; views
count too (each is a Python->C++ dispatch on the host).

`HostReads` is a TorchFunctionMode that records every way a tensor's values can reach the host as Python data
(`item`, `tolist`, `numpy`, `nonzero`, `__bool__`...): the hot-path test runs a decode step under it and allows
only the executor's one sanctioned transfer (moecli.runtime.executor.to_host).
"""
from __future__ import annotations

import contextlib
import threading
from collections import Counter

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

_SYNC_OPS = {"_local_scalar_dense", "item", "nonzero", "is_nonzero", "equal", "unique", "_unique2",
             "masked_select"}  # ops whose output size or value the host must wait for


class _OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.where = "outside"  # the layer running now ("outside": embedding, head, sampling)
        self.ops: dict[object, Counter] = {}
        self._owner = threading.get_ident()  # ggml worker threads dispatch nothing; only this thread counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if threading.get_ident() == self._owner:
            name = func.overloadpacket.__name__ if hasattr(func, "overloadpacket") else str(func)
            self.ops.setdefault(self.where, Counter())[name] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def _attributed(transformer, counter: _OpCounter):
    """Tag the counter with the layer whose attention block / FFN / early router (SmallThinker's, before attention)
    runs (instance attributes, removed after)."""
    names = [n for n in ("route_early", "attention_block", "ffn") if hasattr(transformer, n)]

    def wrap(fn):
        def tagged(l, *a, **k):
            counter.where = l
            try:
                return fn(l, *a, **k)
            finally:
                counter.where = "outside"
        return tagged

    for n in names:
        setattr(transformer, n, wrap(getattr(transformer, n)))
    try:
        yield
    finally:
        for n in names:
            delattr(transformer, n)


def count_decode_ops(model, prompt: list[int] | None = None) -> dict:
    """One decode step of `model` (a moecli.api.Model on the torch or hybrid engine) after a short prompt, ops
    counted. Returns {"per_moe_layer": mean ops of an MoE layer, "per_layer": {layer: ops}, "outside": ops,
    "top": the most dispatched ops of one MoE layer, "syncs_per_moe_layer": the executor's device->host reads}."""
    tr = model.transformer
    if tr.fused_forward is not None:
        raise ValueError("the ggml engine dispatches no torch ops: count the torch or hybrid engine")
    prompt = prompt or list(range(1, 9))
    cache = tr.new_cache(len(prompt) + 2)
    tr.forward(prompt, cache)  # prefill (eager, not counted)
    tr.forward([prompt[-1]], cache)  # one decode step to warm lazily built state (embedding rows, graphs)
    st = getattr(tr.experts, "stats", None)
    syncs0 = st.syncs if st is not None else 0
    counter = _OpCounter()
    with _attributed(tr, counter), counter:
        tr.forward([prompt[0]], cache, all_logits=False)
    moe = [l for l in range(tr.config.n_layer) if tr.layers[l].router is not None]
    per_layer = {l: sum(c.values()) for l, c in counter.ops.items() if l != "outside"}
    top = Counter()
    for l in moe:
        top.update(counter.ops.get(l, Counter()))
    n = max(len(moe), 1)
    return {"per_moe_layer": sum(per_layer.get(l, 0) for l in moe) / n, "per_layer": per_layer,
            "outside": sum(counter.ops.get("outside", Counter()).values()),
            "top": {k: v / n for k, v in top.most_common(12)},
            "sync_ops_per_moe_layer": sum(top[o] for o in _SYNC_OPS) / n,
            "syncs_per_moe_layer": ((st.syncs - syncs0) / n) if st is not None else None}


class HostReads(TorchFunctionMode):
    """Records every read of tensor values by the host (`item`, `tolist`, `numpy`, `nonzero`, truth tests...),
    except inside `allowed()` (the executor's one transfer). `reads` lists their names in order."""

    NAMES = {"item", "tolist", "numpy", "nonzero", "__bool__", "__int__", "__float__", "__index__", "cpu",
             "unique", "equal", "any", "all"}

    def __init__(self):
        super().__init__()
        self.reads: list[str] = []
        self._allowed = 0

    @contextlib.contextmanager
    def allowed(self):
        self._allowed += 1
        try:
            yield
        finally:
            self._allowed -= 1

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in self.NAMES and not self._allowed and threading.current_thread() is threading.main_thread():
            self.reads.append(name)
        return func(*args, **(kwargs or {}))


def main(argv: list[str] | None = None) -> int:
    """`python3 -m moecli.runtime.op_count MODEL [--placement P] [--expert-slots K]`: ops per MoE layer of one
    decode step on the CPU device with the device kernels active (TRITON_INTERPRET=1, MOECLI_CPU_DENSE_KERNELS=1
    unless set), every expert on the device by default."""
    import argparse
    import json
    import os

    ap = argparse.ArgumentParser(prog="python3 -m moecli.runtime.op_count")
    ap.add_argument("model")
    ap.add_argument("--placement", default="n-cpu-moe=0")
    ap.add_argument("--expert-slots", type=int, default=None, help="default: every expert")
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args(argv)
    os.environ.setdefault("MOECLI_CPU_DENSE_KERNELS", "1")
    if a.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels are defined: before moecli loads
    import moecli
    from moecli.errors import MoecliError

    try:
        from moecli.models.loader import load_checkpoint

        slots = a.expert_slots if a.expert_slots is not None else load_checkpoint(a.model).config.n_expert
        m = moecli.load(a.model, device=a.device, placement=a.placement, expert_slots=slots)
    except (MoecliError, OSError, ValueError) as e:
        print(f"error: {e}")
        return 1
    r = count_decode_ops(m)
    print(f"ops per MoE layer: {r['per_moe_layer']:.1f}  (syncs per MoE layer: {r['syncs_per_moe_layer']}, "
          f"sync ops: {r['sync_ops_per_moe_layer']}, outside the layers: {r['outside']})")
    print("most dispatched:", json.dumps(r["top"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
