"""Compile the Triton kernels for a GPU on a machine without one.

On a CPU the kernel tests run every kernel under Triton's interpreter, which executes the Python
body with NumPy and never runs Triton's compiler, so a kernel can pass them and still fail to
compile for a GPU (a loop-carried variable that changes type is one such case; see
``loop_type_change_kernel`` below). This script runs the compiler: it calls every launcher in
``dmil_fast.kernels`` with CPU tensors of each dtype and each constexpr branch the ops use, and
turns each ``kernel[grid](...)`` into a warm-up for the chosen GPU target. Triton binds and
specialises the arguments exactly as it does for a launch, compiles through TTIR, TTGIR, LLVM IR
and PTX to a cubin (ptxas included), and launches nothing. The launchers' tile choice is told
the device is CUDA, so the tiles are the GPU ones, not the interpreter's.

Run as a script, which turns TRITON_INTERPRET off before importing triton (imported as a module
it leaves the environment alone, so its kernels are whatever the importer's setting makes them):

    python -m tests.ops.gpu_compile_triton --arch 90 --out result.json [--shard 0/2]

``result.json`` holds the Triton version, the target, one record per compiled kernel (case,
kernel, stages, seconds) and one per failure (case, error). ``--expect-failure`` compiles only
``loop_type_change_kernel``, which must fail; the test uses it to show the check can fail.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import sys
import time
import traceback
from typing import Callable, Dict, List, Tuple

if __name__ == "__main__":
    os.environ["TRITON_INTERPRET"] = "0"

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}
# Every constexpr branch in the dtypes the GPU targets are judged on; one specialisation per
# kernel in the others.
ALL_BRANCHES = ("float32", "bfloat16")


@triton.jit
def loop_type_change_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """Sums x[0:n] with an int accumulator that becomes float in the loop: the interpreter runs
    it, the compiler rejects it (loop-carried variables must keep their type)."""
    acc = 0
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        acc += tl.sum(tl.load(x_ptr + offs, mask=offs < n, other=0.0))
    tl.store(out_ptr, acc)


class _TargetOnlyDriver:
    """Stands in for Triton's CUDA driver: names the target and a device index, nothing else
    (warm-ups never load or launch a kernel)."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


class _Recorder:
    """Makes ``kernel[grid](...)`` a warm-up and records what each one compiled."""

    def __init__(self):
        self.case = ""
        self.compiled: List[dict] = []

    def install(self):
        from triton.runtime.jit import JITFunction

        recorder = self

        def getitem(kernel, grid):
            def warm(*args, **kwargs):
                start = time.perf_counter()
                compiled = kernel.run(*args, grid=grid, warmup=True, **kwargs)
                recorder.compiled.append({
                    "case": recorder.case,
                    "kernel": kernel.fn.__name__,
                    "stages": sorted(compiled.asm.keys()),
                    "seconds": round(time.perf_counter() - start, 3),
                })
                return compiled
            return warm

        JITFunction.__getitem__ = getitem


def _gpu_tiles():
    """The launchers pick tiles from their tensors' device; make them pick the CUDA tiles."""
    from dmil_fast.kernels import (diagonal_gaussian_kl, gaussian_sample, interaction_scores,
                                   variational_bottleneck)

    tile = gaussian_sample.tile
    gpu_tile = functools.wraps(tile)(lambda rows, cols, device: tile(rows, cols, torch.device("cuda")))
    for module in (gaussian_sample, diagonal_gaussian_kl, interaction_scores, variational_bottleneck):
        module.tile = gpu_tile


def cases() -> List[Tuple[str, Callable[[], object]]]:
    """(name, call) for every launcher call to compile."""
    from dmil_fast.kernels import accumulation_dtype
    from dmil_fast.kernels import diagonal_gaussian_kl as kl
    from dmil_fast.kernels import gaussian_sample as gs
    from dmil_fast.kernels import interaction_scores as isc
    from dmil_fast.kernels import variational_bottleneck as vb

    out: List[Tuple[str, Callable[[], object]]] = []
    seed = torch.tensor([7], dtype=torch.int64)
    b, e, groups = 64, 256, 3
    for name, dt in DTYPES.items():
        every = name in ALL_BRANCHES
        acc = accumulation_dtype(dt)  # the dtype of the per-row buffers the ops pass

        def x(*shape, dt=dt):
            return torch.randn(*shape).to(dt)

        out.append((f"gaussian_sample fwd {name}",
                    lambda x=x: gs.gaussian_sample_fwd(x(b, e), x(b, e), seed)))
        out.append((f"gaussian_sample bwd {name}",
                    lambda x=x: gs.gaussian_sample_bwd(x(b, e), x(b, e), seed)))
        # Priors broadcast over the batch (stride 0), as the bottleneck's standard normal prior.
        out.append((f"kl fwd {name}", lambda x=x: kl.diagonal_gaussian_kl_rows_fwd(
            x(b, e), x(b, e), x(1, e).expand(b, e), x(1, e).expand(b, e))))
        for p_mu, p_lv in itertools.product((False, True), repeat=2) if every else [(True, True)]:
            out.append((f"kl bwd {name} p_mu_grad={p_mu} p_logvar_grad={p_lv}",
                        lambda x=x, p_mu=p_mu, p_lv=p_lv, dt=dt, acc=acc:
                        kl.diagonal_gaussian_kl_rows_bwd(
                            torch.ones(b, dtype=acc), x(b, e), x(b, e), x(b, e), x(b, e),
                            p_mu_grad=p_mu, p_logvar_grad=p_lv, prior_grad_dtype=dt)))
        for sample in (False, True) if every else [True]:
            out.append((f"vb fwd {name} sample={sample}",
                        lambda x=x, sample=sample: vb.vb_epilogue_fwd(
                            x(b, groups * 2 * e), seed, groups, sample)))
        flags = [f for f in itertools.product((False, True), repeat=3) if any(f)]
        for gh, gz, gk in flags if every else [(True, True, True)]:
            out.append((f"vb bwd {name} grad_h={gh} grad_z={gz} grad_kl={gk}",
                        lambda x=x, gh=gh, gz=gz, gk=gk, acc=acc: vb.vb_epilogue_bwd(
                            x(b, groups * 2 * e) if gh else None, x(b, groups, e) if gz else None,
                            torch.ones(b, groups, dtype=acc) if gk else None,
                            x(b, groups * 2 * e), seed, groups)))
        for c in (6, 309) if name == "float32" else [309]:
            labels = torch.randint(0, c, (b,))
            cases = (itertools.product((0, 1), (False, True), (False, True)) if every
                     else [(0, True, True)])
            for lsmi, prior, save in cases:
                out.append((f"interaction fwd {name} C={c} redundancy={lsmi} prior={prior} save_lse={save}",
                            lambda x=x, c=c, labels=labels, lsmi=lsmi, prior=prior, save=save, acc=acc:
                            isc.interaction_scores_fwd(
                                x(b, c), x(b, c), x(b, c), labels, torch.rand(b, dtype=acc),
                                torch.rand(b, dtype=acc),
                                torch.rand(c, dtype=acc) if prior else None, lsmi, save)))
            for lsmi in (0, 1) if every else [0]:
                out.append((f"interaction bwd {name} C={c} redundancy={lsmi}",
                            lambda x=x, c=c, labels=labels, lsmi=lsmi, acc=acc:
                            isc.interaction_scores_bwd(
                                x(b, 7), x(b, 7), torch.rand(b, 3, dtype=torch.float64), x(b, c), x(b, c),
                                x(b, c), labels, torch.rand(b, dtype=acc),
                                torch.rand(b, dtype=acc), lsmi)))
    return out


def failure_case() -> List[Tuple[str, Callable[[], object]]]:
    x = torch.randn(100)
    out = torch.empty(1)
    return [("loop_type_change_kernel", lambda: loop_type_change_kernel[(1,)](x, out, 100, BLOCK=32))]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90,
                        help="compute capability as one number (90: H100/H200, 80: A100)")
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--shard", default="0/1", help="k/n: compile every n-th case from k")
    parser.add_argument("--expect-failure", action="store_true",
                        help="compile only loop_type_change_kernel (must fail)")
    args = parser.parse_args(argv)
    try:
        k, n = (int(v) for v in args.shard.split("/"))
    except ValueError:
        parser.error(f"--shard: expected k/n with integers, got {args.shard!r}")
    if not 0 <= k < n:
        parser.error(f"--shard: expected 0 <= k < n, got {args.shard!r}")

    from triton.runtime import driver

    driver.set_active(_TargetOnlyDriver(args.arch))
    recorder = _Recorder()
    recorder.install()
    _gpu_tiles()
    todo = failure_case() if args.expect_failure else cases()[k::n]
    errors: List[Dict[str, str]] = []
    for name, call in todo:
        recorder.case = name
        try:
            call()
        except Exception as exc:  # every failure is reported, none stops the others
            errors.append({"case": name, "error": "".join(
                traceback.format_exception_only(type(exc), exc)).strip()[-4000:]})
    result = {
        "triton": triton.__version__,
        "target": {"backend": "cuda", "arch": args.arch},
        "cases": [name for name, _ in todo],
        "compiled": recorder.compiled,
        "errors": errors,
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
