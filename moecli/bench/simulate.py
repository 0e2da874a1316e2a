"""`moecli bench --simulate`: sweep placements x cache ratios over a routing trace with a host profile.

Evaluation split (so static hot sets never see the evaluated tokens): with several sequences the last one is the
calibration set and the others are evaluated; with one, its first `calib_frac` decode steps calibrate and the rest
are evaluated. Prefill uses the trace's prefill pass when there is one, else the evaluated sequence's decode tokens
batched into one pass (a stand-in prompt). Every cache starts from the calibration hot set.

`routing` (comma-separated modes) for the layers a trace marks known-early (SmallThinker: the router reads the layer
input): "both" (the default: the decision core's certain prefetch before their attention, and predictions from
earlier layers as for any layer), "known" (the certain prefetch only) or "predicted" (the mark ignored). Each
prefetching placement runs once per mode, the first mode under its plain name, the others as NAME/both,
NAME/known, NAME/pred. Prefetch accuracy: the share of prefetched experts their target layer then used.
"""
from __future__ import annotations

from pathlib import Path

from moecli.errors import MoecliError
from moecli.policy.cost import build_cost_model, load_profile
from moecli.policy.geometry import get_geometry
from moecli.policy.placement import DEFAULT_POLICIES, ONLINE_BASELINES, get_placement
from moecli.policy.schedule import GreedyScheduler, OptimalScheduler
from moecli.sim.simulate import Simulator, cache_study, calibration_counts
from moecli.sim.traces import prefill_from_decode, read_trace


def parse_ratios(text: str) -> list[float]:
    out = []
    for part in str(text).split(","):
        try:
            r = float(part)
        except ValueError:
            raise MoecliError(f"bad cache ratio {part!r}: expected numbers in [0, 1] like 0.25,0.5") from None
        if not 0.0 <= r <= 1.0:
            raise MoecliError(f"bad cache ratio {r}: must be within [0, 1]")
        out.append(r)
    if not out:
        raise MoecliError("no cache ratio given")
    return out


def split_trace(trace, calib_frac: float = 0.3, max_decode: int | None = None):
    """(calibration passes, evaluated decode passes, prefill pass)."""
    seqs = trace.sequences
    if len(seqs) >= 2:
        calib = [ps for s in seqs[-1:] for ps in s.passes]
        evald = [ps for s in seqs[:-1] for ps in s.passes]
    else:
        ps = seqs[0].passes
        dec = [p for p in ps if p.kind == "decode"]
        n = max(1, int(len(dec) * calib_frac))
        calib, evald = dec[:n], dec[n:]
        evald = [p for p in ps if p.kind == "prefill"] + evald
    prefill = [p for p in evald if p.kind == "prefill"]
    decode = [p for p in evald if p.kind == "decode"]
    if max_decode:
        decode = decode[:max_decode]
    pre = prefill[0] if prefill else prefill_from_decode(decode)
    return calib, decode, pre


def _scheduler_gap(records, costs) -> dict:
    g, x = GreedyScheduler(), OptimalScheduler()
    gaps = []
    for tok, cached, t0, c0, u0, ready in records:
        a = g.plan(0, tok, cached, costs, t0, c0, u0, ready).makespan - u0
        b = x.plan(0, tok, cached, costs, t0, c0, u0, ready).makespan - u0
        gaps.append((a - b) / b if b > 0 else 0.0)
    if not gaps:
        return {"n": 0}
    return {"n": len(gaps), "mean_pct": 100 * sum(gaps) / len(gaps), "max_pct": 100 * max(gaps),
            "min_pct": 100 * min(gaps), "worse_exact": sum(1 for v in gaps if v < -1e-9)}


def run_sweep(trace_path: str | Path, profile_path: str | Path, geometry: str, ratios: list[float],
              policies: list[str] | None = None, quant: str | None = None, predictor_accuracy: float = 0.9,
              max_decode: int | None = None, prefill: bool = True, routing: str = "both") -> dict:
    geom = get_geometry(geometry)
    profile = load_profile(profile_path)
    trace = read_trace(trace_path)
    if trace.n_experts != geom.n_experts:
        raise MoecliError(f"trace has {trace.n_experts} experts per layer, geometry {geom.name} has {geom.n_experts}")
    costs = build_cost_model(profile, geom, quant)
    modes = parse_routing(routing)
    pls = [get_placement(p) for p in (policies or DEFAULT_POLICIES)]
    known = trace.known_early
    runs = []  # (row name, placement, Simulator keywords)
    for pl in pls:
        for i, mode in enumerate(modes if pl.prefetch and known else modes[:1]):
            kw = {"known": () if mode == "predicted" else known, "routing": "known" if mode == "known" else "both"}
            runs.append((pl.name if i == 0 else f"{pl.name}/{ROUTING_SUFFIX[mode]}", pl, kw))
    calib, decode, pre = split_trace(trace, max_decode=max_decode)
    counts = calibration_counts(calib)
    L = trace.layers
    out: dict = {
        "trace": str(trace_path), "profile": profile.name, "model_geometry": geom.name,
        "quant": (quant or geom.default_quant).upper(), "layers_simulated": len(L),
        "decode_tokens": len(decode), "prefill_tokens": pre.n_tokens, "calibration_passes": len(calib),
        "full_router_scores": trace.full_scores, "trace_predictions": trace.has_predictions,
        "predictor_accuracy": predictor_accuracy, "known_early_layers": len(known), "routing": ",".join(modes),
        "costs_ms": {"cpu_a": costs.cpu_a, "cpu_b": costs.cpu_b, "cpu_first": costs.cpu_first,
                     "dev_g0": costs.dev_g0, "dev_g1": costs.dev_g1, "copy": costs.copy_ms,
                     "dense_fixed": costs.dense_fixed, "head": costs.head_ms},
        "expert_bytes": costs.expert_bytes, "gpu_memory_gb": profile.section("gpu").get("memory_gb"),
        "results": {}, "cache_study": {}, "scheduler_gap": {},
    }
    for ratio in ratios:
        slots = round(ratio * geom.n_experts)
        key = f"{ratio:g}"
        out.setdefault("device_cache_gb", {})[key] = slots * geom.n_layers * costs.expert_bytes / 1e9
        row = out["results"][key] = {}
        init = {l: [e for e, _ in sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))[:slots]]
                for l, c in counts.items()}
        out["cache_study"][key] = cache_study(decode, L, geom.n_experts, slots, init)
        for name, pl, kw in runs:
            sim = Simulator(pl, costs, L, geom.n_experts, slots, counts, predictor_accuracy,
                            record=name == "hybrimoe", **kw)
            d = sim.run(decode)
            entry = {"tbt_ms": d.mean_ms, "hit_rate": d.hit_rate, "copied_bytes": d.copied_bytes,
                     "copied_bytes_per_token": d.copied_bytes / max(1, len(decode)),
                     "prefetch_copies": d.prefetch_copies, "prefetch_accuracy": d.prefetch_accuracy(),
                     "known_prefetch_copies": sum(v[1] for (_, src), v in d.prefetch_judged.items() if src == "known"),
                     "cpu_share": d.cpu_share, "decision_us_decode": d.decision_us, "prefetch_us_decode": d.prefetch_us}
            if prefill:
                sim = Simulator(pl, costs, L, geom.n_experts, slots, counts, predictor_accuracy,
                                record=name == "hybrimoe", **kw)
                pr = sim.run([pre])
                entry.update({"ttft_ms": pr.mean_ms, "prefill_hit_rate": pr.hit_rate,
                              "prefill_copied_bytes": pr.copied_bytes, "prefill_cpu_share": pr.cpu_share,
                              "decision_us_prefill": pr.decision_us, "prefetch_us_prefill": pr.prefetch_us})
                if name == "hybrimoe":
                    out["scheduler_gap"].setdefault(key, {})["prefill"] = _scheduler_gap(pr.records, costs)
            if name == "hybrimoe":
                out["scheduler_gap"].setdefault(key, {})["decode"] = _scheduler_gap(d.records, costs)
            row[name] = entry
    out["summary"] = summarize(out)
    return out


def summarize(out: dict) -> dict:
    """Speedups of hybrimoe, its distance to oracle, and how much of the best-baseline→oracle gap each
    mechanism closes (ablation)."""
    s = {}
    for key, row in out["results"].items():
        if "hybrimoe" not in row:
            continue
        h = row["hybrimoe"]
        d = {}
        for metric in ("tbt_ms", "ttft_ms"):
            if metric not in h:
                continue
            base = {b: row[b][metric] for b in ONLINE_BASELINES if b in row}
            m = {}
            for b, v in base.items():
                m[f"speedup_vs_{b}"] = v / h[metric] if h[metric] else None
            if base:
                best_b = min(base, key=base.get)
                m["best_baseline"] = best_b
                m["hybrimoe_fastest_online"] = h[metric] <= base[best_b] + 1e-9
                if "oracle" in row:
                    o = row["oracle"][metric]
                    m["oracle_over_hybrimoe"] = h[metric] / o if o else None
                    gap = base[best_b] - o
                    for ab in ("hybrimoe-sched", "hybrimoe-prefetch", "hybrimoe-cache", "hybrimoe"):
                        if ab in row and gap > 0:
                            m[f"gap_closed_by_{ab}"] = (base[best_b] - row[ab][metric]) / gap
            d[metric] = m
        s[key] = d
    return s


FORMATS = ("table", "md", "csv", "json")
ROUTING_SUFFIX = {"both": "both", "known": "known", "predicted": "pred"}


def parse_routing(text: str) -> list[str]:
    modes = [m.strip() for m in str(text).split(",") if m.strip()]
    bad = [m for m in modes if m not in ROUTING_SUFFIX]
    if bad or not modes or len(set(modes)) != len(modes):
        raise MoecliError(f"bad --routing {text!r}: one or more of {', '.join(ROUTING_SUFFIX)}, each once")
    return modes
WIDTH = 80
POLICY_WIDTH = 17  # the longest placement name (hybrimoe-prefetch)


def default_trace(say) -> Path:
    """The newest trace in the user's traces directory (moecli.paths.traces_dir), said in one line; without one,
    an error that says how to record one."""
    from moecli.paths import traces_dir

    d = traces_dir()
    found = sorted(d.glob("*.jsonl"), key=lambda f: f.stat().st_mtime) if d.is_dir() else []
    if not found:
        raise MoecliError(f"no --trace given and no trace in {d}: record one with `moecli chat MODEL --placement "
                          f"hybrimoe --record-trace {d}/NAME.jsonl`, or pass --trace FILE")
    say(f"trace: {found[-1]} (the newest in {d}; --trace FILE picks another)")
    return found[-1]


def coverage_warnings(out: dict, geometry) -> list[str]:
    """A trace of some layers predicts the time of those layers only: say so, loud enough to be read."""
    n, total = out["layers_simulated"], geometry.n_layers
    if n >= total:
        return []
    return [f"warning: the trace covers {n} of the {total} MoE layers of {geometry.name}: the times below are for "
            f"those {n} layers only, not a whole model (a whole-model trace: `moecli chat --record-trace`)"]


def _rows(out: dict) -> list[dict]:
    """One flat row per (cache ratio, policy)."""
    rows = []
    for key, row in out["results"].items():
        for name, e in row.items():
            rows.append({"cache_ratio": float(key), "policy": name, "tbt_ms": e["tbt_ms"],
                         "tok_s": 1000 / e["tbt_ms"] if e["tbt_ms"] else None, "ttft_ms": e.get("ttft_ms"),
                         "hit_rate": e["hit_rate"], "prefetch_accuracy": e.get("prefetch_accuracy"),
                         "mb_per_token": e["copied_bytes_per_token"] / 1e6,
                         "cpu_share": e["cpu_share"], "decision_us": e["decision_us_decode"],
                         "prefetch_us": e["prefetch_us_decode"]})
    return rows


def _num(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def _pct(v, fmt: str) -> str:
    return "-" if v is None else format(100 * v, fmt)


def render(out: dict, fmt: str) -> str:
    """The sweep as text: `table` (compact, within 80 columns), `md` (markdown), `csv` or `json`."""
    if fmt == "json":
        import json

        return json.dumps(out, indent=1) + "\n"
    if fmt == "csv":
        import csv
        import io

        buf = io.StringIO()
        rows = _rows(out)
        w = csv.DictWriter(buf, list(rows[0]) if rows else ["cache_ratio", "policy"], lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
        return buf.getvalue()
    if fmt == "md":
        head = ["cache ratio", "policy", "TBT ms", "tok/s", "TTFT ms", "hit %", "prefetch acc %", "MB/token", "CPU %",
                "µs/decision"]
        lines = [_header(out), "", "| " + " | ".join(head) + " |",
                 "| " + " | ".join("---" if h == "policy" else "---:" for h in head) + " |"]
        for r in _rows(out):
            lines.append("| " + " | ".join([
                f"{r['cache_ratio']:g}", r["policy"], f"{r['tbt_ms']:.2f}", _num(r["tok_s"], ".1f"),
                _num(r["ttft_ms"], ".1f"), f"{100 * r['hit_rate']:.1f}", _pct(r["prefetch_accuracy"], ".1f"),
                f"{r['mb_per_token']:.1f}",
                f"{100 * r['cpu_share']:.0f}", f"{r['decision_us']:.0f}"]) + " |")
        return "\n".join(lines + [""] + summary_lines(out)) + "\n"
    return "\n".join([*_wrap(_header(out)), ""] + compact_table(out) + [""] + summary_lines(out)) + "\n"


def _header(out: dict) -> str:
    c = out["costs_ms"]
    return (f"{out['model_geometry']} {out['quant']} on {out['profile']}: expert {out['expert_bytes'] / 1e6:.1f} MB, "
            f"CPU {c['cpu_a']:.3f}·n+{c['cpu_b']:.3f} ms, device {c['dev_g0']:.3f}+{c['dev_g1']:.4f}·n ms, copy "
            f"{c['copy']:.2f} ms; {out['layers_simulated']} layers, {out['decode_tokens']} decode tokens, prefill "
            f"{out['prefill_tokens']} tokens" + (f"; {out['known_early_layers']} layers routed early, "
                                                 f"routing {out['routing']}" if out.get("known_early_layers") else ""))


def _wrap(text: str) -> list[str]:
    import textwrap

    return textwrap.wrap(text, WIDTH)


def compact_table(out: dict) -> list[str]:
    """Policies down, cache ratios across, for decode time per token, prefill time and hit rate; a metric block
    per table when all of them would not fit in 80 columns."""
    keys = list(out["results"])
    policies = list(dict.fromkeys(p for row in out["results"].values() for p in row))
    metrics = [("TBT ms", lambda e: _num(e["tbt_ms"], ".2f"), 6),
               ("TTFT ms", lambda e: _num(e.get("ttft_ms"), ".0f"), 6),
               ("hit %", lambda e: f"{100 * e['hit_rate']:.0f}", 4)]
    if any(e.get("prefetch_accuracy") is not None for row in out["results"].values() for e in row.values()):
        metrics.append(("prefetch acc %", lambda e: _pct(e.get("prefetch_accuracy"), ".0f"), 4))
    pw = max([POLICY_WIDTH] + [len(p) for p in policies])
    blocks, block, width = [], [], pw
    for m in metrics:
        need = len(keys) * (m[2] + 1)
        if block and width + need > WIDTH:
            blocks.append(block)
            block, width = [], pw
        block.append(m)
        width += need
    blocks.append(block)
    lines = []
    for block in blocks:
        top = " " * pw + "".join(f" {name:<{w * len(keys) + len(keys) - 1}}" for name, _, w in block)
        sub = f"{'policy / cache':<{pw}}" + "".join(
            f" {f'{float(k):.0%}':>{w}}" for _, _, w in block for k in keys)
        lines += [top.rstrip(), sub]
        for p in policies:
            cells = "".join(f" {(fn(out['results'][k][p]) if p in out['results'][k] else '-'):>{w}}"
                            for _, fn, w in block for k in keys)
            lines.append(f"{p:<{pw}}{cells}")
        lines.append("")
    return lines[:-1]


def summary_lines(out: dict) -> list[str]:
    """Per cache ratio: HybriMoE's speedups over the baselines and its distance to the oracle, in a few lines."""
    lines = []
    for key, sm in out["summary"].items():
        for metric, m in sm.items():
            what = "decode" if metric == "tbt_ms" else "prefill"
            sp = ", ".join(f"{k[11:]} {v:.2f}x" for k, v in m.items() if k.startswith("speedup_vs_") and v)
            oracle = m.get("oracle_over_hybrimoe")
            tail = f"; the oracle is {oracle:.2f}x faster" if oracle else ""
            lines += _wrap(f"{float(key):.0%} cache, {what}: hybrimoe vs {sp}{tail}")
    cs = [f"{float(k):.0%}: " + ", ".join(f"{n} {100 * v:.0f}%" for n, v in study.items())
          for k, study in out["cache_study"].items() if study]
    if cs:
        lines += _wrap("hit rate of each cache policy alone (every miss admitted): " + "; ".join(cs))
    return lines
