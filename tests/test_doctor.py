"""`moecli doctor --gpu --dry-run`: every stage of the GPU check on the CPU device, results saved as it goes."""
import json
import subprocess
import sys


def _cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "moecli", "doctor", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_gpu_dry_run_passes_every_stage_and_saves_them(tmp_path):
    out = tmp_path / "doctor.jsonl"
    r = _cli("--gpu", "--dry-run", "-o", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    recs = [json.loads(l) for l in out.read_text().splitlines()]
    stages = [x["stage"] for x in recs]
    assert stages == ["model", "logits", "graphs", "race", "speed", "memory", "done"] and all(x["ok"] for x in recs)
    graphs = next(x for x in recs if x["stage"] == "graphs")
    assert graphs["vs_torch"] < 1e-2 and not graphs["active"]  # the decode kernels ran (interpreter), eagerly
    race = next(x for x in recs if x["stage"] == "race")
    assert race["mismatches"] == 0 and race["trials"] > 0
    speed = next(x for x in recs if x["stage"] == "speed")
    assert {row["placement"] for row in speed["rows"]} >= {"llama-cpp", "hybrimoe"}
    assert all(row["syncs_per_token"] > 0 and row["ms_per_layer"] > 0 for row in speed["rows"])
    mem = next(x for x in recs if x["stage"] == "memory")
    assert all(row["used_slots"] == row["planned_slots"] for row in mem["rows"])
    assert len(r.stdout.splitlines()) == len(recs)  # one line per record


def test_doctor_refuses_clearly():
    r = _cli()
    assert r.returncode != 0 and r.stderr.startswith("error:") and "--gpu" in r.stderr
    r = _cli("--gpu", "--device", "cpu")
    assert r.returncode != 0 and r.stderr.startswith("error:") and "--dry-run" in r.stderr
