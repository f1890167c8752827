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
