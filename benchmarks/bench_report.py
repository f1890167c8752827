"""Results of one benchmark session: collected per benchmark, saved as JSON with the machine's
description, and summarised as speed-up ratios (each provider against ``reference`` and
``compile`` of the same op, variant, device, dtype and shape).
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import re
import subprocess
from collections import OrderedDict
from pathlib import Path
from typing import Dict, List, Optional

import torch

_STAT_FIELDS = ("min", "max", "mean", "median", "stddev", "rounds")
_CASE_FIELDS = ("op", "variant", "device", "dtype", "shape")
_BASELINES = ("reference", "compile")


class ResultLog:
    """Every timed benchmark of the session and the copy bandwidth measured per device."""

    def __init__(self) -> None:
        self.records: List[Dict[str, object]] = []
        self.copy_bandwidth_gbps: Dict[str, float] = {}

    def add(self, nodeid: str, benchmark) -> None:
        """Keep the stats and ``extra_info`` of a finished benchmark (nothing if it was not timed)."""
        meta = getattr(benchmark, "stats", None)
        if not meta:
            return
        stats = {name: getattr(meta.stats, name) for name in _STAT_FIELDS}
        stats["iterations"] = meta.iterations
        self.records.append({"name": benchmark.name, "fullname": nodeid, "group": benchmark.group,
                             "stats": stats, "extra_info": dict(benchmark.extra_info)})

    def devices(self) -> List[str]:
        return sorted({str(r["extra_info"].get("device")) for r in self.records})

    # ------------------------------------------------------------ JSON export

    def write_json(self, directory: Path) -> Path:
        """Write ``<device>-<date>.json`` (never overwriting an earlier file) and return its path."""
        header = machine_description()
        directory.mkdir(parents=True, exist_ok=True)
        stem = f"{_slug(header['device'])}-{header['date'][:10]}"
        path = directory / f"{stem}.json"
        n = 2
        while path.exists():
            path = directory / f"{stem}-{n}.json"
            n += 1
        payload = dict(header, copy_bandwidth_gbps=self.copy_bandwidth_gbps, benchmarks=self.records)
        path.write_text(json.dumps(payload, indent=1, default=str) + "\n")
        return path

    # ------------------------------------------------------------ ratio summary

    def ratio_lines(self) -> List[str]:
        """One line per timed benchmark, grouped by case: median time, its physical rate, and the
        speed-up over ``reference`` and over ``compile`` (their median / this median)."""
        cases: "OrderedDict[tuple, List[dict]]" = OrderedDict()
        for r in self.records:
            info = r["extra_info"]
            cases.setdefault(tuple(info.get(k) for k in _CASE_FIELDS), []).append(r)
        head = (f"{'case':70s} {'provider':10s} {'median':>10s} {'rate':>16s} {'vs ref':>7s} {'vs comp':>7s} "
                f"{'copy%':>6s} {'faults':>7s}")
        lines = [head, "-" * len(head)]
        for key, rows in cases.items():
            medians = {r["extra_info"].get("provider"): r["stats"]["median"] for r in rows}
            case = " ".join(str(k) for k in key)
            for r in rows:
                info, median = r["extra_info"], r["stats"]["median"]
                ratios = [_ratio(medians.get(base), median) for base in _BASELINES]
                frac = info.get("fraction_of_copy_bw")
                faults = info.get("page_faults_per_call")
                lines.append(f"{case[:70]:70s} {str(info.get('provider')):10s} {_fmt_time(median):>10s} "
                             f"{_rate(info):>16s} {ratios[0]:>7s} {ratios[1]:>7s} "
                             f"{'' if frac is None else f'{100 * frac:.0f}%':>6s} "
                             f"{'' if faults is None else f'{faults:.0f}':>7s}")
                case = ""
        return lines


def _ratio(base: Optional[float], median: float) -> str:
    return "" if base is None or not median else f"{base / median:.2f}x"


def _fmt_time(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.3f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3f} ms"
    return f"{seconds * 1e6:.1f} us"


def _rate(info: dict) -> str:
    if info.get("samples_per_s") is not None:
        return f"{info['samples_per_s']:.0f} samp/s"
    if info.get("tflops") is not None:
        return f"{info['tflops']:.3f} TFLOP/s"
    if info.get("gbps") is not None:
        return f"{info['gbps']:.1f} GB/s"
    return ""


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def _git(*args: str) -> Optional[str]:
    """What ``git *args`` prints in the source tree, or None when git or the tree's .git is not there."""
    try:
        out = subprocess.run(["git", *args], cwd=Path(__file__).resolve().parent, capture_output=True, text=True,
                             timeout=10, check=True)
        return out.stdout
    except (OSError, subprocess.SubprocessError):
        return None


def _git_commit() -> Optional[str]:
    """``DMIL_FAST_COMMIT`` when set (a copy of the tree without its .git), else git's HEAD."""
    if os.environ.get("DMIL_FAST_COMMIT"):
        return os.environ["DMIL_FAST_COMMIT"]
    return (_git("rev-parse", "HEAD") or "").strip() or None


def _git_dirty() -> Optional[bool]:
    """Whether tracked files differ from HEAD (the results then measured more than ``commit``);
    None when unknown: ``DMIL_FAST_COMMIT`` names the commit, or git is not there."""
    if os.environ.get("DMIL_FAST_COMMIT"):
        return None
    status = _git("status", "--porcelain", "--untracked-files=no")
    return None if status is None else bool(status.strip())


def _version(dist: str) -> Optional[str]:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_name() -> str:
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} logical cores, {torch.get_num_threads()} torch threads)"


def cpu_kernel_isa() -> Optional[str]:
    """The instruction set of the C++ CPU scoring kernels in this session (None without them)."""
    try:
        from dmil_fast import _C
    except ImportError:
        return None
    try:
        return _C.cpu_kernel_isa()
    except RuntimeError:  # DMIL_FAST_CPU_ISA names a clone this CPU lacks: the cpp cases fail
        return os.environ.get("DMIL_FAST_CPU_ISA")


def machine_description() -> Dict[str, object]:
    """Device name (the GPU's when there is one), date, commit and library versions."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "device": gpu if gpu else f"cpu-{platform.machine()}",
        "gpu": gpu,
        "cpu": cpu_name(),
        "cpu_kernel_isa": cpu_kernel_isa(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": _git_commit(),
        "commit_dirty": _git_dirty(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _version("triton") or _version("pytorch-triton"),
        "dmil_fast": _version("dmil-fast"),
        "python": platform.python_version(),
    }


#: The session's log (one pytest session per process).
RESULTS = ResultLog()
