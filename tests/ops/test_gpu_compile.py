"""The GPU code compiles for Hopper (sm_90), checked on machines that cannot run it.

A CPU-only machine builds the extension without its CUDA sources and runs the Triton kernels
under the interpreter, so neither the CUDA kernels nor Triton's compiler is exercised by the
other tests there. These two tests compile both for a GPU target, without a GPU, with the flags
and launch specialisations the GPU build uses. Where a GPU is present the other tests build and
run the same code for real, and these two are skipped (with that reason).
"""

import json
import os
import re
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

from dmil_fast.ops._dispatch import extension_built_with_cuda, extension_status

ROOT = Path(__file__).resolve().parents[2]
ARCH = 90  # H100 / H200
DTYPES = ("float32", "bfloat16", "float16", "float64")


def _nvcc():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and (Path(home) / "bin" / "nvcc").exists():
        return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


NVCC = _nvcc()


def _setup_module():
    """setup.py's globals, read without running the build."""
    return runpy.run_path(str(ROOT / "setup.py"), run_name="dmil_fast_build_settings")


def _build_settings():
    """setup.py's flags and CUDA sources."""
    cwd = os.getcwd()
    os.chdir(ROOT)  # setup.py globs csrc/ relative to the project root
    try:
        settings = _setup_module()
        return settings["NVCC_FLAGS"], settings["INCLUDE_DIR"], settings["sources"]("cu")
    finally:
        os.chdir(cwd)


def test_arch_list_from_torch_arch_flags():
    to_list = _setup_module()["arch_list_from_flags"]
    assert to_list("sm_75 sm_80 sm_86 sm_90 sm_100 sm_120") == "7.5;8.0;8.6;9.0;10.0;12.0"
    assert to_list("sm_90a compute_90") == "9.0a"  # PTX-only entries are not architectures
    assert to_list("") == ""


class _FakeTorch:
    """What setup.py reads of torch when it picks the architectures."""

    def __init__(self, gpu, flags):
        self.cuda = type("cuda", (), {"is_available": staticmethod(lambda: gpu)})
        self._C = type("C", (), {} if flags is None else
                       {"_cuda_getArchFlags": staticmethod(lambda: flags)})


@pytest.mark.parametrize("gpu, flags, preset, expected", [
    (False, "sm_80 sm_90", None, "8.0;9.0"),  # forced build without a GPU: torch's own archs
    (False, None, None, "9.0"),               # torch does not say: Hopper, the target
    (False, "sm_80 sm_90", "8.9", "8.9"),     # the user's choice stands
    (True, "sm_80 sm_90", None, None),        # a visible GPU: torch picks it itself
])
def test_forced_cuda_build_picks_architectures(monkeypatch, capsys, gpu, flags, preset, expected):
    if preset is None:
        monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    else:
        monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", preset)
    _setup_module()["_set_default_arch_list"](_FakeTorch(gpu, flags))
    assert os.environ.get("TORCH_CUDA_ARCH_LIST") == expected
    said = capsys.readouterr().err
    assert (f"TORCH_CUDA_ARCH_LIST={expected}" in said) == (preset is None and not gpu)


@pytest.mark.skipif(torch.cuda.is_available() and extension_status() is None
                    and extension_built_with_cuda(),
                    reason="the installed extension was built with its CUDA kernels, which the "
                           "CUDA tests run")
@pytest.mark.skipif(NVCC is None, reason="nvcc not found (on PATH, CUDA_HOME or CUDA_PATH)")
def test_cuda_sources_compile_for_sm90(tmp_path):
    nvcc_flags, include_dir, sources = _build_settings()
    assert sources, "setup.py found no .cu sources under csrc/"
    includes = [f"-I{ROOT / include_dir}"] + [f"-I{p}" for p in cpp_extension.include_paths()]
    for source in sources:
        obj = tmp_path / (Path(source).stem + ".o")
        cmd = [
            NVCC, "-c", str(ROOT / source), "-o", str(obj), *includes,
            *cpp_extension.COMMON_NVCC_FLAGS, *nvcc_flags,
            "--compiler-options", "-fPIC",
            "-DDMIL_FAST_WITH_CUDA", "-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C",
            # CPU builds of torch ship c10/cuda without its generated cmake header, which only
            # sets the Windows DLL export macro; skipping it changes nothing on Linux.
            "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE",
            "-gencode", f"arch=compute_{ARCH},code=sm_{ARCH}", "-Xptxas", "-v",
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        log = proc.stdout + proc.stderr
        assert proc.returncode == 0, f"nvcc failed on {source}:\n{log[-6000:]}"
        assert obj.stat().st_size > 0
        # Our own sources compile without a warning (torch's headers may warn; not ours to fix).
        own = [line for line in log.splitlines()
               if "warning" in line.lower() and "csrc/" in line and "torch/include" not in line]
        assert not own, "\n".join(own)
        # ptxas compiled device code for every dtype and group size of every kernel.
        entries = re.findall(rf"Compiling entry function '(\S+)' for 'sm_{ARCH}'", log)
        if Path(source).stem == "interaction_scores_cuda":
            for kernel in ("interaction_scores_forward_kernel", "interaction_scores_backward_kernel"):
                # Itanium mangling of the (scalar_t, acc_t, lanes per row) template arguments.
                for types in ("Iff", "Idd", "IN3c104HalfEf", "IN3c108BFloat16Ef"):
                    for lanes in (1, 8, 32):
                        targs = f"{types}Li{lanes}EE"
                        assert any(kernel + targs in e for e in entries), (
                            f"ptxas did not compile {kernel}<{targs}>; entries: {entries}")


def _run_triton_compile(tmp_path, *args):
    env = dict(os.environ, TRITON_CACHE_DIR=str(tmp_path / "triton-cache"))
    env.pop("TRITON_INTERPRET", None)  # the script turns it off itself
    return subprocess.Popen([sys.executable, "-m", "tests.ops.gpu_compile_triton",
                             "--arch", str(ARCH), *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _collect(proc, out):
    log, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, log[-6000:]
    return json.loads(Path(out).read_text())


@pytest.mark.skipif(torch.cuda.is_available(),
                    reason="a GPU is present: the Triton kernel tests compile and run every "
                           "kernel on it")
def test_triton_kernels_compile_for_sm90(tmp_path):
    shards = 2  # two processes, one per core on the CI machine
    outs = [tmp_path / f"shard{k}.json" for k in range(shards)]
    procs = [_run_triton_compile(tmp_path, "--out", str(outs[k]), "--shard", f"{k}/{shards}")
             for k in range(shards)]
    results = [_collect(p, o) for p, o in zip(procs, outs)]
    errors = [e for r in results for e in r["errors"]]
    assert not errors, "\n\n".join(f"{e['case']}:\n{e['error']}" for e in errors)
    compiled = [c for r in results for c in r["compiled"]]
    cases = {name for r in results for name in r["cases"]}
    # Every case compiled at least one kernel, each all the way to a cubin.
    assert {c["case"] for c in compiled} == cases
    assert all("cubin" in c["stages"] and "ptx" in c["stages"] for c in compiled)
    # Every kernel compiled in every dtype.
    kernels = {c["kernel"] for c in compiled}
    assert kernels == {
        "_gaussian_sample_fwd_kernel", "_gaussian_sample_bwd_kernel",
        "_diagonal_gaussian_kl_fwd_kernel", "_diagonal_gaussian_kl_bwd_kernel",
        "_vb_epilogue_fwd_kernel", "_vb_epilogue_bwd_kernel",
        "_interaction_scores_fwd_kernel", "_interaction_scores_bwd_kernel",
    }
    for kernel in kernels:
        for dtype in DTYPES:
            assert any(c["kernel"] == kernel and f" {dtype}" in c["case"] for c in compiled), (
                kernel, dtype)


@pytest.mark.skipif(torch.cuda.is_available(),
                    reason="a GPU is present: the Triton kernel tests compile and run every "
                           "kernel on it")
def test_triton_compile_check_catches_what_the_interpreter_runs(tmp_path):
    """The check can fail: a kernel the interpreter runs correctly is rejected by the compiler."""
    from tests.ops.gpu_compile_triton import loop_type_change_kernel

    x = torch.randn(100, dtype=torch.float32)
    total = torch.empty(1)
    loop_type_change_kernel[(1,)](x, total, 100, BLOCK=32)  # TRITON_INTERPRET=1 here
    torch.testing.assert_close(total[0], x.double().sum().float())

    out = tmp_path / "fail.json"
    result = _collect(_run_triton_compile(tmp_path, "--out", str(out), "--expect-failure"), out)
    assert [e["case"] for e in result["errors"]] == ["loop_type_change_kernel"]
    assert "Loop-carried variable" in result["errors"][0]["error"]
    assert result["compiled"] == []
