"""A small Hugging Face hub on 127.0.0.1 for the real huggingface_hub client, with fault injection.

Serves repos given as {repo_id: {path: bytes}} through the endpoints the client calls:
  GET  /api/models/{repo}[/revision/{rev}]   model_info (siblings with size, blobId, lfs.sha256 when ?blobs=1)
  HEAD /{repo}/resolve/{rev}/{path}          X-Repo-Commit, ETag / X-Linked-Etag (sha256 for LFS), X-Linked-Size
  GET  /{repo}/resolve/{rev}/{path}          the bytes, with `Range: bytes=N-` answered 206
Errors carry the hub's X-Error-Code (RepoNotFound, RevisionNotFound, EntryNotFound, GatedRepo) so the client raises its
typed exceptions. Faults: `cut[path] = [n, ...]` ends the next transfers of that file after n bytes (one entry per
request); `stall[path] = n` sends n bytes then hangs until `release()`; `corrupt.add(path)` serves different bytes
than the listed sha256; `gated` / `tokens` guard repos; `bare_errors` drops the X-Error-Code headers (a mirror). `served[path]` counts body bytes sent, `requests` logs
(method, path, headers).
"""
from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlparse

import numpy as np

LFS_SUFFIXES = (".gguf", ".safetensors", ".bin", ".pth", ".pt", ".onnx", ".msgpack")


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class Repo:
    def __init__(self, files: dict[str, bytes]):
        self.files = dict(files)
        h = hashlib.sha1()
        for p in sorted(self.files):
            h.update(p.encode() + b"\0" + hashlib.sha256(self.files[p]).digest())
        self.sha = h.hexdigest()

    def is_lfs(self, path: str) -> bool:
        return path.endswith(LFS_SUFFIXES) or len(self.files[path]) > 100_000

    def sibling(self, path: str, blobs: bool) -> dict:
        if not blobs:
            return {"rfilename": path}
        data = self.files[path]
        s = {"rfilename": path, "size": len(data), "blobId": git_blob_sha1(data)}
        if self.is_lfs(path):
            s["lfs"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "pointerSize": 134}
        return s


class HubServer:
    def __init__(self, repos: dict[str, dict[str, bytes]]):
        self.repos = {k: Repo(v) for k, v in repos.items()}
        self.gated: set[str] = set()
        self.tokens: dict[str, str] = {}  # repo_id -> the token that opens it (private/gated)
        self.cut: dict[str, list[int]] = {}
        self.stall: dict[str, int] = {}
        self.corrupt: set[str] = set()
        self.missing: set[str] = set()  # listed by model_info, 404 on resolve
        self.bare_errors = False  # answer errors as a plain mirror or proxy would: status only, no X-Error-Code
        self.served: dict[str, int] = {}
        self.requests: list[tuple[str, str, dict]] = []
        self._release = threading.Event()
        self.stalled = threading.Event()
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):  # quiet
                pass

            def do_HEAD(self):
                server._handle(self, head=True)

            def do_GET(self):
                server._handle(self, head=False)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.release()
        self.httpd.shutdown()
        self.httpd.server_close()

    def release(self):
        self._release.set()

    def add(self, repo_id: str, files: dict[str, bytes]) -> None:
        self.repos[repo_id] = Repo(files)

    # ------------------------------------------------------------------ request handling

    def _handle(self, h: BaseHTTPRequestHandler, head: bool) -> None:
        url = urlparse(h.path)
        path = unquote(url.path)
        with self.lock:
            self.requests.append(("HEAD" if head else "GET", h.path, dict(h.headers)))
        if path.startswith("/api/models/"):
            return self._model_info(h, path[len("/api/models/"):], parse_qs(url.query))
        parts = path.lstrip("/").split("/", 4)
        if len(parts) == 5 and parts[2] == "resolve":
            return self._resolve(h, f"{parts[0]}/{parts[1]}", parts[3], parts[4], head)
        self._error(h, 404, "RepoNotFound", "not found")

    def _repo(self, h, repo_id: str, rev: str):
        repo = self.repos.get(repo_id)
        if repo is None:
            return self._error(h, 404, "RepoNotFound", "Repository not found")
        auth = h.headers.get("Authorization", "")
        if repo_id in self.tokens and auth != f"Bearer {self.tokens[repo_id]}":
            if repo_id in self.gated:
                return self._error(h, 401 if not auth else 403, "GatedRepo", "Access to this model is restricted")
            return self._error(h, 401, "RepoNotFound", "Repository not found")
        if rev not in ("main", repo.sha):
            return self._error(h, 404, "RevisionNotFound", f"Invalid rev id: {rev}")
        return repo

    def _model_info(self, h, rest: str, query: dict) -> None:
        bits = rest.split("/")
        repo_id, rev = "/".join(bits[:2]), (unquote(bits[3]) if len(bits) >= 4 and bits[2] == "revision" else "main")
        repo = self._repo(h, repo_id, rev)
        if repo is None:
            return
        blobs = query.get("blobs", ["false"])[0].lower() in ("1", "true")
        body = json.dumps({"id": repo_id, "modelId": repo_id, "sha": repo.sha, "private": repo_id in self.tokens,
                           "gated": "manual" if repo_id in self.gated else False,
                           "siblings": [repo.sibling(p, blobs) for p in sorted(repo.files)]}).encode()
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    def _resolve(self, h, repo_id: str, rev: str, fpath: str, head: bool) -> None:
        repo = self._repo(h, repo_id, rev)
        if repo is None:
            return
        if fpath not in repo.files or fpath in self.missing:
            return self._error(h, 404, "EntryNotFound", f"{fpath} does not exist on \"{rev}\"", commit=repo.sha)
        data = repo.files[fpath]
        listed_len = len(data)
        if fpath in self.corrupt:
            data = bytes([data[0] ^ 0xFF]) + data[1:]  # same size, different sha256
        start = 0
        rng = h.headers.get("Range")
        if rng and rng.startswith("bytes=") and not head:
            start = int(rng[len("bytes="):].split("-")[0])
        body = data[start:]
        h.send_response(206 if start else 200)
        h.send_header("X-Repo-Commit", repo.sha)
        h.send_header("Accept-Ranges", "bytes")
        if repo.is_lfs(fpath):
            sha = hashlib.sha256(repo.files[fpath]).hexdigest()
            h.send_header("ETag", f'"{sha}"')
            h.send_header("X-Linked-Etag", f'"{sha}"')
            h.send_header("X-Linked-Size", str(listed_len))
        else:
            h.send_header("ETag", f'"{git_blob_sha1(repo.files[fpath])}"')
        if start:
            h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if head:
            return
        limit = len(body)
        with self.lock:
            cuts = self.cut.get(fpath)
            if cuts:
                limit = min(limit, cuts.pop(0))
            stall = self.stall.pop(fpath, None)
        if stall is not None:
            limit = min(limit, stall)
        sent = 0
        try:
            while sent < limit:
                n = h.wfile.write(body[sent:min(limit, sent + 65536)])
                sent += n
                with self.lock:
                    self.served[fpath] = self.served.get(fpath, 0) + n
            h.wfile.flush()
            if stall is not None:
                self.stalled.set()
                self._release.wait(30)
        except (BrokenPipeError, ConnectionResetError):
            pass
        if sent < len(body):
            h.close_connection = True  # the client sees a body shorter than Content-Length

    def _error(self, h, code: int, error_code: str, message: str, commit: str | None = None):
        body = json.dumps({"error": message}).encode()
        h.send_response(code)
        if not self.bare_errors:
            h.send_header("X-Error-Code", error_code)
            h.send_header("X-Error-Message", message)
        if commit:
            h.send_header("X-Repo-Commit", commit)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(body)
        return None


# ---------------------------------------------------------------------- fixtures

def tiny_moe_gguf(path, seed: int = 0, n_embd: int = 64, n_layer: int = 2, n_expert: int = 4, n_used: int = 2,
                  n_ff: int = 32, n_vocab: int = 96, quant_experts: bool = True) -> None:
    """A tiny Mixtral-style (llama arch) MoE GGUF that moecli's loader accepts; experts Q8_0, the rest F32/F16."""
    from gguf import GGMLQuantizationType as T, GGUFWriter
    from gguf.quants import quantize

    rng = np.random.default_rng(seed)
    n_head, n_head_kv = 4, 2
    head_dim = n_embd // n_head
    w = GGUFWriter(str(path), "llama")
    w.add_context_length(256)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(head_dim)
    w.add_expert_count(n_expert)
    w.add_expert_used_count(n_used)
    w.add_file_type(15)  # MOSTLY_Q4_K_M, as the file name says

    def t(name, *shape, dtype=np.float32, q=None):
        a = (rng.standard_normal(shape) * 0.05).astype(np.float32)
        if q is not None:
            w.add_tensor(name, quantize(a, q), raw_dtype=q)
        else:
            w.add_tensor(name, a.astype(dtype))

    t("token_embd.weight", n_vocab, n_embd, q=T.Q8_0)
    t("output_norm.weight", n_embd)
    t("output.weight", n_vocab, n_embd, dtype=np.float16)
    for l in range(n_layer):
        b = f"blk.{l}."
        t(b + "attn_norm.weight", n_embd)
        t(b + "attn_q.weight", n_head * head_dim, n_embd, dtype=np.float16)
        t(b + "attn_k.weight", n_head_kv * head_dim, n_embd, dtype=np.float16)
        t(b + "attn_v.weight", n_head_kv * head_dim, n_embd, dtype=np.float16)
        t(b + "attn_output.weight", n_embd, n_head * head_dim, dtype=np.float16)
        t(b + "ffn_norm.weight", n_embd)
        t(b + "ffn_gate_inp.weight", n_expert, n_embd)
        q = T.Q8_0 if quant_experts else None
        t(b + "ffn_gate_exps.weight", n_expert, n_ff, n_embd, q=q)
        t(b + "ffn_up_exps.weight", n_expert, n_ff, n_embd, q=q)
        t(b + "ffn_down_exps.weight", n_expert, n_embd, n_ff, q=q)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
