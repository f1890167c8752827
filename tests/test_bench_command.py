"""``dmil-fast bench``: runs the benchmark suite's selected cases, saves their JSON beside earlier
results without touching them, judges the new file against the targets, and refuses what it
cannot run with an error naming the option."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dmil_fast import bench
from dmil_fast.cli import main

ROOT = Path(__file__).resolve().parents[1]
# One C++ scoring target case: a short timed run on a CPU.
CPU_CASE = "fwd-cpu-float32-B4096xC6"


def _bench(*argv):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}
    return subprocess.run([sys.executable, "-m", "dmil_fast", "bench", *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the target run times the GPU cases: "
                    "run 'dmil-fast bench' there directly")
def test_runs_the_selected_case_saves_a_new_file_and_judges_it(tmp_path):
    earlier = tmp_path / "earlier.json"
    earlier.write_text('{"benchmarks": []}\n')
    done = _bench("-k", CPU_CASE, "--out", str(tmp_path), "--threads", "1")
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"-m target -k {CPU_CASE}" in done.stdout  # the command it ran, printed first
    saved = sorted(set(tmp_path.glob("*.json")) - {earlier})
    assert len(saved) == 1, sorted(p.name for p in tmp_path.iterdir())
    assert earlier.read_text() == '{"benchmarks": []}\n'
    payload = json.loads(saved[0].read_text())
    assert payload["cpu"].endswith(" logical cores, 1 torch threads)"), payload["cpu"]
    cases = {(r["extra_info"]["provider"], r["extra_info"]["device"]) for r in payload["benchmarks"]}
    assert cases == {("reference", "cpu"), ("cpp", "cpu")}
    assert all(r["stats"]["rounds"] >= 1 for r in payload["benchmarks"])  # timed, not a disabled run
    assert all(r["extra_info"]["target"] is True for r in payload["benchmarks"])  # -m target: all marked
    assert f"results saved to {saved[0]}" in done.stdout
    assert f"results saved to {earlier}" not in done.stdout
    # The targets table of the new file: the CPU target measured, every GPU one not.
    assert "interaction_scores fwd cpu float32 B=4096 C=6: cpp vs reference" in done.stdout
    assert "not measured" in done.stdout
    assert saved[0].name in done.stdout  # the table names its source file


def test_a_selection_that_matches_nothing_is_an_error(tmp_path):
    done = _bench("-k", "no_such_benchmark", "--out", str(tmp_path))
    assert done.returncode == 2
    assert "error: no benchmark selected: -k 'no_such_benchmark' matches none of the target cases" in done.stderr
    assert not list(tmp_path.glob("*.json"))


def test_a_folder_without_a_suite_is_refused_naming_the_option(tmp_path, capsys):
    assert main(["bench", "--suite", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"no dmil_fast benchmark suite at --suite {tmp_path}" in err
    assert "conftest.py, bench_targets.py" in err


def test_out_that_is_a_file_is_refused(tmp_path, capsys):
    target = tmp_path / "results.json"
    target.write_text("{}")
    assert main(["bench", "--out", str(target)]) == 2
    assert f"error: --out {target} is a file; expected a directory" in capsys.readouterr().err
    assert target.read_text() == "{}"


def test_ctrl_c_lets_the_session_save_its_results(tmp_path, monkeypatch, capsys):
    """Ctrl-C reaches the pytest session too, which then writes what it timed: the command waits
    for it (a killed session would lose the timings) and judges the file it saved."""
    waits = []

    class Session:
        def __init__(self, command, **kwargs):
            self.out = Path(command[command.index("--bench-results-dir") + 1])

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def wait(self):
            waits.append(len(waits))
            if len(waits) == 1:
                raise KeyboardInterrupt
            (self.out / "cpu-interrupted.json").write_text('{"device": "cpu", "benchmarks": []}')
            return 2  # pytest's status for an interrupted session

        def kill(self):
            raise AssertionError("the session was killed")

    real_popen = subprocess.Popen  # the targets judge still runs for real
    monkeypatch.setattr(bench.subprocess, "Popen", lambda command, **kw: (
        Session(command) if "pytest" in command else real_popen(command, **kw)))
    assert main(["bench", "--out", str(tmp_path)]) == 2
    assert waits == [0, 1]
    out = capsys.readouterr().out
    assert f"results saved to {tmp_path / 'cpu-interrupted.json'}" in out
    assert "not measured" in out  # the targets table of the saved (empty) file


def test_threads_below_one_are_refused(capsys):
    assert main(["bench", "--threads", "0"]) == 2
    assert "error: --threads must be an int >= 1, got 0" in capsys.readouterr().err


def test_the_default_suite_is_the_source_trees():
    assert bench.default_suite() == ROOT / "benchmarks"
    assert bench.find_suite(None) == ROOT / "benchmarks"


def test_missing_packages_are_named(monkeypatch):
    real = bench.importlib.util.find_spec
    monkeypatch.setattr(bench.importlib.util, "find_spec",
                        lambda name: None if name == "pytest_benchmark" else real(name))
    with pytest.raises(ImportError, match=r'needs pytest-benchmark: pip install "dmil-fast\[test\]"'):
        bench.check_requirements()


@pytest.mark.parametrize("everything, keywords, expected_tail", [
    (False, None, ["-m", "target"]),
    (True, None, []),
    (False, "C6", ["-m", "target", "-k", "C6"]),
    (True, "C6", ["-k", "C6"]),
])
def test_the_pytest_command_selects_targets_unless_all(tmp_path, everything, keywords, expected_tail):
    command = bench.pytest_command(ROOT / "benchmarks", tmp_path, everything=everything, keywords=keywords)
    head = [sys.executable, "-m", "pytest", str(ROOT / "benchmarks"), "-q", "--bench-save",
            "--bench-results-dir", str(tmp_path)]
    assert command == head + expected_tail
