"""The ``dmil-fast bench`` command: the benchmark suite of a source checkout, then its verdicts.

    dmil-fast bench [--all] [-k EXPR] [--out DIR] [--threads N] [--suite DIR]

Runs ``pytest benchmarks -m target`` (``--all``: every benchmark; ``-k``: pytest's keyword
selection on top), saves the timings as ``<device>-<date>.json`` in ``--out`` (default: the
suite's ``results/``; never overwriting an earlier file), prints pytest-benchmark's tables and the
speed-up summary, then the table of ``benchmarks/bench_targets.py``: each performance target, the
ratio measured in this run and whether it is met. On a CPU the target cases are the C++ scoring
against the PyTorch reference; on a GPU every fused kernel against eager and ``torch.compile``.

The suite (``benchmarks/``) ships with the source tree, not with the installed package: the
command finds it beside the ``dmil_fast`` package of an editable install (``pip install -e .``),
or takes its folder with ``--suite``. It needs pytest and pytest-benchmark (``pip install
"dmil-fast[test]"``).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from typing import List, Optional

from ._settings import check_out_dir

#: Files a benchmark suite folder must hold (its session set-up and the target judge).
SUITE_FILES = ("conftest.py", "bench_targets.py")
#: pytest's exit status when no test was selected.
NO_TESTS_SELECTED = 5


def default_suite() -> Path:
    """``benchmarks/`` beside the ``dmil_fast`` package (the source tree of an editable install)."""
    return Path(__file__).resolve().parent.parent / "benchmarks"


def find_suite(suite: Optional[str]) -> Path:
    """The benchmark suite folder: ``suite`` when given, else :func:`default_suite`. Raises
    FileNotFoundError naming ``--suite`` when the folder is not a dmil_fast benchmark suite."""
    path = Path(suite).resolve() if suite is not None else default_suite()
    missing = [name for name in SUITE_FILES if not (path / name).is_file()]
    if missing:
        where = f"--suite {suite}" if suite is not None else f"{path} (beside the installed dmil_fast package)"
        raise FileNotFoundError(
            f"no dmil_fast benchmark suite at {where}: it lacks {', '.join(missing)}. The suite ships with "
            "the source tree: install it with 'pip install --no-build-isolation -e .' from a clone, or pass "
            "--suite CLONE/benchmarks")
    return path


def check_requirements() -> None:
    """ImportError naming what to install when pytest or pytest-benchmark is missing."""
    missing = [name for name, module in (("pytest", "pytest"), ("pytest-benchmark", "pytest_benchmark"))
               if importlib.util.find_spec(module) is None]
    if missing:
        raise ImportError(f"dmil-fast bench needs {' and '.join(missing)}: pip install \"dmil-fast[test]\"")


def pytest_command(suite: Path, out: Path, *, everything: bool, keywords: Optional[str]) -> List[str]:
    """The pytest command line the bench command runs (printed first, so it can be rerun by hand)."""
    command = [sys.executable, "-m", "pytest", str(suite), "-q", "--bench-save", "--bench-results-dir", str(out)]
    if not everything:
        command += ["-m", "target"]
    if keywords:
        command += ["-k", keywords]
    return command


def add_arguments(parser) -> None:
    """Add the ``bench`` options to an argparse parser."""
    parser.add_argument("--all", dest="everything", action="store_true",
                        help="every benchmark, not only the cases the performance targets are judged on "
                             "(on a GPU: hundreds of torch.compile graphs, a long run)")
    parser.add_argument("-k", dest="keywords", metavar="EXPR",
                        help="pytest keyword expression selecting benchmarks, e.g. 'interaction_scores and C6'")
    parser.add_argument("--out", default=None,
                        help="directory of the results JSON (default: the suite's results/ folder)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads of torch in the benchmark session (OMP_NUM_THREADS; default: torch's "
                             "choice). The committed CPU results were taken with 1: on shared cores a "
                             "multi-threaded kernel waits for a descheduled thread")
    parser.add_argument("--suite", default=None,
                        help="the benchmarks/ folder of a dmil_fast source tree (default: the one beside "
                             "the installed package)")


def main(args) -> int:
    """Run the suite, then judge the results it saved; pytest's exit status (2 when it selected nothing)."""
    check_requirements()
    suite = find_suite(args.suite)
    out = check_out_dir(args.out if args.out is not None else suite / "results").resolve()
    before = set(out.glob("*.json")) if out.is_dir() else set()
    command = pytest_command(suite, out, everything=args.everything, keywords=args.keywords)
    print("$ " + " ".join(command), flush=True)
    # PYTEST_XDIST_* would make the child take itself for an xdist worker (pytest-benchmark then
    # times nothing): the command runs its own session, whoever started it.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}
    if args.threads is not None:
        env["OMP_NUM_THREADS"] = str(args.threads)
    with subprocess.Popen(command, cwd=suite.parent, env=env) as session:
        try:
            status = session.wait()
        except KeyboardInterrupt:  # the session got the Ctrl-C too: it saves what it timed, then ends
            status = session.wait()
    if status == NO_TESTS_SELECTED:
        what = "the target cases" if not args.everything else "the suite"
        raise ValueError(f"no benchmark selected: -k {args.keywords!r} matches none of {what}"
                         if args.keywords else f"no benchmark selected in {what} of {suite}")
    saved = sorted(set(out.glob("*.json")) - before)
    if not saved:
        print("error: the benchmark session saved no results (nothing was timed)", file=sys.stderr)
        return status or 1
    judged = subprocess.run([sys.executable, str(suite / "bench_targets.py"), *map(str, saved)],
                            cwd=suite.parent, env=env, capture_output=True, text=True)
    print()
    print("\n".join(f"results saved to {path}" for path in saved))
    print(judged.stdout, end="")
    if judged.returncode != 0:
        print(judged.stderr, end="", file=sys.stderr)
        return status or judged.returncode
    print(f"(judge saved results again with: python {suite / 'bench_targets.py'} FILE.json ...)")
    return status
