"""CPU smoke of the GPU reliability scripts (benchmarks/soak.py, benchmarks/stress.py): both run
as subprocesses, at the same time, with tiny arguments on backend "xla" over 2 virtual CPU
devices (JAX_PLATFORMS=cpu, also on GPU hosts), exit 0 and write their JSON."""
import json
import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
COMMON = ["--devices", "2", "--backend", "xla"]


def test_soak_and_stress_smoke(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    # compilation dominates these runs: LLVM -O0 halves it (results are checked all the same)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
    runs = {
        "soak": [*COMMON, "--calls", "20", "--inner", "10", "--sample-every", "10",
                 "--python-calls", "4", "--python-samples", "2"],
        "stress": [*COMMON, "--configs", "12", "--groups", "4"],
    }
    procs = {name: subprocess.Popen(
        [sys.executable, str(BENCH / f"{name}.py"), *argv, "--out", str(tmp_path / name)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        for name, argv in runs.items()}
    outs = {}
    try:
        for name, proc in procs.items():
            outs[name] = proc.communicate(timeout=300)[0]
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
    for name, proc in procs.items():
        assert proc.returncode == 0, f"{name} failed:\n{outs[name][-6000:]}"
        report = report_of(tmp_path / name)
        assert report["ok"] and report["num_devices"] == 2, outs[name][-3000:]
    soak = report_of(tmp_path / "soak")
    assert set(soak["families"]) == {"normal-token", "normal-expert", "ll-fp8"}
    assert all(f["check"]["last_equals_fresh"] for f in soak["families"].values())
    stress = report_of(tmp_path / "stress")
    assert sum(f["configs"] for f in stress["families"].values()) == 12
    assert not stress["failures"]


def report_of(folder):
    (path,) = folder.glob(f"{folder.name}_*_x2.json")
    return json.loads(path.read_text())
