"""benchmarks/gpu_run.sh, the one-run GPU check, exercised on a CPU-only machine: its benchmark
phase runs the CPU target cases (a slice of them), saves their JSON and judges it, and says that
the GPU-only session selected nothing. Here so that the script cannot rot between GPU runs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_run.sh"

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(),
    reason="on a GPU machine the script runs the real GPU benchmarks: run it directly")


def _run(out, *phases, **env):
    # Not the PYTEST_XDIST_* variables of a worker running this test: the script's pytest would
    # take itself for an xdist worker, and pytest-benchmark then disables every benchmark.
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}
    full_env.update(PYTHON=sys.executable, **env)
    return subprocess.run(["bash", str(SCRIPT), str(out), *phases], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=600)


def test_bench_phase_saves_results_and_judges_them(tmp_path):
    out = tmp_path / "gpu-run"
    out.mkdir()
    stale = out / "earlier-run.json"  # a results file of an earlier run in a reused OUT_DIR: not judged
    stale.write_text(json.dumps({"device": "old", "commit": "feedbee", "benchmarks": []}))
    done = _run(out, "bench", GPU_RUN_KEYWORDS="fwd-cpu-float32-B4096xC6",
                GPU_RUN_ACT_ARGS="--batch 16 --embed 8", DMIL_FAST_COMMIT="0123abc")
    # The ops session ran the selected CPU target cases; the DMIL-step/LSMI session, whose target
    # cases are all on the GPU, selected nothing: one failed phase, said as such.
    assert done.returncode == 1, done.stdout + done.stderr
    assert "bench step: no test selected" in done.stdout
    results = [p for p in out.glob("*.json") if p != stale]
    assert len(results) == 1, sorted(p.name for p in out.iterdir())
    payload = json.loads(results[0].read_text())
    assert payload["commit"] == "0123abc"  # named by the caller: the GPU's copy of the tree has no .git
    providers = {r["extra_info"]["provider"] for r in payload["benchmarks"]}
    assert providers == {"reference", "cpp"}
    table = (out / "targets.md").read_text()
    assert "interaction_scores fwd cpu float32 B=4096 C=6: cpp vs reference" in table
    assert "not measured" in table  # every GPU target
    assert results[0].name in table and stale.name not in table
    assert {"bench-ops.log", "bench-step.log", "targets.md"} <= {p.name for p in out.iterdir()}
    # The activation-memory table follows the step session's log, one row per stage.
    step_log = (out / "bench-step.log").read_text()
    assert "activation memory kept for the backward, B=16" in step_log
    assert all(f"| {stage} |" in step_log for stage in (1, 2, 3))
    assert len([p for p in out.iterdir() if p != stale]) <= 8


def test_by_default_the_benchmark_sessions_leave_the_cpu_cases_out(tmp_path):
    out = tmp_path / "gpu-run"
    done = _run(out, "bench", GPU_RUN_ACT_ARGS="--batch 16 --embed 8")
    assert "bench ops: no test selected" in done.stdout and "bench step: no test selected" in done.stdout
    assert not list(out.glob("*.json"))


def test_unknown_phase_is_refused(tmp_path):
    done = _run(tmp_path / "out", "benchmark")
    assert done.returncode == 64
    assert "unknown phase 'benchmark'" in done.stderr


def test_output_directory_is_required():
    done = subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode != 0
    assert "usage" in done.stderr
