"""``python -m dmil_fast.info``: versions, build flags, and which backend of each op runs here.

For every op and each device kind (cpu, and cuda when a GPU is visible) the table says whether
each backend is available, and if not, why.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from typing import Dict, Optional

import torch

from .ops import _dispatch


def _version(module_name: str) -> Optional[str]:
    try:
        module = __import__(module_name)
    except Exception:
        return None
    return getattr(module, "__version__", "unknown")


ISA_ENV_VAR = "DMIL_FAST_CPU_ISA"


def _cpu_kernel_isa() -> Optional[str]:
    """The instruction set of the float C++ CPU kernels (the best this CPU runs, or the one
    DMIL_FAST_CPU_ISA names) and the ones it runs; None without the extension."""
    try:
        from . import _C
    except ImportError:
        return None
    runs = f"(this CPU runs {', '.join(_C.cpu_kernel_isas())})"
    try:
        return f"{_C.cpu_kernel_isa()} {runs}"
    except RuntimeError:  # the variable names a clone this CPU lacks
        env = os.environ.get(ISA_ENV_VAR)
        return f"{env} {runs} ({ISA_ENV_VAR}={env!r} is not one of them: the C++ CPU kernels refuse to run)"


def collect() -> Dict[str, object]:
    """Everything ``info`` prints, as a JSON-serialisable dict."""
    import dmil_fast

    ext_reason = _dispatch.extension_status()
    report: Dict[str, object] = {
        "dmil_fast": dmil_fast.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "triton": _version("triton"),
        "numpy": _version("numpy"),
        "triton_interpret": _dispatch.triton_interpreting(),
        "backend_env": os.environ.get(_dispatch.ENV_VAR),
        "extension": "loaded" if ext_reason is None else ext_reason,
        "extension_with_cuda": _dispatch.extension_built_with_cuda(),
        "cpu_kernel_isa": _cpu_kernel_isa() if ext_reason is None else None,
    }
    env = report["backend_env"]
    if env and env not in _dispatch.BACKENDS:
        report["backend_env_problem"] = (f"{_dispatch.ENV_VAR}={env!r} is not a backend "
                                         f"({', '.join(_dispatch.BACKENDS)}): every op refuses to run")
    if torch.cuda.is_available():
        report["cuda_device"] = torch.cuda.get_device_name(0)
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    ops: Dict[str, Dict[str, Dict[str, Optional[str]]]] = {}
    for op in _dispatch.registered_ops():
        ops[op.name] = {}
        for device in devices:
            ops[op.name][device.type] = op.reasons(device, torch.float32)
    report["ops"] = ops
    return report


def format_report(report: Dict[str, object]) -> str:
    lines = ["dmil_fast " + str(report["dmil_fast"])]
    keys = ["python", "platform", "torch", "torch_cuda", "cuda_available", "cuda_device", "triton", "numpy",
            "triton_interpret", "backend_env", "backend_env_problem", "extension", "extension_with_cuda",
            "cpu_kernel_isa"]
    for key in keys:
        if key in report:
            lines.append(f"  {key:20s} {report[key]}")
    lines.append("")
    lines.append("backends per op (float32 inputs):")
    for op_name, per_device in report["ops"].items():  # type: ignore[union-attr]
        for device, reasons in per_device.items():
            lines.append(f"  {op_name} [{device}]")
            for backend, reason in reasons.items():
                status = "available" if reason is None else f"no: {reason}"
                lines.append(f"    {backend:9s} {status}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dmil_fast.info", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    report = collect()
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
