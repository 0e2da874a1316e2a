"""Tokenizers: llama.cpp's own (vocab only) for GGUF, Hugging Face `tokenizers` for safetensors directories."""
from __future__ import annotations

import codecs
import json
from pathlib import Path

from moecli.errors import MoecliError


class GGUFTokenizer:
    """llama.cpp's tokenizer for the GGUF's vocabulary (loaded vocab-only), so token ids match llama.cpp exactly."""

    def __init__(self, gguf):
        import ctypes

        import llama_cpp as L

        from moecli.kernels.llama_log import quiet_llama

        quiet_llama()
        self._L, self._ct = L, ctypes
        params = L.llama_model_default_params()
        params.vocab_only = True
        self._model = L.llama_model_load_from_file(str(gguf.paths[0]).encode(), params)
        if not self._model:
            raise MoecliError(f"{gguf.path.name}: llama.cpp cannot read its vocabulary")
        self._vocab = L.llama_model_get_vocab(self._model)
        self.bos_id = gguf.get("tokenizer.ggml.bos_token_id")
        self.eos_id = gguf.get("tokenizer.ggml.eos_token_id")
        self.add_bos = bool(L.llama_vocab_get_add_bos(self._vocab))
        self.chat_template = gguf.get("tokenizer.chat_template")
        self.n_vocab = L.llama_vocab_n_tokens(self._vocab)
        self._pieces: dict[int, bytes] = {}

    @property
    def llama_vocab(self):
        """llama.cpp's vocabulary handle (for its grammar sampler); valid while this tokenizer lives."""
        return self._vocab

    def __del__(self):
        if getattr(self, "_model", None):
            self._L.llama_model_free(self._model)
            self._model = None

    def encode(self, text: str, add_special: bool = True) -> list[int]:
        data = text.encode()
        cap = len(data) + 8
        buf = (self._L.llama_token * cap)()
        n = self._L.llama_tokenize(self._vocab, data, len(data), buf, cap, add_special and self.add_bos, True)
        if n < 0:
            raise MoecliError("text too long to tokenize")
        return list(buf[:n])

    def token_bytes(self, token: int, special: bool = False) -> bytes:
        """The token's bytes; control tokens render as their text only with `special` (streaming hides them).

        Embedding rows past the vocabulary (padding) decode as nothing: llama.cpp aborts on an id it lacks."""
        if not 0 <= token < self.n_vocab:
            return b""
        key = (token, special)
        piece = self._pieces.get(key)
        if piece is None:  # a buffer per miss: the server reads pieces from several threads
            buf = self._ct.create_string_buffer(256)
            n = self._L.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, special)
            piece = self._pieces[key] = buf.raw[:max(n, 0)]
        return piece

    def is_eog(self, token: int) -> bool:
        return 0 <= token < self.n_vocab and bool(self._L.llama_vocab_is_eog(self._vocab, token))

    def token_text(self, token: int) -> str:
        return self.token_bytes(token, special=True).decode("utf-8", "replace")


class HFTokenizer:
    """tokenizer.json + tokenizer_config.json of a Hugging Face model directory."""

    def __init__(self, model_dir: Path, config: dict):
        from tokenizers import Tokenizer

        from moecli.formats.files import read_json, read_text

        path = model_dir / "tokenizer.json"
        if not path.exists():
            raise MoecliError(f"{model_dir}: no tokenizer.json")
        try:
            self._tok = Tokenizer.from_str(read_text(path, "tokenizer.json"))
        except Exception as e:  # noqa: BLE001 - the tokenizers library raises plain Exceptions for bad files
            raise MoecliError(f"{path}: not a valid tokenizer ({str(e).splitlines()[0][:120]})") from None
        tc_path = model_dir / "tokenizer_config.json"
        tc = read_json(tc_path, "tokenizer_config.json") if tc_path.exists() else {}
        self.n_vocab = self._tok.get_vocab_size()

        def token_id(key, value):
            if isinstance(value, dict):
                value = value.get("content")
            tid = self._tok.token_to_id(value) if isinstance(value, str) else value
            if tid is not None and (type(tid) is not int or not 0 <= tid < self.n_vocab):
                raise MoecliError(f"{model_dir.name}: {key} = {str(tid)[:60]} is not a token of the vocabulary "
                                  f"({self.n_vocab} tokens)")
            return tid

        self.bos_id = token_id("bos_token", tc.get("bos_token")) if tc.get("bos_token") else \
            token_id("bos_token_id", config.get("bos_token_id"))
        eos = tc.get("eos_token") or config.get("eos_token_id")
        eos = [token_id("eos_token", e) for e in (eos if isinstance(eos, list) else [eos])]
        if isinstance(config.get("eos_token_id"), list):
            eos += [token_id("eos_token_id", e) for e in config["eos_token_id"]]
        self.eos_id = eos[0] if eos else None
        self._eog = set(eos) - {None}
        self.add_bos = bool(tc.get("add_bos_token", False)) and self.bos_id is not None
        self.chat_template = tc.get("chat_template")
        if isinstance(self.chat_template, list):  # named templates: take the default one
            self.chat_template = next((t.get("template") for t in self.chat_template
                                       if isinstance(t, dict) and t.get("name") == "default"), None)
        jinja = model_dir / "chat_template.jinja"
        if self.chat_template is None and jinja.exists():
            self.chat_template = read_text(jinja, "chat template")
        if self.chat_template is not None and not isinstance(self.chat_template, str):
            raise MoecliError(f"{tc_path}: chat_template is {type(self.chat_template).__name__}, expected a string")

    def encode(self, text: str, add_special: bool = True) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if add_special and self.add_bos else []) + ids

    def token_bytes(self, token: int, special: bool = False) -> bytes:
        if not 0 <= token < self.n_vocab:
            return b""  # an embedding row past the vocabulary (padding)
        # Byte-level BPE: map the token's characters back to bytes (GPT-2's byte <-> unicode table).
        piece = self._tok.id_to_token(token) or ""
        table = _byte_decoder()
        if all(ch in table for ch in piece):
            return bytes(table[ch] for ch in piece)
        return self._tok.decode([token], skip_special_tokens=not special).encode()

    def is_eog(self, token: int) -> bool:
        return token in self._eog

    def token_text(self, token: int) -> str:
        return self.token_bytes(token).decode("utf-8", "replace")


_BYTE_DECODER: dict[str, int] | None = None


def _byte_decoder() -> dict[str, int]:
    global _BYTE_DECODER
    if _BYTE_DECODER is None:
        bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
        cs, n = bs[:], 0
        for b in range(256):
            if b not in bs:
                bs.append(b)
                cs.append(256 + n)
                n += 1
        _BYTE_DECODER = {chr(c): b for b, c in zip(bs, cs)}
    return _BYTE_DECODER


class TextStream:
    """Turns generated tokens into text pieces, holding back bytes of a UTF-8 character split across tokens."""

    def __init__(self, tokenizer, special: bool = False):
        self.tokenizer, self.special = tokenizer, special  # special: control tokens as text (harmony's markers)
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")

    def push(self, token: int) -> str:
        return self._decoder.decode(self.tokenizer.token_bytes(token, self.special))

    def flush(self) -> str:
        return self._decoder.decode(b"", final=True)
