"""Routing traces: moecli's own format (written and read here) and readers for the external traces in
../shared/traces (Mixtral-8x7B decode JSONL, Qwen1.5-MoE per-layer vLLM logs).

In memory a trace is sequences of forward passes (a prefill batch or one decode step); each pass holds, per MoE
layer, per token: selected expert ids, their weights, the full router scores when known, and predictions made
d layers earlier when known. The moecli format (JSONL, docs/simulator.md):
  line 1: {"format":"moecli-trace","version":1,"model":NAME,"n_experts":E,"top_k":K,"layers":[...],
           "executor":{"placement":P,"slots":N} (optional: the run that recorded it),
           "known_early":[...] (optional: layers whose routing is known one attention block early, before their
           dense part, because the router reads the layer input: SmallThinker)}
  then one record per (sequence, pass, layer):
  {"seq":S,"pass":P,"kind":"prefill"|"decode","layer":L,"ids":[[..K]..T],"weights":[[..K]..T],
   "scores":[[..E]..T] (optional),"pred":{"1":[[..K]..T],"2":...,"3":...} (optional),
   "clock":{"now","copy","cpu","after_now","after_copy"[,"arrivals","known_now","known_copy"]} (optional, ms: the
            executor's clock at its decisions; arrivals {expert: ms}: its copies into this layer still in flight, from
            the copy engine's events; known_*: at a known-early layer's prefetch, before its attention),
   "costs":{CostModel fields} (optional, on a pass's first layer: the cost model that pass decided with)}
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from moecli.errors import MoecliError
from moecli.policy.core import mean_scores


@dataclass
class LayerRouting:
    ids: list[list[int]]                       # [T][k]
    weights: list[list[float]] | None = None   # [T][k]
    scores: list[list[float]] | None = None    # [T][E], full router probabilities
    pred: dict[int, list[list[int]]] = field(default_factory=dict)  # distance -> [T][k]
    clock: dict | None = None      # the executor's clock readings at its decisions (replays)
    _tokens: dict[int, int] | None = None
    _score: dict[int, float] | None = None

    def tokens(self) -> dict[int, int]:
        """Tokens per expert in this pass."""
        if self._tokens is None:
            d: dict[int, int] = {}
            for row in self.ids:
                for e in row:
                    d[e] = d.get(e, 0) + 1
            self._tokens = d
        return self._tokens

    def mean_scores(self) -> dict[int, float]:
        """Router scores averaged over the pass's tokens: the full vector when known, else the selected weights."""
        if self._score is None:
            d: dict[int, float] = {}
            T = max(1, len(self.ids))
            if self.scores:
                d = mean_scores(self.scores)
            elif self.weights:
                for ids, ws in zip(self.ids, self.weights):
                    for e, v in zip(ids, ws):
                        d[e] = d.get(e, 0.0) + v / T
            else:
                for ids in self.ids:
                    for e in ids:
                        d[e] = d.get(e, 0.0) + 1.0 / len(ids) / T
            self._score = d
        return self._score


@dataclass
class Pass:
    kind: str                          # "prefill" | "decode"
    layers: dict[int, LayerRouting]
    costs: dict[str, float] | None = None  # the cost model the executor decided this pass with (replays)

    @property
    def n_tokens(self) -> int:
        return max((len(r.ids) for r in self.layers.values()), default=0)


@dataclass
class Sequence:
    id: str
    passes: list[Pass]


@dataclass
class Trace:
    model: str
    n_experts: int
    top_k: int
    layers: list[int]
    sequences: list[Sequence]
    source: str = ""
    full_scores: bool = False
    has_predictions: bool = False
    executor: dict | None = None  # the recording executor's placement and slots (replays)
    known_early: list[int] = field(default_factory=list)  # layers routed before their attention (SmallThinker)


def write_trace(trace: Trace, path: str | Path) -> None:
    """Write in moecli's format; to a temporary name first so a failure leaves no partial file."""
    p = Path(path)
    tmp = p.with_name(p.name + ".tmp")
    with tmp.open("w") as f:
        head = {"format": "moecli-trace", "version": 1, "model": trace.model, "n_experts": trace.n_experts,
                "top_k": trace.top_k, "layers": trace.layers}
        if trace.executor:
            head["executor"] = trace.executor
        if trace.known_early:
            head["known_early"] = sorted(trace.known_early)
        f.write(json.dumps(head) + "\n")
        for s in trace.sequences:
            for pi, ps in enumerate(s.passes):
                for layer, r in sorted(ps.layers.items()):
                    rec = {"seq": s.id, "pass": pi, "kind": ps.kind, "layer": layer, "ids": r.ids}
                    if r.weights is not None:
                        rec["weights"] = r.weights
                    if r.scores is not None:
                        rec["scores"] = r.scores
                    if r.pred:
                        rec["pred"] = {str(d): v for d, v in r.pred.items()}
                    if r.clock:
                        rec["clock"] = r.clock
                    if ps.costs and layer == min(ps.layers):
                        rec["costs"] = ps.costs
                    f.write(json.dumps(rec) + "\n")
    tmp.replace(p)


def _read_moecli(path: Path, head: dict) -> Trace:
    seqs: dict[str, dict[int, Pass]] = {}
    full = preds = False
    with path.open() as f:
        next(f)
        for line in f:
            if not line.strip():
                continue
            r = json.loads(line)
            lr = LayerRouting(r["ids"], r.get("weights"), r.get("scores"),
                              {int(d): v for d, v in (r.get("pred") or {}).items()}, r.get("clock"))
            full |= lr.scores is not None
            preds |= bool(lr.pred)
            passes = seqs.setdefault(str(r["seq"]), {})
            ps = passes.setdefault(int(r["pass"]), Pass(r.get("kind", "decode"), {}))
            ps.layers[int(r["layer"])] = lr
            if r.get("costs"):
                ps.costs = r["costs"]
    sequences = [Sequence(k, [v[i] for i in sorted(v)]) for k, v in seqs.items()]
    return Trace(head.get("model", ""), int(head["n_experts"]), int(head["top_k"]), list(head["layers"]),
                 sequences, str(path), full, preds, head.get("executor"), _layer_list(head, "known_early"))


def _layer_list(head: dict, key: str) -> list[int]:
    v = head.get(key) or []
    if not isinstance(v, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in v) \
            or not set(v) <= set(head["layers"]):
        raise MoecliError(f"moecli trace: {key!r} must be a list of the trace's layers, got {v!r}")
    return sorted(v)


def _read_mixtral(path: Path) -> Trace:
    """Mario928/speculative-moe decode trace: one record per (problem, layer, decode token), top-2 of 8, the two
    selected probabilities renormalised. Tokens missing in some layers (the last 1-3 per problem) are dropped."""
    by: dict[int, dict[int, dict[int, tuple]]] = {}
    layers: set[int] = set()
    with path.open() as f:
        for line in f:
            if not line.strip():
                continue
            r = json.loads(line)
            by.setdefault(int(r["problem_id"]), {}).setdefault(int(r["token_idx"]), {})[int(r["layer"])] = (
                [int(e) for e in r["experts"]], [float(p) for p in r["gating_probs"]])
            layers.add(int(r["layer"]))
    seqs = []
    for pid in sorted(by):
        passes = []
        for t in sorted(by[pid]):
            rec = by[pid][t]
            if len(rec) != len(layers):
                continue
            passes.append(Pass("decode", {l: LayerRouting([ids], [w]) for l, (ids, w) in rec.items()}))
        seqs.append(Sequence(str(pid), passes))
    return Trace("mixtral-8x7b", 8, 2, sorted(layers), seqs, str(path))


def _read_qwen(paths: list[Path]) -> Trace:
    """weiran0129/vLLM-MoE-Logger logs: one file per layer. Forward passes are delimited by token_idx restarting at
    0; the first three passes (8192, 256 and 65 rows) are vLLM warm-up, then comes the batched prefill of the 25
    prompts, then batched decode steps. Layers are joined pass by pass (identical batching across runs)."""
    per_layer: dict[int, list[LayerRouting]] = {}
    top_k = 4
    for p in paths:
        passes: list[LayerRouting] = []
        layer = None
        with p.open() as f:
            for line in f:
                r = json.loads(line)
                if r.get("type") == "meta":
                    top_k = int(r.get("top_k", top_k))
                    continue
                if r.get("type") != "route":
                    continue
                layer = int(r["layer"])
                if r["token_idx"] == 0 or not passes:
                    passes.append(LayerRouting([], []))
                passes[-1].ids.append([int(e) for e in r["topk_ids"]])
                passes[-1].weights.append([float(w) for w in r["topk_weights"]])
        if layer is None or len(passes) < 5:
            raise MoecliError(f"{p}: not a vLLM-MoE-Logger route log")
        per_layer[layer] = passes[3:]
    n = {len(v) for v in per_layer.values()}
    if len(n) != 1:
        raise MoecliError("qwen trace: layer files have different numbers of passes")
    layers = sorted(per_layer)
    out = [Pass("prefill" if i == 0 else "decode", {l: per_layer[l][i] for l in layers}) for i in range(n.pop())]
    return Trace("qwen1.5-moe-a2.7b", 60, top_k, layers, [Sequence("batch", out)], ",".join(map(str, paths)))


def read_trace(path: str | Path) -> Trace:
    """Read a trace file or directory, detecting the format."""
    p = Path(path)
    if p.is_dir():
        qwen = sorted(p.glob("moe_layer*.jsonl"))
        if qwen:
            return _read_qwen(qwen)
        mix = sorted(p.glob("*_routing.jsonl"))
        if mix:
            return _read_mixtral(mix[0])
        raise MoecliError(f"no known trace files in {p}")
    if not p.is_file():
        raise MoecliError(f"trace not found: {p}")
    try:
        with p.open() as f:
            first = json.loads(f.readline())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise MoecliError(f"{p}: not a JSONL routing trace") from None
    if first.get("format") == "moecli-trace":
        return _read_moecli(p, first)
    if "problem_id" in first and "experts" in first:
        return _read_mixtral(p)
    if first.get("type") in ("meta", "route"):
        return _read_qwen([p])
    raise MoecliError(f"{p}: unknown trace format")


def prefill_from_decode(passes: list[Pass], max_tokens: int | None = None) -> Pass:
    """One batched pass made of decode tokens' routings (traces without prompt tokens): a stand-in prompt."""
    use = passes[:max_tokens] if max_tokens else passes
    layers: dict[int, LayerRouting] = {}
    for ps in use:
        for l, r in ps.layers.items():
            lr = layers.setdefault(l, LayerRouting([], [] if r.weights is not None else None,
                                                   [] if r.scores is not None else None, {}))
            lr.ids.extend(r.ids)
            if lr.weights is not None:
                lr.weights.extend(r.weights)
            if lr.scores is not None:
                lr.scores.extend(r.scores)
            for d, v in r.pred.items():
                lr.pred.setdefault(d, []).extend(v)
    return Pass("prefill", layers)
