"""benchmarks/bench_harness.py's grid and metrics on numbers chosen by hand."""

from types import SimpleNamespace

import pytest

import bench_harness  # benchmarks/, on sys.path by conftest.py


def _timed(median):
    return SimpleNamespace(stats=SimpleNamespace(stats=SimpleNamespace(median=median)), extra_info={})


def test_gpu_grid_keeps_shapes_up_to_the_cap_inclusive():
    grid = bench_harness.gpu_grid([256, 512])
    assert (2**20, 512) in grid  # 2**29 elements: exactly the cap (2 GiB in float32)
    assert bench_harness.gpu_grid([4, 8], rows=(2, 4), cap=16) == [(2, 4), (2, 8), (4, 4)]


def test_record_derives_the_rates_from_the_median():
    """1e-3 s per call: 2e9 bytes -> 2000 GB/s, half of a 4000 GB/s copy; 3e12 flops -> 3000 TFLOP/s;
    1000 samples -> 1e6 samples/s; extra floats rounded to 3 digits."""
    bench = _timed(1e-3)
    info = bench_harness.record(bench, nbytes=2e9, flops=3e12, items=1000, copy_gbps=4000.0, peak_mem_mb=1.23456)
    assert info == {"gbps": 2000.0, "copy_gbps": 4000.0, "fraction_of_copy_bw": 0.5, "tflops": 3000.0,
                    "samples_per_s": 1e6, "peak_mem_mb": 1.235}
    assert bench.extra_info == info
    untimed = bench_harness.record(SimpleNamespace(stats=None, extra_info={}), nbytes=2e9, copy_gbps=4000.0)
    assert untimed["gbps"] is None and untimed["fraction_of_copy_bw"] is None


def test_copy_bandwidth_counts_the_bytes_read_and_written(monkeypatch):
    """The CPU copies 2**24 float32 (64 MiB) each way: 2 * 2**26 bytes over the median round."""
    seconds = [0.5, 0.1, 0.3, 0.2, 0.4, 0.6, 0.7]  # median 0.4
    monkeypatch.setattr(bench_harness, "time_rounds", lambda fn, device, rounds: seconds)
    assert bench_harness.copy_bandwidth_gbps("cpu") == pytest.approx(2 * 2**24 * 4 / 0.4 / 1e9)


class _Pedantic(SimpleNamespace):
    """A stand-in for pytest-benchmark's fixture: pedantic() calls the function rounds x iterations times."""

    def pedantic(self, fn, *, rounds, iterations, warmup_rounds=0, setup=None):
        for _ in range(rounds * iterations):
            fn()


def test_cpu_measure_counts_the_page_faults_of_fresh_memory():
    """Each call maps 64 fresh anonymous pages and writes one byte into each: every write is a
    minor page fault, so at least 64 per call are counted (a little more from the interpreter)."""
    import mmap

    page = mmap.PAGESIZE

    def touch_fresh_pages():
        buf = mmap.mmap(-1, 64 * page)
        for i in range(64):
            buf[i * page] = 1
        buf.close()
        return 0

    bench = _Pedantic(extra_info={})
    bench_harness.measure(bench, touch_fresh_pages, "cpu")
    assert bench.extra_info["page_faults_per_call"] >= 64
    reused = bytearray(64 * page)  # touched once here, then only rewritten: no fault per call

    def rewrite():
        for i in range(64):
            reused[i * page] = 2
        return 0

    quiet = _Pedantic(extra_info={})
    bench_harness.measure(quiet, rewrite, "cpu")
    assert quiet.extra_info["page_faults_per_call"] < 64
