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
