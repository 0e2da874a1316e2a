"""Pulled models: names, quant selection, resumable verified downloads into the Hugging Face cache, the local list.

Everything lives in the standard Hugging Face cache (`HF_HUB_CACHE`, else `HF_HOME/hub`): huggingface_hub owns its
layout (blobs named by etag, snapshot symlinks, refs), so other tools see the same files and nothing is copied twice.

Why moecli writes LFS blobs itself: huggingface_hub 2.x downloads into a process-unique temporary file that it deletes
on failure, so an interrupted pull of a 20 GB GGUF would start over. moecli streams LFS files with the client's own
`http_get` into `blobs/<etag>.incomplete` (appending, Range requests from where the file ends), checks SHA-256
against the hub's LFS metadata, renames it to `blobs/<etag>` and then calls `hf_hub_download`, which finds the blob
and only writes the snapshot symlink and refs. Xet-backed files (the real hub's default for new uploads) go through
`hf_hub_download` directly and are hashed afterwards.
"""
from __future__ import annotations

import difflib
import hashlib
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

from moecli.errors import MoecliError

DEFAULT_QUANT = "Q4_K_M"
DEFAULT_ENDPOINT = "https://huggingface.co"

# Repo ids: the hub's own rules (letters, digits, `-_.`, no `--` or `..`, 96 characters per part).
_REPO_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9_])?"
_REPO_ID = re.compile(rf"^{_REPO_PART}/{_REPO_PART}$")
_QUANT_TAG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_REVISION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,199}$")
_SHARD = re.compile(r"-(\d{5})-of-(\d{5})$")
# Quant tags as GGUF repos spell them in file names: Q4_K_M, IQ4_XS, Q8_0, BF16, UD-Q4_K_XL, MXFP4_MOE...
_QUANT_IN_NAME = re.compile(
    r"(?:^|[-_.])((?:UD-)?(?:I?Q\d(?:_[A-Z0-9]+)*|TQ\d_\d|MXFP4(?:_MOE)?|BF16|F16|FP16|F32|FP32))(?=$|[-_.])",
    re.IGNORECASE)
# Files a safetensors checkpoint needs besides its weights; anything else (.bin, .pth, .onnx, .msgpack, subfolders
# such as original/ or onnx/) is another copy of the same weights and is skipped.
_HF_SIDE_FILES = {"config.json", "generation_config.json", "model.safetensors.index.json", "tokenizer.json",
                  "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json", "vocab.json", "merges.txt",
                  "added_tokens.json", "chat_template.jinja", "chat_template.json"}
_CHUNK = 8 << 20


# ---------------------------------------------------------------- environment

def cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment at call time (tests and `--offline` change it)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def env_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


# ---------------------------------------------------------------- names

@dataclass(frozen=True)
class ModelRef:
    repo_id: str
    quant: str | None = None

    @property
    def name(self) -> str:
        return f"{self.repo_id}:{self.quant}" if self.quant else self.repo_id


def parse_name(name: str) -> ModelRef:
    """`owner/repo[:QUANT]`, `hf.co/owner/repo[:QUANT]` or a huggingface.co URL -> ModelRef; anything else refused."""
    s = name.strip()
    for prefix in ("https://", "http://"):
        if s.startswith(prefix):
            s = s[len(prefix):]
    for host in ("hf.co/", "huggingface.co/", "www.huggingface.co/"):
        if s.startswith(host):
            s = s[len(host):]
            break
    repo, _, quant = s.partition(":")
    repo = repo.rstrip("/")
    if not _REPO_ID.match(repo) or "--" in repo or ".." in repo:
        raise MoecliError(f"'{name}' is not a model name: use owner/repo[:QUANT], e.g. Qwen/Qwen3-30B-A3B-GGUF:Q4_K_M")
    if quant and not _QUANT_TAG.match(quant):
        raise MoecliError(f"'{quant}' is not a quant tag (e.g. Q4_K_M, Q8_0, IQ4_XS)")
    return ModelRef(repo, quant or None)


def check_revision(revision: str) -> str:
    parts = revision.split("/")
    if not _REVISION.match(revision) or any(p in ("", ".", "..") for p in parts):
        raise MoecliError(f"'{revision}' is not a revision (a branch, tag or commit hash)")
    return revision


def safe_repo_path(path: str) -> str:
    """A file name from the hub, refused unless it is a plain relative path inside the repo."""
    parts = path.split("/")
    if (not path or "\\" in path or "\0" in path or path.startswith("/") or re.match(r"^[A-Za-z]:", path)
            or any(p in ("", ".", "..") for p in parts)):
        raise MoecliError(f"the repo lists an unsafe file name {path!r} (path traversal); refusing to download it")
    return path


# ---------------------------------------------------------------- choosing files

def quant_of(path: str) -> str | None:
    """The quant tag in a GGUF file name (or its folder), upper-case; None when the name has none."""
    base = path.rsplit("/", 1)[-1]
    if base.lower().endswith(".gguf"):
        base = base[:-len(".gguf")]
    stem = _SHARD.sub("", base)
    tags = _QUANT_IN_NAME.findall(stem)
    if not tags and "/" in path:
        tags = _QUANT_IN_NAME.findall(path.rsplit("/", 2)[-2])
    return tags[-1].upper() if tags else None


def _is_weights_gguf(path: str) -> bool:
    # mmproj files are vision projectors, not the language model.
    base = path.rsplit("/", 1)[-1].lower()
    return base.endswith(".gguf") and not base.startswith("mmproj")


def gguf_quants(files: list[str]) -> list[str]:
    return sorted({q for f in files if _is_weights_gguf(f) and (q := quant_of(f))})


def repo_format(files: list[str]) -> str:
    if any(_is_weights_gguf(f) for f in files):
        return "gguf"
    if any(f.endswith(".safetensors") and "/" not in f for f in files):
        return "safetensors"
    return "unknown"


def select_gguf(files: list[str], quant: str | None, repo_id: str = "") -> tuple[str, list[str]]:
    """(quant, files of that quant in shard order): case-insensitive tag, default Q4_K_M; single file or all shards."""
    ggufs = [f for f in files if _is_weights_gguf(f)]
    want = (quant or DEFAULT_QUANT).upper()
    matching = [f for f in ggufs if quant_of(f) == want]
    if not matching and quant is None and len(ggufs) == 1:
        matching = ggufs  # a one-file repo: take it whatever its tag
    if not matching:
        have = gguf_quants(ggufs)
        raise MoecliError(f"{repo_id} has no {want} GGUF" + (f"; available quants: {', '.join(have)}" if have else "")
                          + (f" (pull one with {repo_id}:{have[0]})" if have else ""))
    # Group shards of one model; a repo may hold several models with the same tag: take the shortest name.
    groups: dict[str, list[str]] = {}
    for f in matching:
        groups.setdefault(_SHARD.sub("", f[:-len(".gguf")]), []).append(f)
    stem = min(groups, key=lambda s: (len(s), s))
    chosen = sorted(groups[stem])
    m = _SHARD.search(chosen[0][:-len(".gguf")])
    if m:
        n = int(m[2])
        expected = [f"{stem}-{i:05d}-of-{n:05d}.gguf" for i in range(1, n + 1)]
        missing = [e for e in expected if e not in chosen]
        if missing:
            raise MoecliError(f"{repo_id}: split GGUF {stem} lacks {len(missing)} of its {n} shards "
                              f"({missing[0].rsplit('/', 1)[-1]}...)")
        chosen = expected
    return (quant_of(chosen[0]) or want), chosen


def select_safetensors(files: list[str], index: dict | None = None) -> list[str]:
    """Config, index, weight shards and tokenizer/chat-template files at the repo root; no duplicate weight formats."""
    top = [f for f in files if "/" not in f]
    shards = sorted(f for f in top if f.endswith(".safetensors"))
    if index is not None:
        named = sorted(set((index.get("weight_map") or {}).values()))
        missing = [s for s in named if s not in files]
        if missing:
            raise MoecliError(f"the safetensors index names {missing[0]}, which the repo does not have")
        shards = [safe_repo_path(s) for s in named]
    return sorted(f for f in top if f in _HF_SIDE_FILES) + shards


# ---------------------------------------------------------------- errors

def _redact(text: str, token: str | None) -> str:
    return text.replace(token, "***") if token else text


class _HubErrors:
    """Turns huggingface_hub / network exceptions into one-line MoecliErrors that never contain the token."""

    def __init__(self, ref: ModelRef, token: str | None, revision: str | None = None):
        self.ref, self.token, self.revision = ref, token, revision

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc is None or isinstance(exc, (MoecliError, KeyboardInterrupt)):
            return False
        from huggingface_hub import errors as e
        import httpx2

        repo = self.ref.repo_id
        if isinstance(exc, e.GatedRepoError):
            msg = (f"{repo} is gated: accept its terms on huggingface.co/{repo}, then pass --token or set HF_TOKEN"
                   if not self.token else f"{repo} is gated and this token has no access: accept its terms on "
                                          f"huggingface.co/{repo} with the account that owns the token")
        elif isinstance(exc, e.RepositoryNotFoundError):
            msg = (f"{repo}: no such model repo on the hub" +
                   (" (or it is private and the token has no access)" if self.token
                    else " (if it is private, pass --token or set HF_TOKEN)"))
        elif isinstance(exc, e.RevisionNotFoundError):
            msg = f"{repo} has no revision '{self.revision}'"
        elif isinstance(exc, (e.RemoteEntryNotFoundError, e.EntryNotFoundError)) and not isinstance(
                exc, e.LocalEntryNotFoundError):
            msg = f"{repo}: file not found on the hub ({_first_line(exc)})"
        elif isinstance(exc, (e.LocalEntryNotFoundError, e.OfflineModeIsEnabled)):
            msg = (f"{self.ref.name} is not in the cache and the hub cannot be used (offline): "
                   f"pull it while online with `moecli pull {self.ref.name}`")
        elif isinstance(exc, (httpx2.ConnectError, httpx2.TimeoutException, httpx2.NetworkError,
                              httpx2.RemoteProtocolError, ConnectionError)):
            msg = (f"cannot reach the hub at {endpoint()} ({type(exc).__name__}): check the network, "
                   f"or use --offline for models already pulled; a retry resumes where this stopped")
        elif isinstance(exc, e.HfHubHTTPError):
            code = exc.response.status_code if exc.response is not None else "?"
            hint = " (the token was refused: check --token / HF_TOKEN)" if code in (401, 403) else ""
            msg = f"the hub answered HTTP {code} for {repo}{hint}"
        elif isinstance(exc, OSError):
            msg = f"{exc.strerror or exc}" + (f": {exc.filename}" if getattr(exc, "filename", None) else "")
            msg += " (the cache keeps only complete, verified files; a retry resumes)"
        else:
            return False
        raise MoecliError(_redact(msg, self.token)) from None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


# ---------------------------------------------------------------- pull

@dataclass
class RemoteFile:
    path: str
    size: int | None
    sha256: str | None  # LFS files only
    blob_id: str | None  # git blob sha1 (non-LFS files)


@dataclass
class PullResult:
    ref: ModelRef
    fmt: str  # "gguf" or "safetensors"
    commit: str
    files: list[Path]
    downloaded_bytes: int = 0
    skipped: list[str] = field(default_factory=list)

    @property
    def path(self) -> Path:
        """What `moecli chat` opens: the first GGUF shard, or the snapshot directory."""
        return self.files[0] if self.fmt == "gguf" else self.files[0].parent


class Progress:
    """Callbacks a front end implements to show transfers; the default shows nothing."""

    def start(self, name: str, total: int | None, done: int) -> None: ...

    def advance(self, n: int) -> None: ...

    def finish(self) -> None: ...

    def note(self, text: str) -> None: ...


def storage_folder(repo_id: str) -> Path:
    from huggingface_hub.file_download import repo_folder_name

    return cache_dir() / repo_folder_name(repo_id=repo_id, repo_type="model")


def pull(name: str, revision: str | None = None, token: str | None = None, offline: bool = False,
         progress: Progress | None = None, verify_cached: bool = False) -> PullResult:
    """Download (or find in the cache, offline) the files of a model; returns their paths in the cache."""
    ref = parse_name(name)
    revision = check_revision(revision or "main")
    token = token or os.environ.get("HF_TOKEN") or None
    progress = progress or Progress()
    if offline or env_offline():
        return _from_cache(ref, revision)
    from huggingface_hub import HfApi

    with _HubErrors(ref, token, revision):
        info = HfApi(endpoint=endpoint()).model_info(ref.repo_id, revision=revision, files_metadata=True,
                                                     token=token)
        remote = {s.rfilename: RemoteFile(s.rfilename, s.size, s.lfs.sha256 if s.lfs else None, s.blob_id)
                  for s in info.siblings or []}
        for path in remote:
            safe_repo_path(path)  # one bad name and the whole listing is untrusted
        commit = info.sha
        if not commit or not re.fullmatch(r"[0-9a-f]{40}", commit):
            raise MoecliError(f"the hub gave no valid commit for {ref.repo_id}@{revision}")
        fmt = repo_format(list(remote))
        if fmt == "gguf":
            quant, chosen = select_gguf(list(remote), ref.quant, ref.repo_id)
            ref = ModelRef(ref.repo_id, quant)
        elif fmt == "safetensors":
            if ref.quant:
                raise MoecliError(f"{ref.repo_id} is a safetensors repo: it has no quant tags (drop ':{ref.quant}')")
            chosen = select_safetensors(list(remote))
            if "model.safetensors.index.json" in chosen:
                import json

                idx = _download(ref, remote["model.safetensors.index.json"], commit, token, progress, verify_cached)
                try:
                    index = json.loads(idx.read_text())
                except (ValueError, UnicodeDecodeError) as e:
                    raise MoecliError(f"{ref.repo_id}: model.safetensors.index.json is not valid JSON ({e})")
                chosen = select_safetensors(list(remote), index)
        else:
            raise MoecliError(f"{ref.repo_id} has neither GGUF nor safetensors weights")
        _check_space(ref, [remote[f] for f in chosen])
        before = _Counter.total
        paths = [_download(ref, remote[f], commit, token, progress, verify_cached) for f in chosen]
        _write_ref(ref.repo_id, revision, commit)
    return PullResult(ref, fmt, commit, paths, _Counter.total - before)


class _Counter:
    total = 0  # bytes this process received, for the summary line


def _check_space(ref: ModelRef, files: list[RemoteFile]) -> None:
    blobs = storage_folder(ref.repo_id) / "blobs"
    need = 0
    for f in files:
        key = f.sha256 or f.blob_id or ""
        blob = blobs / key
        if key and blob.exists():
            continue
        part = blob.with_name(blob.name + ".incomplete")
        need += max((f.size or 0) - (part.stat().st_size if part.exists() else 0), 0)
    probe = blobs
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if need > free:
        raise MoecliError(f"not enough disk space for {ref.name}: {_fmt(need)} to download, {_fmt(free)} free "
                          f"in {cache_dir()} (set HF_HOME or HF_HUB_CACHE to another disk)")


def _download(ref: ModelRef, f: RemoteFile, commit: str, token: str | None, progress: Progress,
              verify_cached: bool) -> Path:
    from huggingface_hub import hf_hub_download

    verified = _fetch_lfs_blob(ref, f, commit, token, progress) if f.sha256 else False
    path = Path(hf_hub_download(ref.repo_id, f.path, revision=commit, token=token, cache_dir=cache_dir(),
                                endpoint=endpoint()))
    if verify_cached or not verified:
        _verify(f, path)
    return path


def _fetch_lfs_blob(ref: ModelRef, f: RemoteFile, commit: str, token: str | None, progress: Progress) -> bool:
    """Stream an LFS file into blobs/<etag>.incomplete, resuming, then SHA-256 check and rename to blobs/<etag>.

    Returns False when hf_hub_download still has to fetch it (Xet), so the caller hashes the result."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.file_download import http_get
    from huggingface_hub.file_download import is_xet_available
    from huggingface_hub.utils import WeakFileLock, build_hf_headers

    folder = storage_folder(ref.repo_id)
    snapshot_file = folder / "snapshots" / commit / f.path
    if snapshot_file.exists():
        return True  # pulled (and verified) before; `--verify` re-hashes
    url = hf_hub_url(ref.repo_id, f.path, revision=commit, endpoint=endpoint())
    meta = get_hf_file_metadata(url, token=token, endpoint=endpoint())
    if not meta.etag or "/" in meta.etag or meta.etag.startswith("."):
        raise MoecliError(f"{f.path}: the hub sent no usable ETag")
    if meta.xet_file_data is not None and is_xet_available():
        progress.note(f"{f.path}: Xet transfer (verified after download)")
        return False
    blob = folder / "blobs" / meta.etag
    if blob.exists():
        return False  # written by another tool: hash it once
    blob.parent.mkdir(parents=True, exist_ok=True)
    part = blob.with_name(blob.name + ".incomplete")
    lock = cache_dir() / ".locks" / folder.name / f"{meta.etag}.moecli.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    size = meta.size if meta.size is not None else f.size
    with WeakFileLock(lock):
        if blob.exists():
            return False
        done = part.stat().st_size if part.exists() else 0
        if size is not None and done > size:
            part.unlink()  # not a prefix of this file
            done = 0
        headers = build_hf_headers(token=token)
        if urlparse(meta.location).netloc != urlparse(url).netloc:
            headers.pop("authorization", None)  # a signed CDN URL: never send the token to another host
        if size is None or done < size:
            progress.start(f.path, size, done)
            try:
                with open(part, "ab") as out:
                    http_get(meta.location, _CountingWriter(out, progress), resume_size=done, headers=headers,
                             expected_size=size, displayed_filename=f.path, tqdm_class=_SilentTqdm)
            finally:
                progress.finish()
        digest = sha256_file(part)
        if digest != f.sha256:
            part.unlink(missing_ok=True)
            raise MoecliError(f"{f.path}: SHA-256 mismatch (hub {f.sha256[:12]}..., downloaded {digest[:12]}...): "
                              f"the corrupt download was deleted; run the pull again")
        os.replace(part, blob)
    return True


class _CountingWriter:
    """The file object http_get writes to: counts bytes for the progress bar and the summary."""

    def __init__(self, f, progress: Progress):
        self.f, self.progress = f, progress

    def write(self, b) -> int:
        n = self.f.write(b)
        _Counter.total += len(b)
        self.progress.advance(len(b))
        return n

    def __getattr__(self, name):
        return getattr(self.f, name)


def _silent_tqdm():
    from tqdm.auto import tqdm

    class Silent(tqdm):
        # Rich draws moecli's bars; huggingface_hub's own bar would print a second one.
        def __init__(self, *a, **k):
            k["disable"] = True
            super().__init__(*a, **k)

    return Silent


class _LazyTqdm(type):
    def __call__(cls, *a, **k):
        return _silent_tqdm()(*a, **k)


class _SilentTqdm(metaclass=_LazyTqdm):
    pass


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _git_blob_sha1(path: Path) -> str:
    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _verify(f: RemoteFile, path: Path) -> None:
    """Hash a file the cache now holds; on mismatch remove it (blob and snapshot link) so no bad file looks good."""
    if f.sha256:
        got, want = sha256_file(path), f.sha256
    elif f.sha256 is None and f.blob_id and (f.size is None or f.size < (64 << 20)):
        got, want = _git_blob_sha1(path), f.blob_id
    else:
        return
    if got != want:
        blob = path.resolve()
        path.unlink(missing_ok=True)
        blob.unlink(missing_ok=True)
        raise MoecliError(f"{f.path}: checksum mismatch (hub {want[:12]}..., file {got[:12]}...): "
                          f"the corrupt file was deleted from the cache; run the pull again")


def _write_ref(repo_id: str, revision: str, commit: str) -> None:
    """refs/<branch> -> commit, so offline lookups by name find this snapshot (hf_hub_download skips it for hashes)."""
    if revision == commit:
        return
    ref = storage_folder(repo_id) / "refs" / revision
    ref.parent.mkdir(parents=True, exist_ok=True)
    if not ref.exists() or ref.read_text() != commit:
        ref.write_text(commit)


# ---------------------------------------------------------------- the cache

@dataclass
class LocalModel:
    repo_id: str
    quant: str | None
    fmt: str
    commit: str
    refs: tuple[str, ...]
    files: list[Path]
    size: int
    complete: bool

    @property
    def name(self) -> str:
        return f"{self.repo_id}:{self.quant}" if self.quant else self.repo_id

    @property
    def path(self) -> Path:
        return self.files[0] if self.fmt == "gguf" else self.files[0].parent


def _snapshot_files(snapshot: Path) -> list[str]:
    return sorted(p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file())


def _models_in_snapshot(repo_id: str, commit: str, refs: tuple[str, ...], snapshot: Path) -> list[LocalModel]:
    files = _snapshot_files(snapshot)
    fmt = repo_format(files)
    out = []
    if fmt == "gguf":
        for q in gguf_quants(files):
            try:
                quant, chosen = select_gguf(files, q, repo_id)
                complete = True
            except MoecliError:
                chosen, quant, complete = [f for f in files if quant_of(f) == q and _is_weights_gguf(f)], q, False
            paths = [snapshot / c for c in chosen]
            out.append(LocalModel(repo_id, quant, "gguf", commit, refs, paths,
                                  sum(p.stat().st_size for p in paths), complete))
    elif fmt == "safetensors":
        paths = [snapshot / f for f in select_safetensors(files)]
        complete = (snapshot / "config.json").exists()
        index = snapshot / "model.safetensors.index.json"
        if index.exists():
            import json

            try:
                named = set(json.loads(index.read_text()).get("weight_map", {}).values())
                complete = complete and all((snapshot / n).is_file() for n in named)
            except (ValueError, OSError):
                complete = False
        out.append(LocalModel(repo_id, None, "safetensors", commit, refs, paths,
                              sum(p.stat().st_size for p in paths), complete))
    return out


def local_models() -> list[LocalModel]:
    """Every model found in the HF cache's model repos (one entry per GGUF quant), newest revisions first."""
    root = cache_dir()
    if not root.is_dir():
        return []
    out = []
    for folder in sorted(root.glob("models--*")):
        repo_id = folder.name[len("models--"):].replace("--", "/", 1)
        refs: dict[str, list[str]] = {}
        for r in (folder / "refs").rglob("*") if (folder / "refs").is_dir() else []:
            if r.is_file():
                refs.setdefault(r.read_text().strip(), []).append(r.relative_to(folder / "refs").as_posix())
        snaps = [s for s in (folder / "snapshots").glob("*") if s.is_dir()] if (folder / "snapshots").is_dir() else []
        snaps.sort(key=lambda s: (s.name not in refs, -s.stat().st_mtime))
        for s in snaps:
            out.extend(_models_in_snapshot(repo_id, s.name, tuple(sorted(refs.get(s.name, []))), s))
    return out


def _from_cache(ref: ModelRef, revision: str) -> PullResult:
    folder = storage_folder(ref.repo_id)
    commit = revision
    ref_file = folder / "refs" / revision
    if ref_file.is_file():
        commit = ref_file.read_text().strip()
    snapshot = folder / "snapshots" / commit
    if not snapshot.is_dir():
        raise MoecliError(f"{ref.name} is not in the cache (offline): pull it while online with "
                          f"`moecli pull {ref.name}`")
    files = _snapshot_files(snapshot)
    fmt = repo_format(files)
    if fmt == "gguf":
        try:
            quant, chosen = select_gguf(files, ref.quant, ref.repo_id)
        except MoecliError as e:
            raise MoecliError(f"offline: {e} in the cache") from None
        return PullResult(ModelRef(ref.repo_id, quant), fmt, commit, [snapshot / c for c in chosen])
    if fmt == "safetensors":
        return PullResult(ref, fmt, commit, [snapshot / c for c in select_safetensors(files)])
    raise MoecliError(f"{ref.name}: the cached snapshot has no model files (offline)")


def resolve_local(name: str) -> Path:
    """A pulled model name -> its first GGUF shard or its snapshot directory, from the cache only (no network)."""
    models = [m for m in local_models() if m.complete]
    try:
        ref = parse_name(name)
    except MoecliError:
        ref = None
    if ref is not None:
        for m in _matches(models, ref):
            return m.path
    names = sorted({m.name for m in models})
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
    if not close:
        low = name.lower()
        close = [n for n in names if low in n.lower()][:3]
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise MoecliError(f"{name}: no such file, directory or pulled model{hint} "
                      f"(pull it with `moecli pull {name if ref else 'owner/repo:QUANT'}`, list with `moecli list`)")


def _matches(models: list[LocalModel], ref: ModelRef) -> list[LocalModel]:
    """Cached models a name means: same repo (case-insensitive, as on the hub); quant as given, else Q4_K_M, else
    the only one; prefer the snapshot `main` points to."""
    same = [m for m in models if m.repo_id.lower() == ref.repo_id.lower()]
    if ref.quant:
        return [m for m in same if (m.quant or "").upper() == ref.quant.upper()]
    if any(m.fmt == "safetensors" for m in same):
        return [m for m in same if m.fmt == "safetensors"]
    default = [m for m in same if m.quant == DEFAULT_QUANT]
    if default:
        return default
    return same if len({m.quant for m in same}) == 1 else []


def find_local(name: str) -> list[LocalModel]:
    """Every cached revision of a pulled model name (for `rm`): the named quant, or every model of the repo."""
    ref = parse_name(name)
    models = local_models()
    if ref.quant:
        return _matches(models, ref)
    return [m for m in models if m.repo_id.lower() == ref.repo_id.lower()]


def remove(models: list[LocalModel]) -> int:
    """Delete these models' files through huggingface_hub's cache API, one repo folder at a time; whole revisions
    when nothing else is in them. Returns the bytes freed.

    Never by a bare commit hash across the cache: `HFCacheInfo.delete_revisions` deletes the first repo it meets
    with that hash, and repos pushed with the same history (every repo of a mirror) share their commits."""
    from dataclasses import replace

    from huggingface_hub import scan_cache_dir

    wanted = {_link_path(p) for m in models for p in m.files}
    folders = {storage_folder(m.repo_id).resolve() for m in models}
    freed = 0
    for folder in sorted(folders):
        info = scan_cache_dir(cache_dir())
        repo = next((r for r in info.repos if r.repo_type == "model" and r.repo_path.resolve() == folder), None)
        if repo is None:
            continue
        only = replace(info, repos=frozenset([repo]))  # the strategies below see this repo and nothing else
        revisions, files = [], []
        for rev in repo.revisions:
            mine = [f for f in rev.files if _link_path(f.file_path) in wanted]
            if not mine:
                continue
            # Small side files (config, tokenizer) go with the model when nothing else needs them.
            others = [f for f in rev.files if f not in mine and _is_model_file(f.file_name, f.file_path)]
            if others:
                files.extend(mine)
            else:
                revisions.append(rev.commit_hash)
        if files:
            freed += _execute_inside(only.delete_files(*files), folder)
        if revisions:
            if files:  # the files just deleted are gone from this repo's view
                info = scan_cache_dir(cache_dir())
                repo = next(r for r in info.repos if r.repo_path.resolve() == folder)
                only = replace(info, repos=frozenset([repo]))
            freed += _execute_inside(only.delete_revisions(*revisions), folder)
    return freed


def _link_path(p: Path) -> Path:
    """A cache path with its folders resolved but not the file itself (snapshot entries are links to blobs)."""
    return p.parent.resolve() / p.name


def _execute_inside(strategy, folder: Path) -> int:
    """Run a deletion strategy only if every path it names lies inside this repo's folder."""
    paths = [*strategy.blobs, *strategy.refs, *strategy.repos, *strategy.snapshots, *strategy.files]
    outside = [p for p in paths if not _link_path(Path(p)).is_relative_to(folder)]
    if outside:
        raise MoecliError(f"refusing to delete {outside[0]}: it is outside {folder}")
    strategy.execute()
    return strategy.expected_freed_size


def _is_model_file(name: str, path: Path) -> bool:
    return name.endswith((".gguf", ".safetensors"))


# ---------------------------------------------------------------- formatting

def _fmt(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


fmt_bytes: Callable[[float], str] = _fmt
