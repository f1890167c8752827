"""Build of dmil_fast._C, the C++ (and, with a CUDA build of torch and nvcc, CUDA) extension.

Every op lives in its own folder under csrc/ (``csrc/<op>/*.cpp`` for the CPU kernel,
``csrc/<op>/*.cu`` for the CUDA kernel); ``csrc/extension.cpp`` is the pybind11 module shell.
Set ``DMIL_FAST_NO_EXTENSION=1`` to skip the extension (the pure-PyTorch and Triton backends
still work), ``DMIL_FAST_FORCE_CUDA=1`` to compile the CUDA sources even where no GPU is
visible (a CUDA build of torch and nvcc are still required; unless ``TORCH_CUDA_ARCH_LIST`` says
otherwise, the kernels are then compiled for every architecture the installed torch was built
for), ``DMIL_FAST_NO_CUDA=1`` to build the CPU kernels only.
"""

import glob
import os
import re
import sys

from setuptools import setup


# Compiler flags, module-level so that tests/ops/test_gpu_compile.py compiles the CUDA sources with
# exactly these on machines that cannot build the CUDA extension itself.
CXX_FLAGS = ["-O3", "-std=c++17", "-fopenmp"] if os.name != "nt" else ["/O2", "/std:c++17"]
NVCC_FLAGS = ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo"]
INCLUDE_DIR = "csrc"


def sources(ext):
    """csrc/**/*.<ext>, sorted (paths relative to the project root)."""
    return sorted(glob.glob(os.path.join(INCLUDE_DIR, "**", f"*.{ext}"), recursive=True))


def _flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def arch_list_from_flags(flags):
    """TORCH_CUDA_ARCH_LIST for torch's ``sm_XY`` arch flags: ``"sm_75 sm_90a"`` -> ``"7.5;9.0a"``."""
    archs = []
    for flag in flags.split():
        match = re.fullmatch(r"sm_(\d+)(\d)([a-z]?)", flag)
        if match:
            archs.append(f"{match[1]}.{match[2]}{match[3]}")
    return ";".join(archs)


def _set_default_arch_list(torch):
    # With no GPU visible torch cannot pick the architectures itself (its build fails with an
    # IndexError); default to the ones the installed torch runs on, so that the build runs there.
    if os.environ.get("TORCH_CUDA_ARCH_LIST") or torch.cuda.is_available():
        return
    get_flags = getattr(torch._C, "_cuda_getArchFlags", None)
    archs = arch_list_from_flags(get_flags() if get_flags else "") or "9.0"
    os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    print(
        f"dmil_fast: no GPU visible, compiling the CUDA kernels for TORCH_CUDA_ARCH_LIST={archs} "
        "(set TORCH_CUDA_ARCH_LIST to choose)",
        file=sys.stderr,
    )


def _extensions():
    if _flag("DMIL_FAST_NO_EXTENSION"):
        return [], {}
    import torch
    from torch.utils import cpp_extension

    root = os.path.dirname(os.path.abspath(__file__))
    cpp_sources = sources("cpp")
    cuda_sources = sources("cu")
    with_cuda = (
        not _flag("DMIL_FAST_NO_CUDA")
        and torch.version.cuda is not None
        and cpp_extension.CUDA_HOME is not None
        and (torch.cuda.is_available() or _flag("DMIL_FAST_FORCE_CUDA"))
    )
    define_macros = []
    extra_link = ["-fopenmp"] if os.name != "nt" else []
    include_dirs = [os.path.join(root, INCLUDE_DIR)]
    if with_cuda:
        _set_default_arch_list(torch)
        define_macros.append(("DMIL_FAST_WITH_CUDA", None))
        ext = cpp_extension.CUDAExtension(
            "dmil_fast._C",
            cpp_sources + cuda_sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args={
                "cxx": CXX_FLAGS,
                "nvcc": NVCC_FLAGS,
            },
            extra_link_args=extra_link,
        )
    else:
        ext = cpp_extension.CppExtension(
            "dmil_fast._C",
            cpp_sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args={"cxx": CXX_FLAGS},
            extra_link_args=extra_link,
        )
    cmdclass = {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}
    return [ext], cmdclass


if __name__ == "__main__":  # setuptools runs this file as __main__; tests only read the flags
    ext_modules, cmdclass = _extensions()
    setup(ext_modules=ext_modules, cmdclass=cmdclass)
