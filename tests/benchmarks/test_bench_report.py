"""benchmarks/bench_report.py (a run's
results, their JSON file and the speed-up summary) on hand-made benchmark records whose medians
are chosen so that every ratio is a round number."""

import json
from types import SimpleNamespace

import bench_report  # benchmarks/, on sys.path by conftest.py


def _benchmark(provider, median, *, op="gaussian_sample", shape="B=4096 E=256", **info):
    stats = SimpleNamespace(min=median, max=median, mean=median, median=median, stddev=0.0, rounds=5)
    return SimpleNamespace(name=f"{op}-{provider}", group="g", stats=SimpleNamespace(stats=stats, iterations=1),
                           extra_info=dict(op=op, variant="fwd", provider=provider, shape=shape,
                                           dtype="float32", device="cuda", **info))


def _log():
    log = bench_report.ResultLog()
    for provider, median in (("reference", 3e-3), ("compile", 2e-3), ("triton", 1e-3)):
        log.add(f"test[{provider}]", _benchmark(provider, median, gbps=10.0))
    log.add("untimed", SimpleNamespace(stats=None, name="x", group="g", extra_info={}))  # left out
    return log


def test_add_keeps_the_timed_benchmarks_only():
    log = _log()
    assert [r["extra_info"]["provider"] for r in log.records] == ["reference", "compile", "triton"]
    assert log.records[2]["stats"]["median"] == 1e-3 and log.records[2]["stats"]["iterations"] == 1
    assert log.devices() == ["cuda"]


def test_ratio_lines_give_each_provider_the_baselines_median_over_its_own():
    lines = _log().ratio_lines()
    triton = next(line for line in lines if " triton " in line)
    compile_ = next(line for line in lines if " compile " in line)
    assert "1.000 ms" in triton and "10.0 GB/s" in triton
    assert "3.00x" in triton and "2.00x" in triton  # reference / triton, compile / triton
    assert "1.50x" in compile_ and "1.00x" in compile_  # reference / compile, compile / compile


def test_ratio_lines_show_the_page_faults_per_call_where_counted():
    log = bench_report.ResultLog()
    log.add("test[reference]", _benchmark("reference", 3e-3, gbps=10.0, page_faults_per_call=2412.3))
    log.add("test[cpp]", _benchmark("cpp", 1e-3, gbps=30.0))
    lines = log.ratio_lines()
    assert lines[0].split()[-1] == "faults"
    assert next(line for line in lines if " reference " in line).split()[-1] == "2412"
    assert next(line for line in lines if " cpp " in line).split()[-1] == "3.00x"  # none counted: blank


def test_times_are_printed_in_their_unit():
    assert bench_report._fmt_time(1.5) == "1.500 s"
    assert bench_report._fmt_time(2.5e-3) == "2.500 ms"
    assert bench_report._fmt_time(5e-6) == "5.0 us"


def test_write_json_never_overwrites_an_earlier_file(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_report, "machine_description",
                        lambda: {"device": "Test GPU", "date": "2026-01-02T03:04:05+00:00", "commit": "abc"})
    log = _log()
    first, second = log.write_json(tmp_path), log.write_json(tmp_path)
    assert (first.name, second.name) == ("test-gpu-2026-01-02.json", "test-gpu-2026-01-02-2.json")
    payload = json.loads(second.read_text())
    assert payload["device"] == "Test GPU" and len(payload["benchmarks"]) == 3
    assert payload["benchmarks"][0]["stats"]["median"] == 3e-3


def test_the_commit_is_marked_dirty_when_tracked_files_differ(tmp_path, monkeypatch):
    """A fresh git repository stands in for the source tree: clean after its commit, dirty once a
    tracked file changes, unknown when DMIL_FAST_COMMIT names the commit instead."""
    import subprocess

    def git(*args):
        subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    git("init", "-q")
    (tmp_path / "bench_report.py").write_text("x = 1\n")
    git("add", "bench_report.py")
    git("commit", "-q", "-m", "one")
    monkeypatch.setattr(bench_report, "__file__", str(tmp_path / "bench_report.py"))
    monkeypatch.delenv("DMIL_FAST_COMMIT", raising=False)
    assert bench_report._git_dirty() is False
    (tmp_path / "untracked.txt").write_text("not part of the tree\n")
    assert bench_report._git_dirty() is False
    (tmp_path / "bench_report.py").write_text("x = 2\n")
    assert bench_report._git_dirty() is True
    monkeypatch.setenv("DMIL_FAST_COMMIT", "0123abc")
    assert bench_report._git_dirty() is None
