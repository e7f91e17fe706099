"""CPU smoke of the GPU reliability scripts (benchmarks/soak.py, benchmarks/stress.py): both run
as subprocesses, at the same time, with tiny arguments on backend "xla" over 2 virtual CPU
devices (JAX_PLATFORMS=cpu, also on GPU hosts), exit 0 and write their JSON. The driver of the
native kernel harness (benchmarks/ep_harness.py) runs against a numpy stand-in of its binary."""
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


def test_ep_harness_driver(tmp_path):
    """benchmarks/ep_harness.py writes each case, runs the binary it is given and compares every
    output with the numpy model: with tests/ep_harness_model.py as the binary the cases pass,
    and one corrupted combine value fails the run (exit 1) naming the case and the output."""
    model = Path(__file__).resolve().parent / "ep_harness_model.py"
    cmd = [sys.executable, str(BENCH / "ep_harness.py"), "--binary", str(model), "--out",
           str(tmp_path), "--only", "1", "--only", "7", "--only", "11"]
    good = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert good.returncode == 0, good.stdout[-4000:] + good.stderr[-4000:]
    assert "3 of 3 passed" in good.stdout
    rows = json.loads((tmp_path / "ep_harness.json").read_text())["rows"]
    assert [r["case"] for r in rows] == [1, 7, 11] and not any(r["error"] for r in rows)
    env = dict(os.environ, JAX_EP_BREAK_COMBINE="1")
    bad = subprocess.run(cmd[:-4] + ["--only", "7"], capture_output=True, text=True, env=env,
                         timeout=300)
    assert bad.returncode == 1 and "combine rank 0" in bad.stdout, bad.stdout[-4000:]
