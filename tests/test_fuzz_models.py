"""Fuzzing model files: mutated tiny GGUFs and Hugging Face directories through parser, loader and validation.

Every case runs in a worker subprocess, so a native abort (SIGABRT/SIGSEGV/SIGFPE through ctypes) or a hang is an
outcome like any other, never the end of the test run. A case passes when it loads and runs with finite logits
("ok") or fails with a MoecliError ("error"); anything else ("exception:<type>", "signal:<name>", "hang", "nan")
fails the property. Deep cases (those that load) also build the model, compute logits, decode every token id,
render the chat template and ask llama.cpp about every id; a sample also goes through the real CLI.

In the suite: a seeded Hypothesis run (MOECLI_FUZZ_CASES cases each for GGUF and safetensors, default 40; the first
of each kind also through `moecli chat -p`, MOECLI_FUZZ_CLI_RATE=0.05 sends a share of the others).
A campaign that counts outcome classes instead of stopping at the first failure:
    PYTHONPATH=$PWD python3 tests/test_fuzz_models.py --cases 300 [--seed 0] [--cli-rate 0.05] [--kind gguf|hf]
"""
from __future__ import annotations

import collections
import copy
import json
import math
import os
import random
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import hostile_gguf as H  # noqa: E402

CASE_TIMEOUT = float(os.environ.get("MOECLI_FUZZ_TIMEOUT", "30"))  # seconds one case may take before "hang"
GOOD = ("ok", "error")

# ------------------------------------------------------------------------------------------- GGUF mutations

_INTS = (0, 1, -1, 2, 3, 7, 31, 255, 1 << 16, (1 << 31) - 1, 1 << 31, (1 << 32) - 1, (1 << 63) - 1, 1 << 63)
_FLOATS = (0.0, -0.0, -1.0, 1e-30, 1e30, 3.0e38, math.nan, math.inf, -math.inf)
_STRINGS = ("", "llama", "gpt2", "bert", "x" * 3, "\u00ff\u20ac", "{{", "{% for %}")


def _int_value(rng, v):
    vtype = rng.choice((H.UINT32, H.INT32, H.UINT64, H.INT64, H.UINT8, H.INT16))
    lo, hi = {H.UINT8: (0, 255), H.INT16: (-(1 << 15), (1 << 15) - 1), H.UINT32: (0, (1 << 32) - 1),
              H.INT32: (-(1 << 31), (1 << 31) - 1), H.UINT64: (0, (1 << 64) - 1),
              H.INT64: (-(1 << 63), (1 << 63) - 1)}[vtype]
    return vtype, min(max(v, lo), hi)


def _hostile_value(rng, vtype, value):
    """A replacement for one metadata value: an edge of its own type, or a value of another type."""
    r = rng.random()
    if r < 0.15:  # wrong type
        return rng.choice([(H.STRING, rng.choice(_STRINGS)), (H.FLOAT32, rng.choice(_FLOATS)),
                           _int_value(rng, rng.choice(_INTS)), (H.BOOL, True),
                           (H.ARRAY, (H.UINT32, [1, 2, 3])), (H.ARRAY, (H.ARRAY, [(H.INT32, [1]), (H.INT32, [])])),
                           (H.ARRAY, (H.STRING, []))])
    if vtype in (H.FLOAT32, H.FLOAT64):
        return vtype, rng.choice(_FLOATS + (value * 2, -value))
    if vtype == H.STRING:
        if len(value) > 40 and rng.random() < 0.5:
            return vtype, value[:rng.randrange(len(value))]  # a template cut short
        return vtype, rng.choice(_STRINGS)
    if vtype == H.BOOL:
        return vtype, not value
    if vtype == H.ARRAY:
        sub, items = value
        k = rng.random()
        if k < 0.4:
            return vtype, (sub, items[:rng.choice((0, 1, 2, len(items) // 2, len(items) - 1))])
        if k < 0.6:
            return vtype, (sub, items + items[:rng.randrange(1, 50)])
        if k < 0.8 and items and sub != H.STRING:
            i = rng.randrange(len(items))
            items = list(items)
            items[i] = _int_value(rng, rng.choice(_INTS))[1] if sub not in (H.FLOAT32, H.FLOAT64) else math.nan
            try:
                struct.pack(H._FMT.get(sub, "<q"), items[i])
            except (struct.error, OverflowError):
                items[i] = 0
            return vtype, (sub, items)
        depth = rng.choice((1, 2, 40, 200))  # nested arrays, deep enough to hit a recursion limit
        v = (H.INT32, [1, 2])
        for _ in range(depth):
            v = (H.ARRAY, [v])
        return vtype, v
    return _int_value(rng, rng.choice(_INTS + (value + 1, value - 1, value * 2, value // 2)))


def _mutate_structure(rng, g: H.RawGGUF) -> str:
    r = rng.random()
    arch = g.arch
    if r < 0.45:
        i = rng.randrange(len(g.kv))
        key, vtype, value = g.kv[i]
        if rng.random() < 0.1:
            g.kv.pop(i)
            return f"drop {key}"
        nt, nv = _hostile_value(rng, vtype, value)
        g.kv[i] = (key, nt, nv)
        return f"set {key}"
    if r < 0.55:  # keys the loader reads that the base file may lack
        key = rng.choice([f"{arch}.rope.dimension_count", f"{arch}.expert_feed_forward_length", "general.alignment",
                          f"{arch}.attention.layer_norm_rms_epsilon", f"{arch}.attention.head_count_kv",
                          f"{arch}.rope.scaling.type", f"{arch}.rope.scaling.factor", "tokenizer.ggml.unknown_token_id",
                          "tokenizer.ggml.eot_token_id", f"{arch}.expert_shared_count"])
        nt, nv = _hostile_value(rng, H.UINT32, 64)
        g.set(key, nt, nv)
        return f"add {key}"
    if r < 0.85:
        t = rng.choice(g.tensors)
        k = rng.randrange(7)
        if k == 0:
            t.ne = [rng.choice((0, 1, 3, 64, 65, 1 << 32))] + t.ne[1:] if rng.random() < 0.5 else t.ne[:-1] or [0]
        elif k == 1:
            t.ne = t.ne + [rng.choice((1, 2))] if len(t.ne) < 4 else t.ne[:1]
        elif k == 2:
            t.type = rng.choice((1, 2, 8, 12, 30, 39, 99))
        elif k == 3:
            t.offset = max(0, t.offset + rng.choice((-4096, -32, -1, 1, 31, 32, 4096, 1 << 40)))
        elif k == 4:
            t.name = rng.choice(g.tensors).name  # a duplicate
        elif k == 5:
            t.name = t.name.replace("blk.1.", "blk.9.") if "blk.1." in t.name else t.name + "x"
        else:
            g.tensors.remove(t)
            return f"remove tensor {t.name}"
        return f"tensor {t.name} edit {k}"
    if r < 0.95:
        d = rng.choice((-1, 1, -2, 1 << 20))
        if rng.random() < 0.6:
            g.n_tensors = max(0, len(g.tensors) + d)
            return f"n_tensors {d:+d}"
        g.n_kv = max(0, len(g.kv) + d)
        return f"n_kv {d:+d}"
    g.set("general.alignment", H.UINT32, rng.choice((0, 1, 3, 16, 24, 64, 4096, 1 << 31)))
    return "alignment"


def _mutate_bytes(rng, raw: bytes, header_len: int) -> tuple[str, bytes]:
    b = bytearray(raw)
    r = rng.random()
    if r < 0.4:
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(header_len)
            b[i] ^= 1 << rng.randrange(8)
        return "bit flips", bytes(b)
    if r < 0.7:
        i = rng.randrange(8, header_len - 8)
        b[i:i + 8] = struct.pack("<Q", rng.choice(_INTS + (rng.getrandbits(64),)) & ((1 << 64) - 1))
        return "overwrite u64", bytes(b)
    cut = rng.choice((rng.randrange(header_len), rng.randrange(len(b))))
    return "truncate", bytes(b[:cut])


def gguf_case(rng, base: H.RawGGUF) -> tuple[str, bytes]:
    g = copy.deepcopy(base)
    notes = [_mutate_structure(rng, g) for _ in range(rng.choice((1, 1, 1, 1, 1, 2, 3)))]
    raw = g.to_bytes()
    if rng.random() < 0.2:
        note, raw = _mutate_bytes(rng, raw, len(raw) - len(g.data))
        notes.append(note)
    return "; ".join(notes), raw


# ------------------------------------------------------------------------------------------- safetensors mutations

_JSON_VALUES = (0, 1, -1, 2, 1 << 31, 1 << 62, 1.5, -0.0, "8", "", None, True, [], [1], {}, {"a": 1}, 1e300)


def _mutate_header(rng, header: dict) -> str:
    names = [k for k in header if k != "__metadata__"]
    name = rng.choice(names)
    info = header[name]
    k = rng.randrange(8)
    if k == 0:
        info["dtype"] = rng.choice(("F64", "I64", "bf16", 7, None, "F16", "U8"))
    elif k == 1:
        info["shape"] = rng.choice(([], [0], [-1, 64], ["64", 64], [64], [1 << 40, 1 << 40], 64, None, [2.5, 64]))
    elif k == 2:
        info["data_offsets"] = rng.choice(([0], [0, 1, 2], [-8, 0], ["0", "64"], None, 5, [10, 0], [0, 1 << 60]))
    elif k == 3:  # overlap another tensor
        other = header[rng.choice(names)]
        if isinstance(other, dict):
            info["data_offsets"] = other.get("data_offsets")
    elif k == 4:
        header[name] = rng.choice(([1, 2], "x", 3, None))
    elif k == 5:
        header["__metadata__"] = rng.choice(([1], "x", {"format": 1}))
    elif k == 6:
        del header[name]
        return f"drop {name}"
    else:
        header[name + ".extra"] = dict(info) if isinstance(info, dict) else info
    return f"header {name} edit {k}"


def hf_case(rng, base_dir: Path, case_dir: Path) -> str:
    shutil.copytree(base_dir, case_dir)
    notes = []
    for _ in range(rng.choice((1, 1, 2))):
        r = rng.random()
        shard = case_dir / "model.safetensors"
        if shard.is_fifo():
            break  # an earlier mutation of this case made it a FIFO: nothing more to edit
        if r < 0.45:
            raw = shard.read_bytes()
            (n,) = struct.unpack("<Q", raw[:8])
            try:
                header = json.loads(raw[8:8 + n])
            except ValueError:  # a previous mutation of this case broke it already
                continue
            if not isinstance(header, dict):
                continue
            if rng.random() < 0.1:
                header = rng.choice(([header], "header", 42))
                notes.append("header not an object")
            else:
                notes.append(_mutate_header(rng, header))
            new = json.dumps(header).encode()
            new += b" " * (-len(new) % 8)
            blob = raw[8 + n:]
            if rng.random() < 0.15:
                notes.append("header length")
                head = struct.pack("<Q", rng.choice((0, 1, len(new) - 1, len(new) + 1, 1 << 63)))
            else:
                head = struct.pack("<Q", len(new))
            shard.write_bytes(head + new + blob)
        elif r < 0.85:
            path = case_dir / "config.json"
            cfg = json.loads(path.read_text())
            key = rng.choice(sorted(cfg))
            if rng.random() < 0.1:
                del cfg[key]
                notes.append(f"drop {key}")
            else:
                cfg[key] = rng.choice(_JSON_VALUES)
                notes.append(f"config {key}={cfg[key]!r}")
            if rng.random() < 0.03:
                cfg = [cfg]
                notes.append("config not an object")
            path.write_text(json.dumps(cfg))
        elif r < 0.95:
            name = rng.choice(("tokenizer.json", "tokenizer_config.json"))
            path = case_dir / name
            text = path.read_text()
            path.write_text(rng.choice((text[:rng.randrange(len(text))], "[]", "{}", '{"model": 1}', "\0\1")))
            notes.append(f"garbage {name}")
        else:
            (case_dir / "model.safetensors").unlink()
            os.mkfifo(case_dir / "model.safetensors")
            notes.append("FIFO shard")
    return "; ".join(notes)


# ------------------------------------------------------------------------------------------- the worker

def _run_case(path: str, deep: bool) -> str:
    """In the worker: what loading `path` gives. Raises whatever the code under test raises."""
    import numpy as np

    from moecli.cli.pull import summarize
    from moecli.models.loader import load_checkpoint

    summarize(load_checkpoint(path))  # what `moecli show` prints
    if not deep:
        return "ok"
    import moecli

    m = moecli.load(path, n_ctx=64)
    ids = m.tokenize("Hello, world!") or [0]
    logits = m.logits(ids)
    if not np.isfinite(logits).all():
        return "nan"
    n = m.config.n_vocab
    m.detokenize(list(range(n)))  # sampling may pick any row, padding rows included
    for t in range(n):
        m.tokenizer.is_eog(t)
    m.chat_prompt([{"role": "user", "content": "hi"}])
    return "ok"


def worker() -> None:
    from moecli.errors import MoecliError

    # results go to a private copy of stdout: whatever the code under test prints (llama.cpp logs) goes to stderr
    results = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    for line in sys.stdin:
        req = json.loads(line)
        try:
            outcome = _run_case(req["path"], req["deep"])
        except MoecliError:
            outcome = "error"
        except RecursionError:
            outcome = "exception:RecursionError"
        except Exception as e:  # noqa: BLE001 - the class is the finding
            outcome = f"exception:{type(e).__name__}"
        results.write(json.dumps({"outcome": outcome}) + "\n")
        results.flush()


class Worker:
    """A long-lived subprocess running cases; restarted after a case kills it or hangs."""

    def __init__(self):
        self.proc = None

    def _start(self):
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parent.parent),
                                                           os.environ.get("PYTHONPATH", "")]))
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)

    def run(self, path: Path, deep: bool, timeout: float = CASE_TIMEOUT) -> str:
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        self.proc.stdin.write(json.dumps({"path": str(path), "deep": deep}) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if line:
            return json.loads(line)["outcome"]
        if not ready:
            self.close()
            return "hang"
        rc = self.proc.wait()
        self.proc = None
        return f"signal:{signal.Signals(-rc).name}" if rc < 0 else f"exit:{rc}"

    def close(self):
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


def cli_outcome(args: list[str], timeout: float = 120) -> str:
    """The real CLI on a case: ok, error (one `error:` line), exception (a traceback or an internal error)..."""
    try:
        p = subprocess.run([sys.executable, "-m", "moecli", *args], capture_output=True, text=True,
                           timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return "cli:hang"
    if p.returncode < 0:
        return f"cli:signal:{signal.Signals(-p.returncode).name}"
    if "Traceback" in p.stderr or "internal error" in p.stderr:
        return "cli:exception"
    if p.returncode == 0:
        return "ok"
    return "error" if sum(l.startswith("error:") for l in p.stderr.splitlines()) == 1 else "cli:unclear"


# ------------------------------------------------------------------------------------------- driving

class Fuzzer:
    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.base = H.RawGGUF.read(H.base_gguf(workdir))
        self._hf = None
        self.worker = Worker()
        self.counts: collections.Counter = collections.Counter()
        self.findings: list[tuple[str, str, str]] = []  # (outcome, kind, description)
        self.n = 0

    def case(self, rng, kind: str, cli_rate: float = 0.0) -> tuple[str, str]:
        self.n += 1
        deep = rng.random() < 0.35
        cli = rng.random() < cli_rate
        if kind == "gguf":
            desc, raw = gguf_case(rng, self.base)
            path = self.workdir / f"case-{self.n}.gguf"
            path.write_bytes(raw)
        else:
            if self._hf is None:
                self._hf = H.base_hf(self.workdir)
            path = self.workdir / f"case-{self.n}"
            desc = hf_case(rng, self._hf, path)
        try:
            outcome = self.worker.run(path, deep)
            if cli and outcome in GOOD:
                outcome = cli_outcome(["chat", str(path), "-p", "hi", "-n", "4", "-c", "64"])
        finally:
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        self.counts[outcome] += 1
        if outcome not in GOOD:
            self.findings.append((outcome, kind, desc))
        return outcome, desc

    def close(self):
        self.worker.close()


# ------------------------------------------------------------------------------------------- the suite's property

try:
    import pytest
    from hypothesis import HealthCheck, Phase, given, settings, strategies as st
except ImportError:  # the campaign runs without pytest
    pytest = None

if pytest is not None:
    N_CASES = int(os.environ.get("MOECLI_FUZZ_CASES", "40"))
    CLI_RATE = float(os.environ.get("MOECLI_FUZZ_CLI_RATE", "0"))

    @pytest.fixture(scope="module")
    def fuzzer(tmp_path_factory):
        f = Fuzzer(tmp_path_factory.mktemp("fuzz"))
        yield f
        f.close()
        print(f"\nfuzz outcome classes: {dict(f.counts)}")

    @pytest.mark.parametrize("kind", ["gguf", "hf"])
    def test_mutated_models_fail_cleanly(fuzzer, kind):
        # no shrinking: a case is one draw of a Random, and the failure message describes its mutations
        @settings(max_examples=N_CASES, derandomize=True, deadline=None, database=None,
                  phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
        @given(st.randoms(use_true_random=False))
        def prop(rng):
            # the first case of each kind also runs through the real command line (`chat -p`), more by env var
            outcome, desc = fuzzer.case(rng, kind, cli_rate=1.0 if fuzzer.n == first else CLI_RATE)
            assert outcome in GOOD, f"{kind} case ({desc}): {outcome}"

        first = fuzzer.n
        prop()


def campaign(n: int, seed: int, kinds: list[str], cli_rate: float) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="moecli-fuzz-"))
    f = Fuzzer(workdir)
    t0 = time.time()
    try:
        for kind in kinds:
            for i in range(n):
                f.case(random.Random(f"{seed}-{kind}-{i}"), kind, cli_rate)
            print(f"after {kind}: {f.n} cases, {dict(f.counts)}", file=sys.stderr, flush=True)
    finally:
        f.close()
        shutil.rmtree(workdir, ignore_errors=True)
    by_desc = collections.Counter((o, k, d.split(" edit")[0]) for o, k, d in f.findings)
    return {"cases": f.n, "seconds": round(time.time() - t0), "outcomes": dict(f.counts),
            "findings": [f"{o} {k}: {d} (x{c})" for (o, k, d), c in by_desc.most_common()]}


if __name__ == "__main__":
    if sys.argv[1:] == ["--worker"]:
        worker()
        sys.exit(0)
    import argparse

    ap = argparse.ArgumentParser(description="Fuzz moecli's model loading; prints outcome counts as JSON.")
    ap.add_argument("--cases", type=int, default=300, help="cases per kind")
    ap.add_argument("--seed", default="0")
    ap.add_argument("--kind", choices=("gguf", "hf", "both"), default="both")
    ap.add_argument("--cli-rate", type=float, default=0.05, help="share of cases also run through `moecli chat -p`")
    a = ap.parse_args()
    print(json.dumps(campaign(a.cases, a.seed, ["gguf", "hf"] if a.kind == "both" else [a.kind], a.cli_rate),
          indent=1))
