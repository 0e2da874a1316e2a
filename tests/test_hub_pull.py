"""`moecli pull/list/show/rm` with the real huggingface_hub client against tests/hub_server.py on 127.0.0.1."""
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from gguf import GGUFWriter

sys.path.insert(0, str(Path(__file__).parent))
from hub_server import HubServer, tiny_moe_gguf  # noqa: E402

from moecli import hub  # noqa: E402
from moecli.errors import MoecliError  # noqa: E402

TOKEN = "hf_secretTOKENdoNotPrint0123456789"
MiB = 1 << 20


@pytest.fixture(scope="module")
def gguf_bytes(tmp_path_factory):
    d = tmp_path_factory.mktemp("gguf")
    out = {}
    for seed in (0, 1):
        tiny_moe_gguf(d / f"m{seed}.gguf", seed=seed)
        out[seed] = (d / f"m{seed}.gguf").read_bytes()
    # Shards 2 and 3 of a split GGUF: valid GGUF files holding only split metadata.
    for i in (2, 3):
        w = GGUFWriter(str(d / f"s{i}.gguf"), "llama")
        w.add_uint16("split.no", i - 1)
        w.add_uint16("split.count", 3)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        out[f"s{i}"] = (d / f"s{i}.gguf").read_bytes()
    return out


@pytest.fixture
def env(tmp_path, monkeypatch):
    """Environment for CLI subprocesses and direct calls: HF cache under tmp, no token, online."""
    e = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    e.update(HF_HOME=str(tmp_path / "hf"), HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_ETAG_TIMEOUT="5",
             HF_HUB_DOWNLOAD_TIMEOUT="5", COLUMNS="250")
    for k in [k for k in os.environ if k.startswith("HF_")]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("HF_HOME", e["HF_HOME"])
    return e


def cli(env, *args, timeout=60):
    return subprocess.run([sys.executable, "-m", "moecli", *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def one_error(proc, pattern):
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1, proc.stderr
    assert pattern in lines[0], lines[0]
    return lines[0]


def serve(server, env, monkeypatch):
    env["HF_ENDPOINT"] = server.url
    monkeypatch.setenv("HF_ENDPOINT", server.url)


def cache_files(env):
    return sorted(p.relative_to(env["HF_HOME"]).as_posix() for p in Path(env["HF_HOME"]).rglob("*") if p.is_file())


def gguf_repo(g):
    return {"M-Q4_K_M.gguf": g[0], "M-Q8_0.gguf": g[1], "mmproj-M-F16.gguf": g[1], "README.md": b"# M\n",
            "config.json": b"{}"}


def test_pull_gguf_by_quant_then_list_show_resolve(gguf_bytes, env, monkeypatch):
    with HubServer({"org/M-GGUF": gguf_repo(gguf_bytes)}) as s:
        serve(s, env, monkeypatch)
        p = cli(env, "pull", "org/M-GGUF")  # default Q4_K_M
        assert p.returncode == 0, p.stderr
        assert "org/M-GGUF:Q4_K_M" in p.stdout and "Traceback" not in p.stderr
        assert set(s.served) == {"M-Q4_K_M.gguf"}  # no other quant, no mmproj, no README
        path = Path(p.stdout.strip().splitlines()[-1])
        assert path.read_bytes() == gguf_bytes[0]
        assert str(path).startswith(env["HF_HOME"] + "/hub/models--org--M-GGUF/snapshots/")
        assert path.is_symlink()  # the HF cache layout: snapshot link -> blobs/<sha256>
        assert path.resolve().name == hashlib.sha256(gguf_bytes[0]).hexdigest()

        p = cli(env, "pull", "hf.co/org/M-GGUF:q8_0")  # case-insensitive tag, hf.co/ prefix
        assert p.returncode == 0, p.stderr
        assert "org/M-GGUF:Q8_0" in p.stdout and s.served["M-Q8_0.gguf"] == len(gguf_bytes[1])

        again = cli(env, "pull", "org/M-GGUF:Q4_K_M")
        assert again.returncode == 0 and "already up to date" in again.stdout
        assert s.served["M-Q4_K_M.gguf"] == len(gguf_bytes[0])  # nothing downloaded twice

    listing = cli(env, "list")
    assert listing.returncode == 0
    rows = [l.split() for l in listing.stdout.splitlines()[1:]]
    assert [r[:3] for r in rows] == [["org/M-GGUF:Q4_K_M", "gguf", "Q4_K_M"], ["org/M-GGUF:Q8_0", "gguf", "Q8_0"]]

    shown = cli(env, "show", "org/M-GGUF:Q8_0")  # offline: the server is gone
    assert shown.returncode == 0, shown.stderr
    out = shown.stdout
    # 2 layers x 4 experts x 3 x (64 x 32) = 49152 expert parameters; top-2 of 4 -> half of them active.
    assert "llama" in out and "4 per layer, top-2" in out and "49.15K expert parameters" in out
    assert "Q8_0" in out and "F16" in out and "F32" in out and "fits in RAM" in out

    assert hub.resolve_local("org/M-GGUF").name == "M-Q4_K_M.gguf"
    assert hub.resolve_local("hf.co/org/M-GGUF:q8_0").name == "M-Q8_0.gguf"
    with pytest.raises(MoecliError, match=r"did you mean org/M-GGUF:Q8_0.*moecli pull"):
        hub.resolve_local("org/M-GGUF:Q8_1")
    from moecli.resolve import resolve_model
    assert resolve_model("org/M-GGUF:Q8_0").name == "M-Q8_0.gguf"


def test_show_numbers_match_checkpoint(gguf_bytes, tmp_path):
    from moecli.cli.pull import summarize
    from moecli.models.loader import load_checkpoint

    f = tmp_path / "m.gguf"
    f.write_bytes(gguf_bytes[0])
    s = summarize(load_checkpoint(f))
    n_embd, n_ff, n_e, n_layer, n_vocab = 64, 32, 4, 2, 96
    experts = n_layer * n_e * 3 * n_embd * n_ff
    attn = n_layer * (n_embd * 64 + 2 * n_embd * 32 + 64 * n_embd + 2 * n_embd + n_e * n_embd)
    total = experts + attn + 2 * n_vocab * n_embd + n_embd
    assert (s["params_total"], s["expert_params"]) == (total, experts)
    assert s["params_active"] == total - experts // 2
    assert abs(sum(share for _, _, share in s["quant_mix"]) - 1) < 1e-9
    assert {k for k, _, _ in s["quant_mix"]} == {"Q8_0", "F16", "F32"}


def test_split_shards_in_quant_folder(gguf_bytes, env, monkeypatch):
    g = gguf_bytes
    files = {f"Q4_K_M/M-Q4_K_M-0000{i}-of-00003.gguf": b for i, b in ((1, g[0]), (2, g["s2"]), (3, g["s3"]))}
    files.update({f"Q8_0/M-Q8_0-0000{i}-of-00002.gguf": g[1] for i in (1, 2)})
    with HubServer({"org/Big-GGUF": files, "org/Broken-GGUF": {"M-Q4_K_M-00001-of-00002.gguf": g[0]}}) as s:
        serve(s, env, monkeypatch)
        p = cli(env, "pull", "org/Big-GGUF:Q4_K_M")
        assert p.returncode == 0, p.stderr
        assert sorted(s.served) == sorted(f for f in files if f.startswith("Q4_K_M/"))
        assert p.stdout.strip().endswith("Q4_K_M/M-Q4_K_M-00001-of-00003.gguf")
        one_error(cli(env, "pull", "org/Broken-GGUF"), "lacks 1 of its 2 shards")
    assert hub.resolve_local("org/Big-GGUF").name == "M-Q4_K_M-00001-of-00003.gguf"
    shown = cli(env, "show", "org/Big-GGUF")
    assert shown.returncode == 0 and "4 per layer, top-2" in shown.stdout, shown.stderr


def test_safetensors_repo_takes_only_what_the_model_needs(env, monkeypatch):
    index = {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors",
                                            "b": "model-00002-of-00002.safetensors"}}
    want = {"config.json": b'{"model_type": "qwen3_moe"}', "generation_config.json": b"{\"g\": 1}",
            "model.safetensors.index.json": json.dumps(index).encode(),
            "model-00001-of-00002.safetensors": b"A" * 5000, "model-00002-of-00002.safetensors": b"B" * 3000,
            "tokenizer.json": b"{\"t\": 1}", "tokenizer_config.json": b"{\"c\": 1}", "chat_template.jinja": b"{{ x }}"}
    skip = {"pytorch_model.bin": b"x" * 100, "model.onnx": b"o", "flax_model.msgpack": b"m", "README.md": b"r",
            "consolidated.safetensors": b"C" * 900, "original/consolidated.00.pth": b"p", "onnx/model.onnx": b"o"}
    with HubServer({"org/Moe": {**want, **skip}}) as s:
        serve(s, env, monkeypatch)
        p = cli(env, "pull", "org/Moe")
        assert p.returncode == 0, p.stderr
        assert set(s.served) == set(want)
        snap = Path(p.stdout.strip().splitlines()[-1])
        assert sorted(x.name for x in snap.iterdir()) == sorted(want)
        one_error(cli(env, "pull", "org/Moe:Q4_K_M"), "safetensors repo")
    assert hub.resolve_local("org/Moe") == snap
    assert "safetensors" in cli(env, "list").stdout


def big_repo():
    # Bigger than huggingface_hub's 10 MiB download chunk, so an interrupted transfer leaves bytes on disk.
    data = os.urandom(10 * MiB) + bytes(range(256)) * (14 * MiB // 256)
    return data, {"config.json": b'{"model_type": "qwen3_moe"}', "model.safetensors": data}


def test_transfer_cut_mid_file_resumes_with_range(env, monkeypatch):
    data, files = big_repo()
    with HubServer({"org/Big": files}) as s:
        serve(s, env, monkeypatch)
        s.cut["model.safetensors"] = [15 * MiB]  # the connection drops once, after 15 MiB
        p = cli(env, "pull", "org/Big")
        assert p.returncode == 0, p.stderr
        ranges = [v for m, _, h in s.requests if m == "GET" for k, v in h.items() if k.lower() == "range"]
        assert len(ranges) == 1 and ranges[0].startswith("bytes=")
        offset = int(ranges[0][6:].split("-")[0])
        assert 0 < offset <= 15 * MiB
        assert s.served["model.safetensors"] == 15 * MiB + len(data) - offset  # only the remainder again
    blob = Path(p.stdout.strip().splitlines()[-1]) / "model.safetensors"
    assert hashlib.sha256(blob.read_bytes()).digest() == hashlib.sha256(data).digest()


def test_interrupted_pull_resumes_in_next_run(env, monkeypatch):
    data, files = big_repo()
    with HubServer({"org/Big": files}) as s:
        serve(s, env, monkeypatch)
        s.stall["model.safetensors"] = 21 * MiB  # send 21 MiB, then hang: the user presses Ctrl-C
        # SIG_DFL: a shell may start the tests with SIGINT ignored, and Python keeps an ignored SIGINT ignored.
        proc = subprocess.Popen([sys.executable, "-m", "moecli", "pull", "org/Big"], text=True,
                                env=dict(env, HF_HUB_DOWNLOAD_TIMEOUT="60"), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        assert s.stalled.wait(30)
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 130 and "Traceback" not in err and "again to resume" in err
        parts = list(Path(env["HF_HOME"]).rglob("*.incomplete"))
        assert len(parts) == 1 and parts[0].stat().st_size > 0
        kept = parts[0].stat().st_size
        assert data[:kept] == parts[0].read_bytes()
        assert not list(Path(env["HF_HOME"]).rglob("snapshots/*/model.safetensors"))  # no partial "good" file
        s.release()
        s.served.clear()
        p = cli(env, "pull", "org/Big")
        assert p.returncode == 0, p.stderr
        assert s.served["model.safetensors"] == len(data) - kept  # the second run fetched only the remainder
    assert not list(Path(env["HF_HOME"]).rglob("*.incomplete"))
    out = Path(p.stdout.strip().splitlines()[-1]) / "model.safetensors"
    assert out.read_bytes() == data


def test_corrupt_download_is_detected_and_deleted(gguf_bytes, env, monkeypatch):
    with HubServer({"org/M-GGUF": gguf_repo(gguf_bytes)}) as s:
        serve(s, env, monkeypatch)
        s.corrupt.add("M-Q4_K_M.gguf")
        one_error(cli(env, "pull", "org/M-GGUF"), "SHA-256 mismatch")
        assert not [f for f in cache_files(env) if "/blobs/" in f or "/snapshots/" in f]
        assert "no pulled models" in cli(env, "list").stdout
        with pytest.raises(MoecliError):
            hub.resolve_local("org/M-GGUF")
        s.corrupt.clear()
        assert cli(env, "pull", "org/M-GGUF").returncode == 0  # a retry gets a good copy


def test_missing_repo_file_quant_revision(gguf_bytes, env, monkeypatch):
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    with HubServer({"org/M-GGUF": gguf_repo(gguf_bytes),
                    "org/NoShard": {"config.json": b"{}", "model.safetensors.index.json": json.dumps(index).encode(),
                                    "model-00001-of-00002.safetensors": b"x"},
                    "org/Text": {"README.md": b"no weights"}}) as s:
        serve(s, env, monkeypatch)
        one_error(cli(env, "pull", "org/Nope-GGUF"), "no such model repo on the hub")
        line = one_error(cli(env, "pull", "org/M-GGUF:IQ2_XXS"), "has no IQ2_XXS GGUF")
        assert "available quants: Q4_K_M, Q8_0" in line
        one_error(cli(env, "pull", "org/M-GGUF", "--revision", "v9"), "has no revision 'v9'")
        one_error(cli(env, "pull", "org/NoShard"), "model-00002-of-00002.safetensors")
        one_error(cli(env, "pull", "org/Text"), "neither GGUF nor safetensors")
        s.missing.add("M-Q8_0.gguf")  # listed, but the file itself is gone
        one_error(cli(env, "pull", "org/M-GGUF:Q8_0"), "file not found on the hub")
        # Bad flag values and names.
        one_error(cli(env, "pull", "org/M-GGUF", "--revision", "../../x"), "not a revision")
        one_error(cli(env, "pull", "not a name"), "not a model name")
        one_error(cli(env, "pull", "org/M-GGUF:Q4;rm"), "not a quant tag")


def test_offline_mode_and_unreachable_hub(gguf_bytes, env, monkeypatch):
    with HubServer({"org/M-GGUF": gguf_repo(gguf_bytes)}) as s:
        serve(s, env, monkeypatch)
        assert cli(env, "pull", "org/M-GGUF").returncode == 0
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    env["HF_ENDPOINT"] = dead
    p = cli(env, "pull", "org/M-GGUF", "--offline")
    assert p.returncode == 0 and "from the cache" in p.stdout, p.stderr
    one_error(cli(env, "pull", "org/Other-GGUF", "--offline"), "not in the cache")
    one_error(cli(env, "pull", "org/M-GGUF:Q8_0", "--offline"), "has no Q8_0")
    one_error(cli(env, "pull", "org/M-GGUF"), "--offline")  # network unreachable: the hint
    env["HF_HUB_OFFLINE"] = "1"
    assert cli(env, "pull", "org/M-GGUF").returncode == 0
    assert cli(env, "show", "org/M-GGUF").returncode == 0


@pytest.mark.parametrize("bad", ["../../evil-Q4_K_M.gguf", "/etc/evil-Q4_K_M.gguf", "sub\\..\\evil-Q4_K_M.gguf",
                                 "a/../../evil.gguf", "C:/evil.gguf"])
def test_path_traversal_refused(gguf_bytes, env, monkeypatch, bad):
    with pytest.raises(MoecliError, match="unsafe file name"):
        hub.safe_repo_path(bad)
    with HubServer({"org/Evil-GGUF": {bad: gguf_bytes[0], "M-Q8_0.gguf": gguf_bytes[1]}}) as s:
        serve(s, env, monkeypatch)
        one_error(cli(env, "pull", "org/Evil-GGUF:Q8_0"), "unsafe file name")
        assert not s.served  # nothing was downloaded at all
    root = Path(env["HF_HOME"]).parent
    assert not list(root.rglob("evil*"))


@pytest.mark.parametrize("bad", ["../x", "org/../x", "a/b/c", "org/x:../../q", "org--x/y", "", "hf.co/"])
def test_bad_names(bad):
    with pytest.raises(MoecliError):
        hub.parse_name(bad)


def test_gated_repo_and_token_never_printed(gguf_bytes, env, monkeypatch):
    with HubServer({"org/Gated-GGUF": gguf_repo(gguf_bytes)}) as s:
        serve(s, env, monkeypatch)
        s.gated.add("org/Gated-GGUF")
        s.tokens["org/Gated-GGUF"] = TOKEN
        one_error(cli(env, "pull", "org/Gated-GGUF"), "is gated")
        wrong = "hf_wrongTOKEN9876543210"
        p = cli(env, "pull", "org/Gated-GGUF", "--token", wrong)
        one_error(p, "no access")
        assert wrong not in p.stdout + p.stderr
        p = cli(env, "pull", "org/Gated-GGUF", "--token", TOKEN)
        assert p.returncode == 0, p.stderr
        assert TOKEN not in p.stdout + p.stderr
        assert any({k.lower(): v for k, v in h.items()}.get("authorization") == f"Bearer {TOKEN}"
                   for _, _, h in s.requests)
        s.served.clear()
        env2 = dict(env, HF_TOKEN=TOKEN)  # the environment variable works too
        p = cli(env2, "pull", "org/Gated-GGUF:Q8_0", "--verify")
        assert p.returncode == 0 and TOKEN not in p.stdout + p.stderr
    for f in Path(env["HF_HOME"]).rglob("*"):  # nor written anywhere in the cache
        if f.is_file() and f.stat().st_size < 10 * MiB:
            assert TOKEN.encode() not in f.read_bytes()


def test_rm_asks_and_removes_one_quant(gguf_bytes, env, monkeypatch):
    with HubServer({"org/M-GGUF": gguf_repo(gguf_bytes)}) as s:
        serve(s, env, monkeypatch)
        assert cli(env, "pull", "org/M-GGUF:Q4_K_M").returncode == 0
        assert cli(env, "pull", "org/M-GGUF:Q8_0").returncode == 0
    one_error(cli(env, "rm", "org/M-GGUF:Q8_0"), "pass -y")  # no terminal to confirm on
    one_error(cli(env, "rm", "org/M-GGUF:Q5_K_M"), "no such file, directory or pulled model")
    p = cli(env, "rm", "org/M-GGUF:Q8_0", "-y")
    assert p.returncode == 0 and "removed org/M-GGUF:Q8_0" in p.stdout, p.stderr
    blobs = Path(env["HF_HOME"]) / "hub/models--org--M-GGUF/blobs"
    assert sorted(b.name for b in blobs.iterdir()) == [hashlib.sha256(gguf_bytes[0]).hexdigest()]
    assert [m.name for m in hub.local_models()] == ["org/M-GGUF:Q4_K_M"]
    p = cli(env, "rm", "-y", "org/M-GGUF")
    assert p.returncode == 0, p.stderr
    assert hub.local_models() == []
    assert not (Path(env["HF_HOME"]) / "hub/models--org--M-GGUF/snapshots").exists() or not list(
        (Path(env["HF_HOME"]) / "hub/models--org--M-GGUF/snapshots").iterdir())


def test_rm_deletes_only_the_named_repo_when_repos_share_a_commit(gguf_bytes, env, monkeypatch):
    """Repos pushed with the same history share their commit hashes (every repo of a mirror): `rm` must delete by
    repo folder, never the first cached repo that has the hash."""
    names = ["org/A-GGUF", "org/B-GGUF", "org/C-GGUF", "org/D-GGUF"]
    with HubServer({n: gguf_repo(gguf_bytes) for n in names}) as s:
        assert len({r.sha for r in s.repos.values()}) == 1  # one commit for the four repos
        serve(s, env, monkeypatch)
        for n in names:
            for q in ("Q4_K_M", "Q8_0"):
                assert cli(env, "pull", f"{n}:{q}").returncode == 0
    hub_dir = Path(env["HF_HOME"]) / "hub"

    def snapshot(repo):
        folder = hub_dir / f"models--{repo.replace('/', '--')}"
        return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")) if folder.exists() else []

    before = {n: snapshot(n) for n in names}
    everything = sorted(m.name for m in hub.local_models())
    for victim in names:  # each repo in turn while the others stay: one quant (files), then the rest (revision)
        p = cli(env, "rm", "-y", f"{victim}:Q8_0")
        assert p.returncode == 0 and f"removed {victim}:Q8_0 " in p.stdout, p.stderr
        everything.remove(f"{victim}:Q8_0")
        assert sorted(m.name for m in hub.local_models()) == everything
        p = cli(env, "rm", "-y", victim)
        assert p.returncode == 0 and f"removed {victim}:Q4_K_M " in p.stdout, p.stderr
        everything.remove(f"{victim}:Q4_K_M")
        assert sorted(m.name for m in hub.local_models()) == everything
        assert snapshot(victim) == []
        for other in names[names.index(victim) + 1:]:
            assert snapshot(other) == before[other]  # not a byte of another repo touched
            path = hub.resolve_local(f"{other}:Q8_0")
            assert path.read_bytes() == gguf_bytes[1]


def test_rm_without_quant_removes_every_quant_of_the_repo(gguf_bytes, env, monkeypatch):
    with HubServer({"org/A-GGUF": gguf_repo(gguf_bytes), "org/B-GGUF": gguf_repo(gguf_bytes)}) as s:
        serve(s, env, monkeypatch)
        for q in ("Q4_K_M", "Q8_0"):
            assert cli(env, "pull", f"org/A-GGUF:{q}").returncode == 0
        assert cli(env, "pull", "org/B-GGUF:Q8_0").returncode == 0
    p = cli(env, "rm", "-y", "org/A-GGUF")
    assert p.returncode == 0 and "removed org/A-GGUF:Q4_K_M, org/A-GGUF:Q8_0 " in p.stdout, p.stderr
    assert [m.name for m in hub.local_models()] == ["org/B-GGUF:Q8_0"]


def test_rm_one_quant_keeps_the_same_quant_of_a_repo_sharing_the_commit(gguf_bytes, env, monkeypatch):
    with HubServer({"org/A-GGUF": gguf_repo(gguf_bytes), "org/B-GGUF": gguf_repo(gguf_bytes)}) as s:
        serve(s, env, monkeypatch)
        for n in ("org/A-GGUF", "org/B-GGUF"):
            assert cli(env, "pull", f"{n}:Q4_K_M").returncode == 0
        assert cli(env, "pull", "org/B-GGUF:Q8_0").returncode == 0
    # B's Q4_K_M is the only model in its revision apart from Q8_0: removing it removes files, not the revision;
    # A's revision (same hash) holds only Q4_K_M and must survive.
    p = cli(env, "rm", "-y", "org/B-GGUF:Q4_K_M")
    assert p.returncode == 0, p.stderr
    assert sorted(m.name for m in hub.local_models()) == ["org/A-GGUF:Q4_K_M", "org/B-GGUF:Q8_0"]
    p = cli(env, "rm", "-y", "org/B-GGUF:Q8_0")  # the last model of B: its whole revision, by B's folder
    assert p.returncode == 0, p.stderr
    assert [m.name for m in hub.local_models()] == ["org/A-GGUF:Q4_K_M"]
    assert hub.resolve_local("org/A-GGUF").read_bytes() == gguf_bytes[0]


def test_quant_selection_rules():
    files = ["a/M-Q4_K_M.gguf", "M-UD-Q4_K_XL-00001-of-00002.gguf", "M-UD-Q4_K_XL-00002-of-00002.gguf",
             "M-iq4_xs.gguf", "mmproj-F16.gguf", "M-BF16.gguf"]
    assert hub.gguf_quants(files) == ["BF16", "IQ4_XS", "Q4_K_M", "UD-Q4_K_XL"]
    assert hub.select_gguf(files, "ud-q4_k_xl")[1] == files[1:3]
    assert hub.select_gguf(files, None) == ("Q4_K_M", ["a/M-Q4_K_M.gguf"])
    with pytest.raises(MoecliError, match="available quants: BF16, IQ4_XS, Q4_K_M, UD-Q4_K_XL"):
        hub.select_gguf(files, "Q2_K", "org/M")
