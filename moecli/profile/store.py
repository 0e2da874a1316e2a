"""Host profiles on disk: <profiles dir>/<host>[-<model>].toml in the schema of moecli/profiles/README.md.

The profiles dir is per user (moecli.paths.profiles_dir: $MOECLI_PROFILES, else the platform's config dir), so
every command finds the same files from any directory; the reference hosts ship inside the package and are found
by name (`--profile hybrimoe-testbed`). Written atomically (a temp file in the same directory, fsync, os.replace, after checking that the text parses), so a
crash or a full disk never leaves a half profile that chat/bench would then trust. `find_profile` picks the newest
profile of THIS host (the reference profiles describe other machines), preferring one measured on the model.
"""
from __future__ import annotations

import datetime as _dt
import math
import os
import re
import socket
import sys
import tempfile
from pathlib import Path

from moecli.errors import MoecliError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

NO_PROFILE_MESSAGE = "no profile: run `moecli profile`; using safe defaults"


def no_profile_message() -> str:
    return NO_PROFILE_MESSAGE


def sanitize(name: str) -> str:
    """Lowercase [a-z0-9._-] only (hostnames and model names become file names)."""
    s = re.sub(r"[^a-z0-9._-]+", "-", name.lower()).strip("-.")
    return s or "host"


def host_name() -> str:
    return sanitize(socket.gethostname().split(".")[0])


def model_key(model: str | os.PathLike | None) -> str | None:
    """A file or model name -> the key used in profile names: 'Qwen3-30B-A3B-Q4_K_M.gguf' -> 'qwen3-30b-a3b-q4_k_m'."""
    if not model:
        return None
    p = Path(str(model))
    return sanitize(p.stem if p.suffix.lower() in (".gguf", ".toml") else p.name)


def profile_dirs() -> list[Path]:
    """Where profiles are looked for: this user's (written by `moecli profile`), then the package's references."""
    from moecli.paths import profiles_dir, reference_profiles_dir

    return [profiles_dir(), reference_profiles_dir()]


def default_path(model: str | None = None) -> Path:
    key = model_key(model)
    return profile_dirs()[0] / (f"{host_name()}-{key}.toml" if key else f"{host_name()}.toml")


def reference_names() -> list[str]:
    return sorted(f.stem for f in profile_dirs()[1].glob("*.toml"))


def resolve_profile(name: str | os.PathLike) -> Path:
    """A profile given by path, or by name: `hybrimoe-testbed` -> the user's or the package's `<name>.toml`."""
    path = Path(name).expanduser()
    if path.is_file():
        return path
    if path.suffix != ".toml" and len(path.parts) == 1:
        for d in profile_dirs():
            if (d / f"{path.name}.toml").is_file():
                return d / f"{path.name}.toml"
    mine = sorted(f.stem for f in profile_dirs()[0].glob("*.toml")) if profile_dirs()[0].is_dir() else []
    raise MoecliError(f"host profile not found: {name} (a TOML file, or a name: {', '.join(reference_names() + mine)}"
                      f"; `moecli profile` writes this host's to {profile_dirs()[0]})")


def find_profile(model: str | os.PathLike | None = None) -> Path | None:
    """The newest profile of this host: `<host>-<model>.toml` when `model` is given and one exists, else
    `<host>.toml` (or any `<host>-*.toml` when no model is asked for)."""
    host, key = host_name(), model_key(model)
    seen, exact, generic = set(), [], []
    for d in profile_dirs():
        if not d.is_dir():
            continue
        for f in d.glob(f"{host}*.toml"):
            r = f.resolve()
            if r in seen:
                continue
            seen.add(r)
            if key and f.stem == f"{host}-{key}":
                exact.append(f)
            elif f.stem == host or (not key and f.stem.startswith(host + "-")):
                generic.append(f)
    for group in (exact, generic):
        if group:
            return max(group, key=lambda f: f.stat().st_mtime)
    return None


# ---------------------------------------------------------------------------------------------------------------
# a small TOML writer (scalars, lists of scalars, tables, arrays of tables): enough for the profile schema


def _scalar(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        if math.isnan(v):
            return "nan"
        text = f"{v:.7g}"  # 7 significant digits: measurements carry fewer; keeps small ms values exact enough
        return text if any(c in text for c in ".en") else text + ".0"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_scalar(x) for x in v) + "]"
    raise MoecliError(f"cannot write {type(v).__name__} to a profile")


def _is_table_list(v) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(x, dict) for x in v)


def to_toml(data: dict, comments: dict[str, str] | None = None) -> str:
    """`comments`: table name -> a comment line written above it."""
    comments = comments or {}
    out: list[str] = []

    def emit(prefix: str, table: dict, array: bool = False):
        scalars = {k: v for k, v in table.items() if not isinstance(v, dict) and not _is_table_list(v)}
        implicit = not array and not scalars and bool(table)  # only sub-tables: TOML needs no header for it
        if prefix and not implicit:
            if prefix in comments and not array:
                out.append(f"# {comments[prefix]}")
            out.append(f"[[{prefix}]]" if array else f"[{prefix}]")
        for k, v in scalars.items():
            out.append(f"{k} = {_scalar(v)}")
        for k, v in table.items():
            name = f"{prefix}.{k}" if prefix else k
            if isinstance(v, dict):
                out.append("")
                emit(name, v)
            elif _is_table_list(v):
                if name in comments:
                    out.append("")
                    out.append(f"# {comments[name]}")
                for item in v:
                    out.append("")
                    emit(name, item, array=True)

    emit("", data)
    return "\n".join(out).lstrip("\n") + "\n"


def write_atomic(path: Path, text: str) -> Path:
    """Write `text` to `path` via a temp file + os.replace; the TOML is parsed first so a bad document never lands.
    On any error the temp file is removed and `path` is untouched."""
    path = Path(path)
    tomllib.loads(text)  # raises before anything touches the disk
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


# ---------------------------------------------------------------------------------------------------------------
# profile documents


def _fit_entry(f) -> dict:
    e = {"model": f.model, "quant": f.quant, "threads": f.threads, "a_ms": f.a_ms, "b_ms": f.b_ms,
         "first_ms": f.first_ms}
    if f.fit_error_pct is not None:
        e["fit_error_pct"] = round(f.fit_error_pct, 2)
    e["points"] = [[float(m), float(n), round(t, 4)] for m, n, t in f.points]  # (experts, tokens, ms)
    if f.errors:
        e["check_tokens"] = [c["tokens"] for c in f.errors]
        e["check_measured_ms"] = [round(c["measured_ms"], 4) for c in f.errors]
        e["check_predicted_ms"] = [round(c["predicted_ms"], 4) for c in f.errors]
    if f.pieces:
        e["pieces_first_ms"] = f.pieces_first_ms
        if f.piecewise_error_pct is not None:
            e["piecewise_error_pct"] = round(f.piecewise_error_pct, 2)
        e["pieces"] = [{"tokens_max": top, "a_ms": a, "b_ms": b} for top, a, b in f.pieces]
    return e


def _rates(f, bw: float) -> dict:
    """[cpu] mem_efficiency and gflops that reproduce fit f's b and a for any geometry of the same quant. A fit
    whose b or a came out 0 (tiny experts: all per-token, or all per-expert) gives the neutral value instead of a
    zero the cost model would divide by."""
    return {"mem_efficiency": round(f.stream_gbs / bw, 4) if f.stream_gbs > 0 and bw > 0 else 1.0,
            "gflops": round(f.gflops, 2) if f.gflops > 0 else 1e6}


def build_document(host, meas, model: str | None = None, plan=None) -> dict:
    """The profile for `host` (probe.HostInfo) from `meas` (microbench.Measurements), schema moecli/profiles/README.md.

    Derived figures are set so the cost model reproduces the measured rates for geometries without a fit:
    mem_efficiency = (expert bytes / b) / measured copy bandwidth, gflops = expert FLOPs / a. With no GPU the
    executor's "device" is the CPU itself, so [gpu] carries the CPU's measured rates (present = false) and
    [pcie] the memory copy rate: the cost model then charges dense work at CPU speed."""
    now = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()
    cpu = host.cpu
    fits = meas.runtime_fits()
    main = fits[0] if fits else None
    doc: dict = {"host": {
        "name": host_name() + (f"-{model_key(model)}" if model else ""),
        "hostname": host.hostname,
        "description": f"measured by `moecli profile` on {now}",
        "created": now,
        "os": host.os,
        "ram_gb": round(host.ram_total_bytes / 1e9, 2),
        "ram_available_gb": round(host.ram_available_bytes / 1e9, 2),
        "numa_nodes": len(host.numa) or 1,
    }}
    if model:
        doc["host"]["model"] = str(model)
    bw = meas.mem_bandwidth_gbs
    c = {"name": cpu.model, "cores": cpu.physical_cores, "threads": meas.runtime_threads,
         "logical_cores": cpu.logical_cores, "isa": cpu.isa, "mem_bandwidth_gbs": round(bw, 2)}
    if main:
        c.update(_rates(main, bw))
        c["first_expert_ms"] = main.first_ms
        quants = {f.quant: _rates(f, bw) for f in fits[1:] if f.quant != main.quant}
        if quants:
            c["quant"] = quants
    else:  # nothing measured for experts: a conservative default the executor also assumes
        c.update(mem_efficiency=0.6, gflops=100.0, first_expert_ms=0.05)
    c["fit"] = [_fit_entry(f) for f in fits]
    others = [_fit_entry(f) for f in meas.cpu if f.threads != meas.runtime_threads]
    if others:
        c["fit_other_threads"] = others
    doc["cpu"] = c
    gpu = host.gpu
    if gpu is not None and meas.gpu is not None and meas.pcie is not None:
        g, layer = meas.gpu, main
        nbytes = layer.expert_bytes if layer else 1
        flops = layer.expert_flops if layer else 1
        doc["gpu"] = {"present": True, "name": gpu.name, "memory_gb": round(gpu.total_bytes / 1e9, 2),
                      "free_gb": round(gpu.free_bytes / 1e9, 2), "compute_dtype": g.dtype,
                      # effective rates implied by the measured g0, g1 (launch costs folded into them)
                      "mem_bandwidth_gbs": round(nbytes / (g.g0_ms * 1e6), 2) if g.g0_ms > 0 else 1000.0,
                      "mem_efficiency": 1.0,
                      "tflops": round(flops / (g.g1_ms * 1e9), 3) if g.g1_ms > 0 else 100.0,
                      "launch_ms": 0.0,
                      "fit": [{"model": main.model if main else "", "quant": main.quant if main else "",
                               "g0_ms": g.g0_ms, "g1_ms": g.g1_ms,
                               "points": [[float(n), round(t, 4)] for n, t in g.points]}]}
        doc["pcie"] = {k: round(v, 4) for k, v in meas.pcie.items()}
    else:
        dev_gflops = max((f.gflops for f in fits), default=100.0) or 100.0
        doc["gpu"] = {"present": False, "name": "none (the executor's device is the CPU)", "memory_gb": 0.0,
                      "mem_bandwidth_gbs": round(bw, 2), "mem_efficiency": 1.0,
                      "tflops": round(dev_gflops / 1000, 4), "launch_ms": 0.0}
        doc["pcie"] = {"present": False, "h2d_pinned_gbs": round(bw / 2, 2), "h2d_pageable_gbs": round(bw / 2, 2),
                       "copy_latency_ms": 0.0}
    if plan is not None:
        doc["plan"] = {"ctx": plan.ctx, "threads": plan.threads, "device": plan.device,
                       "slots_per_layer": plan.slots_per_layer, "n_expert": plan.n_expert,
                       "llama_cpp_flags": plan.llama_flags, "llama_cpp_ot": plan.llama_ot}
        if plan.decode_tok_s is not None:
            doc["plan"]["decode_tok_s"] = round(plan.decode_tok_s, 3)
    return doc


COMMENTS = {
    "cpu": "measured: mem_bandwidth_gbs = numpy copy on all threads (read + write); mem_efficiency and gflops are "
           "what the fitted b and a imply",
    "cpu.fit": "measured CPU expert costs: ms = first_ms (once per layer) + a_ms * tokens + b_ms per expert; "
               "points = [experts, tokens, ms]",
    "cpu.fit_other_threads": "the same at other thread counts (informational: the cost model reads [[cpu.fit]])",
}


def write_profile(doc: dict, path: Path) -> Path:
    text = "# Host profile written by `moecli profile`. Schema: moecli/profiles/README.md\n" + to_toml(doc, COMMENTS)
    return write_atomic(path, text)


def safe_default_profile():
    """A HostProfile with the executor's safe defaults (`runtime.executor.default_costs`: 20 GB/s CPU streaming,
    100 GFLOPS, 500 GB/s device, 12 GB/s PCIe) for estimates when this host has no profile yet."""
    from moecli.policy.cost import HostProfile

    return HostProfile("safe-defaults", {
        "cpu": {"mem_bandwidth_gbs": 20.0, "mem_efficiency": 1.0, "gflops": 100.0, "first_expert_ms": 0.02},
        "gpu": {"mem_bandwidth_gbs": 500.0, "mem_efficiency": 1.0, "tflops": 20.0, "launch_ms": 0.01},
        "pcie": {"h2d_pinned_gbs": 12.0, "h2d_pageable_gbs": 6.0, "copy_latency_ms": 0.0}})
