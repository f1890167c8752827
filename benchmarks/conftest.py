"""Benchmark session set-up: the copy-bandwidth fixture, result collection, the JSON export and
the ratio summary printed at the end.

- Results go to ``benchmarks/results/<device>-<date>.json`` when the session timed something on a
  GPU, or on any device with ``--bench-save``.
- The summary lists, per op / variant / device / dtype / shape, each provider's median time, its
  rate and its speed-up over ``reference`` and over ``compile``.
"""

from __future__ import annotations

from pathlib import Path

# On a CPU-only machine the project root's conftest.py has set TRITON_INTERPRET=1 (Triton kernels
# run under the interpreter); only untimed runs call them (bench_harness.provider_skip_reason).
import pytest

from bench_harness import copy_bandwidth_gbps
from bench_report import RESULTS

RESULTS_DIR = Path(__file__).resolve().parent / "results"
_JSON_PATH = pytest.StashKey[Path]()


def pytest_addoption(parser):
    group = parser.getgroup("dmil_fast benchmarks")
    group.addoption("--bench-save", action="store_true", default=False,
                    help="write benchmarks/results/<device>-<date>.json even without a GPU")
    group.addoption("--bench-results-dir", default=str(RESULTS_DIR),
                    help="directory of the JSON results (default: benchmarks/results)")


@pytest.fixture(scope="session")
def copy_bandwidth():
    """``gbps(device)``: the device's copy bandwidth (GB/s), measured once per session on first
    use by timing a large ``clone`` the way the benchmarks are timed (bench_harness)."""

    def gbps(device: str) -> float:
        if device not in RESULTS.copy_bandwidth_gbps:
            RESULTS.copy_bandwidth_gbps[device] = round(copy_bandwidth_gbps(device), 2)
        return RESULTS.copy_bandwidth_gbps[device]

    return gbps


@pytest.fixture(autouse=True)
def _collect_result(request):
    """After each benchmark, keep its stats and extra_info for the JSON file and the summary."""
    yield
    # funcargs is None when the session was interrupted during this test (its teardown then runs
    # at the session's end): nothing was timed to keep.
    benchmark = (getattr(request.node, "funcargs", None) or {}).get("benchmark")
    if benchmark is not None:
        # bench_targets.py judges only the cases marked ``target`` (bench_harness.target_marks)
        benchmark.extra_info["target"] = request.node.get_closest_marker("target") is not None
        RESULTS.add(request.node.nodeid, benchmark)


def _should_save(config) -> bool:
    return bool(RESULTS.records) and (config.getoption("bench_save") or "cuda" in RESULTS.devices())


def pytest_sessionfinish(session, exitstatus):
    config = session.config
    if _should_save(config):
        config.stash[_JSON_PATH] = RESULTS.write_json(Path(config.getoption("bench_results_dir")))


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not RESULTS.records:
        return
    tr = terminalreporter
    tr.section("dmil_fast speed-ups (median time; 'vs ref' = reference / provider, 'vs comp' = compile / provider)")
    if RESULTS.copy_bandwidth_gbps:
        measured = ", ".join(f"{d}: {g:.1f} GB/s" for d, g in sorted(RESULTS.copy_bandwidth_gbps.items()))
        tr.write_line(f"copy bandwidth (large-tensor copy, bench_harness.copy_bandwidth_gbps): {measured}")
    for line in RESULTS.ratio_lines():
        tr.write_line(line)
    path = config.stash.get(_JSON_PATH, None)
    if path is not None:
        tr.write_line(f"results saved to {path}")
