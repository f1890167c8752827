"""``dmil-fast info``: what it reports matches what the dispatcher decides here."""

import json
import subprocess
import sys

import torch

from dmil_fast import info
from dmil_fast.ops import _dispatch


def test_the_json_report_gives_the_float32_backends_of_each_op():
    report = json.loads(subprocess.run([sys.executable, "-m", "dmil_fast.info", "--json"], capture_output=True,
                                       text=True, check=True, timeout=300).stdout)
    cpu = report["ops"]["interaction_scores"]["cpu"]
    assert cpu["reference"] is None
    if _dispatch.extension_status() is None:
        assert report["extension"] == "loaded" and cpu["cpp"] is None  # the C++ kernel runs float32 CPU tensors
    for op in ("gaussian_sample", "diagonal_gaussian_kl", "variational_bottleneck"):
        assert report["ops"][op]["cpu"]["cpp"] == f"{op} has no C++ kernel"
    assert "float32" in info.format_report(report)
    assert report["torch"] == torch.__version__


def test_a_backend_variable_that_names_no_backend_is_flagged(monkeypatch):
    monkeypatch.setenv("DMIL_FAST_BACKEND", "bogus")
    report = info.collect()
    assert "bogus" in report["backend_env_problem"] and "every op refuses" in report["backend_env_problem"]
    assert "backend_env_problem" in info.format_report(report)
    monkeypatch.setenv("DMIL_FAST_BACKEND", "cpp")
    assert "backend_env_problem" not in info.collect()


def test_the_cpu_kernel_clone_reported_is_the_one_the_variable_names(monkeypatch):
    if _dispatch.extension_status() is not None:
        assert info.collect()["cpu_kernel_isa"] is None
        return
    from dmil_fast import _C

    isas = _C.cpu_kernel_isas()
    monkeypatch.delenv("DMIL_FAST_CPU_ISA", raising=False)
    assert info.collect()["cpu_kernel_isa"].startswith(f"{isas[0]} (this CPU runs {', '.join(isas)})")
    monkeypatch.setenv("DMIL_FAST_CPU_ISA", "portable")
    assert info.collect()["cpu_kernel_isa"].startswith("portable (")
    monkeypatch.setenv("DMIL_FAST_CPU_ISA", "sse9")
    assert "'sse9' is not one of them" in info.collect()["cpu_kernel_isa"]
