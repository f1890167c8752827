"""``dmil-fast info``: what it reports matches what the dispatcher decides here."""

from dmil_fast import info


def test_a_backend_variable_that_names_no_backend_is_flagged(monkeypatch):
    monkeypatch.setenv("DMIL_FAST_BACKEND", "bogus")
    report = info.collect()
    assert "bogus" in report["backend_env_problem"] and "every op refuses" in report["backend_env_problem"]
    assert "backend_env_problem" in info.format_report(report)
    monkeypatch.setenv("DMIL_FAST_BACKEND", "cpp")
    assert "backend_env_problem" not in info.collect()
