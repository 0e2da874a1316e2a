"""GGUF files as an attacker writes them: a raw reader/writer that keeps every field editable (types, counts,
offsets, nested arrays), so tests can build files that gguf-py's writer refuses to produce.

`RawGGUF.read(path)` -> editable structure; `.to_bytes()` writes it back byte-identical when nothing changed.
Metadata values are `(vtype, value)`; an array is `(ARRAY, (subtype, [items]))`, items of a nested array being
`(subtype, [items])` pairs themselves.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY, UINT64, INT64, FLOAT64 = range(13)
_FMT = {UINT8: "<B", INT8: "<b", UINT16: "<H", INT16: "<h", UINT32: "<I", INT32: "<i", FLOAT32: "<f",
        BOOL: "<?", UINT64: "<Q", INT64: "<q", FLOAT64: "<d"}


@dataclass
class TensorInfo:
    name: str
    ne: list[int]
    type: int
    offset: int


@dataclass
class RawGGUF:
    version: int = 3
    kv: list[tuple[str, int, object]] = field(default_factory=list)  # (key, vtype, value)
    tensors: list[TensorInfo] = field(default_factory=list)
    data: bytes = b""
    n_tensors: int | None = None  # None: len(tensors); set to lie about the count
    n_kv: int | None = None
    alignment: int = 32  # where the data section starts (general.alignment itself is a kv entry)

    # ------------------------------------------------------------------ reading
    @classmethod
    def read(cls, path) -> "RawGGUF":
        buf = Path(path).read_bytes()
        pos = 4
        version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, pos)
        pos += 20

        def string():
            nonlocal pos
            (n,) = struct.unpack_from("<Q", buf, pos)
            s = buf[pos + 8:pos + 8 + n].decode()
            pos += 8 + n
            return s

        def value(vtype):
            nonlocal pos
            if vtype == STRING:
                return string()
            if vtype == ARRAY:
                sub, count = struct.unpack_from("<IQ", buf, pos)
                pos += 12
                return sub, [value(sub) for _ in range(count)]
            (v,) = struct.unpack_from(_FMT[vtype], buf, pos)
            pos += struct.calcsize(_FMT[vtype])
            return v

        g = cls(version=version)
        for _ in range(n_kv):
            key = string()
            (vtype,) = struct.unpack_from("<I", buf, pos)
            pos += 4
            g.kv.append((key, vtype, value(vtype)))
        for _ in range(n_tensors):
            name = string()
            (n_dims,) = struct.unpack_from("<I", buf, pos)
            ne = list(struct.unpack_from(f"<{n_dims}Q", buf, pos + 4))
            ttype, offset = struct.unpack_from("<IQ", buf, pos + 4 + 8 * n_dims)
            pos += 4 + 8 * n_dims + 12
            g.tensors.append(TensorInfo(name, ne, ttype, offset))
        g.alignment = g.get("general.alignment", 32)
        start = (pos + g.alignment - 1) // g.alignment * g.alignment
        g.data = buf[start:]
        return g

    # ------------------------------------------------------------------ editing
    def get(self, key, default=None):
        return next((v for k, _, v in self.kv if k == key), default)

    def set(self, key: str, vtype: int, value) -> "RawGGUF":
        """Replace (or append) one metadata entry, keeping its position."""
        for i, (k, _, _) in enumerate(self.kv):
            if k == key:
                self.kv[i] = (key, vtype, value)
                return self
        self.kv.append((key, vtype, value))
        return self

    def drop(self, key: str) -> "RawGGUF":
        self.kv = [e for e in self.kv if e[0] != key]
        return self

    def tensor(self, name: str) -> TensorInfo:
        return next(t for t in self.tensors if t.name == name)

    @property
    def arch(self) -> str:
        return self.get("general.architecture")

    # ------------------------------------------------------------------ writing
    def to_bytes(self) -> bytes:
        out = bytearray(b"GGUF")
        out += struct.pack("<IQQ", self.version, len(self.tensors) if self.n_tensors is None else self.n_tensors,
                           len(self.kv) if self.n_kv is None else self.n_kv)

        def string(s):
            raw = s.encode() if isinstance(s, str) else s
            out.extend(struct.pack("<Q", len(raw)) + raw)

        def value(vtype, v):
            if vtype == STRING:
                string(v)
            elif vtype == ARRAY:
                sub, items = v
                out.extend(struct.pack("<IQ", sub, len(items)))
                for item in items:
                    value(sub, item)
            else:
                out.extend(struct.pack(_FMT[vtype], v))

        for key, vtype, v in self.kv:
            string(key)
            out.extend(struct.pack("<I", vtype))
            value(vtype, v)
        for t in self.tensors:
            string(t.name)
            out.extend(struct.pack("<I", len(t.ne)) + struct.pack(f"<{len(t.ne)}Q", *t.ne))
            out.extend(struct.pack("<IQ", t.type, t.offset))
        out.extend(b"\0" * (-len(out) % self.alignment))
        return bytes(out) + self.data

    def write(self, path) -> Path:
        Path(path).write_bytes(self.to_bytes())
        return Path(path)


# ------------------------------------------------------------------------------------------- base models
# The tiny models hostile tests start from: a 2-layer Mixtral-style MoE (4 experts, 2 used), 64 wide, 400 rows.
BASE_DIMS = dict(n_vocab=400, n_embd=64, n_layer=2, n_head=2, n_head_kv=1, head_dim=32, n_ff=64, n_expert=4,
                 n_expert_used=2, context_length=256)


def base_gguf(workdir: Path) -> Path:
    from moecli.synth import SynthDims, write_gguf

    p = Path(workdir) / "base.gguf"
    if not p.exists():
        write_gguf(p, "llama", SynthDims(**BASE_DIMS))
    return p


def base_hf(workdir: Path) -> Path:
    from hf_fixtures import write_hf
    from moecli.synth import SynthDims

    d = Path(workdir) / "base-hf"
    if not d.exists():
        write_hf(d, "mixtral", SynthDims(**BASE_DIMS), 0)
    return d
