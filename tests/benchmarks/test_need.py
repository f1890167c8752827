"""bench_harness.need: a benchmark skips only for an absent third-party package, never for a
missing or broken part of dmil_fast."""

import sys

import pytest

from bench_harness import need


def test_returns_the_module_or_its_attribute():
    assert need("dmil_fast.ops", "interaction_scores") is sys.modules["dmil_fast.ops"].interaction_scores
    assert need("dmil_fast.train") is sys.modules["dmil_fast.train"]


def test_an_absent_third_party_package_skips_saying_which(monkeypatch):
    monkeypatch.setitem(sys.modules, "absent_package", None)  # importing it raises ModuleNotFoundError
    with pytest.raises(pytest.skip.Exception, match="absent_package needs absent_package, which is not installed"):
        need("absent_package")


def test_a_missing_part_of_dmil_fast_is_an_error():
    with pytest.raises(ModuleNotFoundError, match="dmil_fast.no_such_module"):
        need("dmil_fast.no_such_module")
    with pytest.raises(AttributeError, match="no_such_op"):
        need("dmil_fast.ops", "no_such_op")
