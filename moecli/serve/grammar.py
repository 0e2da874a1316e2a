"""Constrained decoding through llama.cpp's own grammar sampler (GBNF), driven over our logits and the GGUF's
vocabulary: JSON schemas become GBNF with llama-cpp-python's converter, the sampler masks the tokens the grammar
refuses, and every token we choose is fed back to it.

A schema comes from a client, so it is hostile input: remote `$ref`s are never fetched, nesting and repetition
counts are bounded before conversion, and the grammar's size after it.
"""
from __future__ import annotations

import ctypes
import json
import re
from pathlib import Path

import numpy as np
import torch

from moecli.errors import MoecliError

MAX_DEPTH = 32  # nesting of a schema (objects in objects...)
MAX_REPEAT = 1000  # minItems/maxItems/minLength/... and {n} in patterns: GBNF spells repetitions out
MAX_GRAMMAR = 256 * 1024  # characters of GBNF
_COUNTS = ("minItems", "maxItems", "minLength", "maxLength", "minProperties", "maxProperties", "minContains",
           "maxContains")

# Any JSON value, as llama.cpp's json.gbnf (response_format {"type": "json_object"}, ollama's format "json").
JSON_OBJECT_SCHEMA = {"type": "object"}


def check_schema(schema, depth: int = 0) -> None:
    """Refuse schemas whose grammar would be huge or whose conversion would recurse without end."""
    if depth > MAX_DEPTH:
        raise MoecliError(f"JSON schema nested deeper than {MAX_DEPTH} levels")
    if isinstance(schema, dict):
        for key, value in schema.items():
            if key in _COUNTS and isinstance(value, (int, float)) and not isinstance(value, bool) \
                    and value > MAX_REPEAT:
                raise MoecliError(f"JSON schema {key} = {value} is above {MAX_REPEAT}")
            if key == "pattern" and isinstance(value, str):
                for n in re.findall(r"\{\s*(\d+)", value) + re.findall(r",\s*(\d+)\s*\}", value):
                    if int(n) > MAX_REPEAT:
                        raise MoecliError(f"JSON schema pattern repeats {n} times (above {MAX_REPEAT})")
            if key == "$ref" and isinstance(value, str) and not value.startswith("#"):
                raise MoecliError(f"JSON schema $ref {value[:80]!r}: only local references (#/...) are allowed")
            check_schema(value, depth + 1)
    elif isinstance(schema, list):
        for value in schema:
            check_schema(value, depth + 1)


def converter(prop_order: list[str] = ()):
    """llama-cpp-python's JSON schema -> GBNF converter, never fetching; `prop_order` puts those keys first."""
    from llama_cpp.llama_grammar import SchemaConverter

    return SchemaConverter(prop_order={k: i for i, k in enumerate(prop_order)}, allow_fetch=False, dotall=False,
                           raw_pattern=False)


def visit(conv, schema, name: str) -> str:
    """Add the rules of `schema` to `conv` under the rule `name` (returned); schema errors as MoecliError."""
    check_schema(schema)
    if not isinstance(schema, dict):
        raise MoecliError("a JSON schema must be an object")
    try:
        schema = conv.resolve_refs(schema, "request")
        return conv.visit(schema, name)
    except MoecliError:
        raise
    except RecursionError:
        raise MoecliError("JSON schema too deeply recursive") from None
    except Exception as e:  # noqa: BLE001 - the converter raises many kinds on bad schemas
        raise MoecliError(f"unsupported JSON schema: {type(e).__name__}: {str(e)[:200]}") from None


def schema_gbnf(schema) -> str:
    """GBNF text whose `root` matches the JSON documents valid under `schema`."""
    conv = converter()
    visit(conv, schema, "")
    return finish(conv)


# llama-cpp-python's converter lets JSON strings hold raw control characters (invalid JSON); llama.cpp's own one
# (json-schema-to-grammar.cpp) excludes them: use its rule.
_CHAR_RULE = re.compile(r"^char ::= .*$", re.M)
_STRICT_CHAR = r'char ::= [^"\\\x7F\x00-\x1F] | [\\] (["\\/bfnrt] | "u" [0-9a-fA-F]{4})'


def finish(conv, extra: str = "") -> str:
    text = _CHAR_RULE.sub(lambda _: _STRICT_CHAR, conv.format_grammar()).rstrip("\n") + "\n" + extra
    if len(text) > MAX_GRAMMAR:
        raise MoecliError(f"the grammar of this JSON schema is too large ({len(text)} characters)")
    return text


def literal(text: str) -> str:
    """A GBNF string literal."""
    return json.dumps(text, ensure_ascii=False)


def hf_vocab(model_dir: Path):
    """llama.cpp's vocabulary for a Hugging Face byte-level BPE tokenizer (Qwen, DeepSeek, Llama 3, gpt-oss...), so
    its grammar sampler works on safetensors models too: the tokens, their types and the merges written into a
    vocabulary-only GGUF (a few MB, in a temporary directory) and loaded as GGUF vocabularies are. Returns the
    GGUFTokenizer (keep it alive while the handle is used)."""
    import tempfile

    import gguf

    from moecli.formats.gguf import GGUFFile
    from moecli.tokenizer import GGUFTokenizer

    try:
        spec = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
        model = spec["model"]
        byte_level = "ByteLevel" in json.dumps(spec.get("decoder"))
        if model.get("type") != "BPE" or not byte_level:
            raise MoecliError("constrained output on a safetensors model needs a byte-level BPE tokenizer")
        vocab, added = model["vocab"], {t["id"]: t for t in spec.get("added_tokens", [])}
        n = max(list(vocab.values()) + list(added)) + 1
        tokens, types = [f"[PAD{i}]" for i in range(n)], [5] * n  # llama.cpp's UNUSED
        for t, i in vocab.items():
            tokens[i], types[i] = t, 1  # NORMAL
        for i, t in added.items():
            tokens[i], types[i] = t["content"], 3 if t.get("special") else 4  # CONTROL / USER_DEFINED
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise MoecliError(f"cannot read {model_dir.name}/tokenizer.json for the grammar: {e}") from None
    with tempfile.TemporaryDirectory(prefix="moecli-vocab-") as tmp:
        path = Path(tmp) / "vocab.gguf"
        w = gguf.GGUFWriter(path, "llama")
        for key, value in (("context_length", 4096), ("embedding_length", 64), ("block_count", 1),
                           ("feed_forward_length", 64), ("attention.head_count", 1)):
            w.add_uint32(f"llama.{key}", value)
        w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
        w.add_string("tokenizer.ggml.model", "gpt2")
        w.add_string("tokenizer.ggml.pre", "gpt-2")  # tokenizing rules: unused, only pieces are read
        w.add_array("tokenizer.ggml.tokens", tokens)
        w.add_array("tokenizer.ggml.token_type", types)
        w.add_array("tokenizer.ggml.merges", merges)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.close()
        return GGUFTokenizer(GGUFFile(path))


_TOKEN_DATA = np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")], align=True)


class Grammar:
    """llama.cpp's grammar sampler over a GGUF vocabulary; call it on a logits tensor to mask refused tokens in
    place, then `accept(token)` the chosen one.

    llama.cpp aborts the process when it is made to accept a token its grammar refuses (a C++ exception through its
    C API), so every token is checked first (`allows`, one candidate through the sampler) and a refusal is an error.
    """

    def __init__(self, vocab, n_vocab: int, gbnf: str):
        import llama_cpp as L

        from moecli.kernels.llama_log import quiet_llama

        quiet_llama()
        self._L = L
        self.n_vocab = n_vocab
        self._vocab = vocab
        self._smpl = L.llama_sampler_init_grammar(vocab, gbnf.encode(), b"root")
        if not self._smpl:
            raise MoecliError("llama.cpp refused the grammar")
        self._data = np.zeros(n_vocab, dtype=_TOKEN_DATA)
        self._ids = np.arange(n_vocab, dtype=np.int32)
        self._array = self._token_array(self._data)
        self._one = np.zeros(1, dtype=_TOKEN_DATA)
        self._one_array = self._token_array(self._one)

    def _token_array(self, data: np.ndarray):
        L = self._L
        return L.llama_token_data_array(data=data.ctypes.data_as(ctypes.POINTER(L.llama_token_data)),
                                        size=len(data), selected=-1, sorted=False)

    def __call__(self, logits: torch.Tensor) -> None:
        n = self.n_vocab
        d = self._data
        d["id"] = self._ids
        d["logit"] = logits[:n].numpy()
        self._array.size, self._array.selected, self._array.sorted = n, -1, False
        self._L.llama_sampler_apply(self._smpl, ctypes.byref(self._array))
        logits[:n] = torch.from_numpy(d["logit"].copy())
        if logits.numel() > n:
            logits[n:] = float("-inf")  # rows past the vocabulary (padding) are no tokens

    def allows(self, token: int) -> bool:
        if not 0 <= token < self.n_vocab:
            return False
        self._one["id"], self._one["logit"] = token, 0.0
        self._one_array.size, self._one_array.selected, self._one_array.sorted = 1, -1, False
        self._L.llama_sampler_apply(self._smpl, ctypes.byref(self._one_array))
        return bool(np.isfinite(self._one["logit"][0]))

    def ends(self, token: int) -> bool:
        """Whether `token` ends generation for this vocabulary: the grammar admits such tokens only once its text is
        complete (a vocabulary built from tokenizer.json may mark more of them than the model's tokenizer)."""
        return bool(self._L.llama_vocab_is_eog(self._vocab, token))

    def accept(self, token: int) -> None:
        """Advance the grammar over the chosen token (an end-of-generation token is never accepted: it ends)."""
        if not self.allows(token):
            raise MoecliError(f"the grammar refuses token {token}")
        self._L.llama_sampler_accept(self._smpl, token)

    def __del__(self):
        if getattr(self, "_smpl", None):
            self._L.llama_sampler_free(self._smpl)
            self._smpl = None


class LazyGrammar:
    """A grammar that holds only from a trigger on (as llama.cpp's lazy tool-call grammars, `tool_choice: auto`):
    free text until the generated text contains `trigger`, then the grammar, fed the text from the trigger on.
    Done here rather than with llama.cpp's lazy mode, which aborts when the token that completes the trigger carries
    text its grammar refuses; here such a call is left unconstrained (and parsed, or given back as text)."""

    def __init__(self, make, trigger: str, tokenizer):
        self._make, self.trigger, self._tok = make, trigger, tokenizer  # make() -> Grammar
        self._text = b""
        self._inner: Grammar | None = None
        self._dead = False

    def __call__(self, logits: torch.Tensor) -> None:
        if self._inner is not None:
            self._inner(logits)

    def ends(self, token: int) -> bool:
        return self._inner is not None and self._inner.ends(token)

    def accept(self, token: int) -> None:
        if self._inner is not None:
            self._inner.accept(token)
            return
        if self._dead:
            return
        self._text += self._tok.token_bytes(token, True)
        i = self._text.find(self.trigger.encode())
        if i < 0:
            self._text = self._text[-4 * len(self.trigger):]  # only the end can still complete the trigger
            return
        inner = self._make()
        tail = self._text[i:].decode("utf-8", "replace")
        for t in self._tok.encode(tail, False):
            if not inner.allows(t):
                self._dead = True  # the call does not start as the grammar wants: leave it free
                return
            inner.accept(t)
        self._inner = inner
