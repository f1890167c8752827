"""benchmarks/bench_targets.py: the targets judged on a hand-written results file whose ratios are
known in advance (medians chosen so that every ratio is a round number)."""

import json

import pytest

import bench_targets  # benchmarks/, on sys.path by conftest.py


def _record(op, variant, provider, shape, device, median, dtype="float32", **info):
    return {"name": f"{op}-{provider}", "stats": {"median": median},
            "extra_info": dict(op=op, variant=variant, provider=provider, shape=shape, dtype=dtype,
                               device=device, **info)}


def _payload():
    return {"device": "Test GPU", "commit": "0123456789abcdef", "benchmarks": [
        # CPU scoring: 3.00x (met, the goal is inclusive) and 2.00x (not met)
        _record("interaction_scores", "fwd", "reference", "B=4096 C=6", "cpu", 3e-3),
        _record("interaction_scores", "fwd", "cpp", "B=4096 C=6", "cpu", 1e-3),
        _record("interaction_scores", "fwd+bwd", "reference", "B=4096 C=6", "cpu", 2e-3),
        _record("interaction_scores", "fwd+bwd", "cpp", "B=4096 C=6", "cpu", 1e-3),
        # bandwidth: only the largest shape counts
        _record("gaussian_sample", "fwd", "triton", "B=4096 E=256", "cuda", 1e-5, fraction_of_copy_bw=0.5),
        _record("gaussian_sample", "fwd", "triton", "B=1048576 E=256", "cuda", 1e-3, dtype="bfloat16",
                fraction_of_copy_bw=0.9),
        _record("gaussian_sample", "fwd", "reference", "B=1048576 E=256", "cuda", 4e-3, dtype="bfloat16",
                fraction_of_copy_bw=0.2),
        # DMIL step: 2.5x eager, 1.5x compile, activation memory 60% of eager (met: at most)
        _record("dmil_step", "stage1 identity", "reference", "B=4096", "cuda", 10e-3, activation_mem_mb=100.0),
        _record("dmil_step", "stage1 identity", "compile", "B=4096", "cuda", 6e-3, activation_mem_mb=70.0),
        _record("dmil_step", "stage1 identity", "dmil_fast", "B=4096", "cuda", 4e-3, activation_mem_mb=60.0),
        # not timed (--benchmark-disable): left out
        {"name": "x", "stats": None, "extra_info": {"op": "interaction_scores", "provider": "cuda"}},
    ]}


def _rows():
    return bench_targets.target_rows(bench_targets.read_results(_payload()))


def _find(rows, target, case_part):
    found = [r for r in rows if r.target == target and case_part in r.case]
    assert len(found) == 1, (target, case_part, [r.case for r in rows if r.target == target])
    return found[0]


def test_cpu_scoring_ratios_and_verdicts():
    rows = _rows()
    fwd = _find(rows, "CPU C++ scoring", "fwd cpu")
    both = _find(rows, "CPU C++ scoring", "fwd+bwd cpu")
    assert fwd.measured == pytest.approx(3.0) and fwd.met is True
    assert both.measured == pytest.approx(2.0) and both.met is False


def test_bandwidth_takes_the_fused_kernel_at_the_largest_shape():
    rows = [r for r in _rows() if r.target.startswith("memory-bound") and r.case.startswith("gaussian")]
    assert len(rows) == 1
    assert rows[0].measured == pytest.approx(0.9) and rows[0].met is True
    assert "B=1048576" in rows[0].case and "triton" in rows[0].case


def test_dmil_step_speedups_and_activation_memory():
    rows = _rows()
    eager = _find(rows, "DMIL training step", "vs reference")
    comp = _find(rows, "DMIL training step", "vs compile")
    memory = _find(rows, "DMIL step activation memory vs eager", "stage1")
    assert eager.measured == pytest.approx(2.5) and eager.met is True
    assert comp.measured == pytest.approx(1.5) and comp.met is True
    assert memory.measured == pytest.approx(0.6) and memory.met is True


def test_targets_without_results_are_reported_as_not_measured():
    rows = _rows()
    missing = [r for r in rows if r.target == "interaction scoring (GPU)"]
    assert missing and all(r.measured is None and r.met is None for r in missing)
    assert {r.goal for r in missing} == {5.0, 1.5}


def test_command_line_prints_the_table(tmp_path, capsys):
    path = tmp_path / "run.json"
    path.write_text(json.dumps(_payload()))
    assert bench_targets.main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "run.json (Test GPU, commit 0123456)" in out
    assert "| CPU C++ scoring | interaction_scores fwd cpu float32 B=4096 C=6: cpp vs reference | 3.00x | >= 3x | met |" in out
    assert "| 90.0% | >= 85% | met |" in out
    assert "not measured" in out  # the GPU scoring and VB epilogue targets


def test_command_line_names_an_unreadable_file(tmp_path, capsys):
    assert bench_targets.main([str(tmp_path / "missing.json")]) == 2
    assert "missing.json" in capsys.readouterr().err


def test_a_file_that_is_not_a_results_object_is_named(tmp_path, capsys):
    path = tmp_path / "list.json"
    path.write_text("[1, 2]\n")
    assert bench_targets.main([str(path)]) == 2
    err = capsys.readouterr().err
    assert "list.json is not a results file" in err and "Traceback" not in err


def _scoring(shape, medians, **info):
    return [_record("interaction_scores", "fwd", provider, shape, "cuda", median, **info)
            for provider, median in zip(("reference", "compile", "cuda"), medians)]


def test_only_the_cases_marked_target_are_judged_when_the_file_records_the_mark():
    """A run of the whole grid (--all) also times small, launch-bound shapes; judged like a
    ``-m target`` run, only the marked large cases count (here 6x and 2x: met; the unmarked B=256
    case at 1.2x and 0.8x would read as NOT met)."""
    payload = {"benchmarks": _scoring("B=1048576 C=6", (6e-3, 2e-3, 1e-3), target=True)
               + _scoring("B=256 C=6", (12e-6, 8e-6, 10e-6), target=False)
               + [_record("gaussian_sample", "fwd", "triton", "B=1048576 E=256", "cuda", 1e-3, target=True,
                          fraction_of_copy_bw=0.9),
                  _record("gaussian_sample", "fwd", "triton", "B=1048576 E=32", "cuda", 1e-4, target=False,
                          fraction_of_copy_bw=0.6)]}
    rows = [r for r in bench_targets.target_rows(bench_targets.read_results(payload)) if r.measured is not None]
    scoring = [r for r in rows if r.target == "interaction scoring (GPU)"]
    assert [(r.case.split(": ")[1], round(r.measured, 6)) for r in scoring] == [("cuda vs reference", 6.0),
                                                                                 ("cuda vs compile", 2.0)]
    assert all("B=1048576" in r.case for r in scoring)
    bandwidth = [r for r in rows if r.target.startswith("memory-bound")]
    assert [(r.case.split()[-2], r.measured) for r in bandwidth] == [("E=256:", 0.9)]


def test_without_the_mark_the_largest_shape_is_the_one_of_most_elements():
    """Older files carry no ``target`` field: every case is read, and the bandwidth target takes the
    shape of most elements (1M x 256 rather than 1M x 32 at the same row count)."""
    payload = {"benchmarks": [
        _record("gaussian_sample", "fwd", "triton", "B=1048576 E=32", "cuda", 1e-4, fraction_of_copy_bw=0.6),
        _record("gaussian_sample", "fwd", "triton", "B=1048576 E=256", "cuda", 1e-3, fraction_of_copy_bw=0.9),
        _record("gaussian_sample", "fwd", "triton", "B=131072 E=1024", "cuda", 1e-3, fraction_of_copy_bw=0.7)]}
    rows = [r for r in bench_targets.bandwidth_rows(bench_targets.read_results(payload)) if r.measured is not None]
    assert [(r.case.split()[-2], r.measured) for r in rows] == [("E=256:", 0.9)]


def test_every_target_has_the_goal_of_the_issue():
    """The goals of the issue "Benchmarks" (bench_targets' docstring), read off the placeholder
    rows of an empty run: each (target, baseline) once."""
    goals = {(r.target, r.case.split(" vs ")[-1] if " vs " in r.case else "", r.higher): r.goal
             for r in bench_targets.target_rows([])}
    assert goals == {
        ("memory-bound kernels, fraction of copy bandwidth", "", True): 0.85,
        ("VB epilogue fwd+bwd", "reference", True): 3.0,
        ("VB epilogue fwd+bwd", "compile", True): 1.25,
        ("interaction scoring (GPU)", "reference", True): 5.0,
        ("interaction scoring (GPU)", "compile", True): 1.5,
        ("DMIL training step", "reference", True): 2.0,
        ("DMIL training step", "compile", True): 1.3,
        ("DMIL step activation memory vs eager", "", False): 0.6,
        ("CPU C++ scoring", "reference", True): 3.0,
    }


def test_the_triton_scoring_kernel_is_judged_like_the_cuda_one():
    """interaction_scores has two fused GPU providers (cuda, triton): both get a bandwidth row and
    speed-up rows (4e-3 / 1e-3 = 4x eager, 2e-3 / 1e-3 = 2x compile)."""
    payload = {"benchmarks": [
        _record("interaction_scores", "fwd", p, "B=1048576 C=309", "cuda", med, fraction_of_copy_bw=bw)
        for p, med, bw in (("reference", 4e-3, 0.1), ("compile", 2e-3, 0.3), ("cuda", 1e-3, 0.9),
                           ("triton", 1e-3, 0.8))]}
    rows = bench_targets.target_rows(bench_targets.read_results(payload))
    bandwidth = [r for r in rows if r.target.startswith("memory-bound") and "interaction" in r.case]
    assert sorted((r.case.rsplit(": ", 1)[1], r.measured) for r in bandwidth) == [("cuda", 0.9), ("triton", 0.8)]
    triton = [r for r in rows if r.target == "interaction scoring (GPU)" and ": triton vs" in r.case]
    assert sorted((r.case.rsplit(" vs ", 1)[1], r.measured) for r in triton) == [("compile", 2.0), ("reference", 4.0)]


def test_the_summary_line_counts_met_and_unmeasured_rows():
    """Judged on _payload(): measured rows cpu fwd (met), cpu fwd+bwd (not met), bandwidth 90% (met),
    DMIL step vs eager and vs compile (met), activation memory (met): 5 of 6; the unmeasured ones
    are the placeholders of VB (2), GPU scoring (2) and the bandwidth of two ops (2): 6. (Two sets
    of rows, since 6 and 6 alone would not tell the two counts apart.)"""
    measured = [r for r in _rows() if r.measured is not None]
    text = bench_targets.markdown(bench_targets.with_unmeasured(measured), ["run.json"])
    assert text.splitlines()[-1] == "5 of 6 measured cases meet their goal; 6 not measured."
    # without the two CPU rows: 4 of 4 met, and the CPU target's placeholder makes 7 unmeasured
    gpu_only = [r for r in measured if r.target != "CPU C++ scoring"]
    text = bench_targets.markdown(bench_targets.with_unmeasured(gpu_only), ["run.json"])
    assert text.splitlines()[-1] == "4 of 4 measured cases meet their goal; 7 not measured."
