"""Machinery shared by the benchmark files: devices and shape grids, providers (and why one is
skipped), synchronised timing with a cold L2 on GPUs, physical metrics and peak memory.

Timing rules (every benchmark follows them through :func:`measure`):

- the timed function ends with a device synchronisation, so a GPU round is the wall time of the
  work, not of its launch;
- on CUDA each round is preceded (untimed, through ``benchmark.pedantic(setup=...)``) by a write
  of a 256 MB buffer, larger than the L2 cache of any current GPU, so every round starts cold;
- warm-up calls (torch.compile, Triton autotuning, the caching allocator) happen before timing.
"""

from __future__ import annotations

import functools
import importlib
import math
import os
import time
from typing import Callable, Collection, Dict, Iterable, List, Optional, Sequence, Tuple

import pytest
import torch

#: The mark of the cases the performance targets are judged on (``-m target``).
TARGET = pytest.mark.target

#: Op-level providers, side by side in one run.
OP_PROVIDERS = ("reference", "compile", "triton", "cuda", "cpp")
TRITON_CPU_REASON = ("Triton runs only under its interpreter on CPU: timed runs leave it out, an untimed "
                     "run (--benchmark-disable, TRITON_INTERPRET=1) calls it once")
CPU_COMPILE_FWD_ONLY_REASON = (
    "on CPU torch.compile is measured for the forward only (each compiled backward costs seconds of "
    "compile time in the CPU smoke run); the CUDA run measures forward+backward")

L2_FLUSH_BYTES = 256 * 2**20
#: Largest (rows x width) operand of the GPU grids: 2**29 elements (2 GiB in float32).
GPU_ELEMENT_CAP = 2**29
LARGE_ROWS = 2**20
GPU_ROWS = (256, 4096, 65536, LARGE_ROWS)
MODES = ("fwd", "fwd+bwd")

# Round budgets (seconds of timed work per benchmark, before the min/max clamps).
_GPU_BUDGET_S, _GPU_MIN_ROUNDS, _GPU_MAX_ROUNDS = 0.25, 10, 200
_CPU_BUDGET_S, _CPU_MIN_ROUNDS, _CPU_MAX_ROUNDS = 0.5, 5, 31
_CPU_MIN_ROUND_S = 2e-3  # a CPU round loops the function until it lasts at least this long


# ---------------------------------------------------------------- devices, dtypes, grids

def has_cuda() -> bool:
    return torch.cuda.is_available()


def devices() -> List[str]:
    """The CPU always (small shapes), CUDA where present (the full grids)."""
    return ["cpu", "cuda"] if has_cuda() else ["cpu"]


def dtypes(device: str) -> List[torch.dtype]:
    return [torch.float32, torch.bfloat16] if device == "cuda" else [torch.float32]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def gpu_grid(widths: Sequence[int], rows: Sequence[int] = GPU_ROWS,
             cap: int = GPU_ELEMENT_CAP) -> List[Tuple[int, int]]:
    """(rows, width) pairs of the CUDA grid whose operand stays within ``cap`` elements."""
    return [(b, w) for b in rows for w in widths if b * w <= cap]


def target_marks(device: str, shape, targets: Dict[str, Collection]) -> Tuple:
    """``(pytest.mark.target,)`` when ``shape`` is one of ``targets[device]``, else ``()``.

    The ``target`` cases are those the performance targets are judged on (bench_targets.py):
    ``pytest benchmarks -m target`` runs only them, which fits one GPU run of a few minutes where
    the full grid compiles hundreds of graphs.
    """
    return (TARGET,) if shape in targets.get(device, ()) else ()


def op_cases(cpu_shapes: Sequence[Tuple[int, int]], gpu_shapes: Sequence[Tuple[int, int]],
             *, width_name: str, modes: Sequence[str] = MODES,
             providers: Sequence[str] = OP_PROVIDERS,
             targets: Optional[Dict[str, Collection[Tuple[int, int]]]] = None) -> List:
    """pytest params (mode, device, dtype, shape, provider) over every device of this machine;
    the shapes in ``targets`` (``{"cpu": [...], "cuda": [...]}``) carry the ``target`` mark."""
    out = []
    for mode in modes:
        for device in devices():
            shapes = cpu_shapes if device == "cpu" else gpu_shapes
            for dtype in dtypes(device):
                for b, w in shapes:
                    for provider in providers:
                        out.append(pytest.param(
                            mode, device, dtype, (b, w), provider,
                            marks=target_marks(device, (b, w), targets or {}),
                            id=f"{mode}-{device}-{dtype_name(dtype)}-B{b}x{width_name}{w}-{provider}"))
    return out


# ---------------------------------------------------------------- providers

def need(module: str, attr: Optional[str] = None):
    """Import ``module`` (and return ``attr`` of it). Skips the benchmark, saying so, only when a
    third-party package it imports is not installed (Triton on a machine without it); a missing
    or broken part of dmil_fast itself is an error, not a skip."""
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] != "dmil_fast":
            pytest.skip(f"{module} needs {exc.name}, which is not installed")
        raise
    return getattr(mod, attr) if attr is not None else mod


def provider_skip_reason(op_name: str, provider: str, device: str, dtype: torch.dtype, *,
                         untimed: bool = False) -> Optional[str]:
    """Why ``provider`` cannot run op ``op_name`` on (device, dtype), from the ops' own dispatch
    table (``dmil_fast.ops._dispatch``); ``None`` when it can.

    On the CPU the Triton provider runs only ``untimed`` and under the interpreter: a smoke call of
    the glue the GPU run times (kernel signatures, launch arguments), never a timing.
    """
    if provider in ("reference", "compile"):
        return None
    if provider == "triton" and device == "cpu" and not (
            untimed and os.environ.get("TRITON_INTERPRET") == "1"):
        return TRITON_CPU_REASON
    dispatch = need("dmil_fast.ops._dispatch")
    need("dmil_fast.ops")  # importing the ops registers their capability tables
    tables = {op.name: op for op in dispatch.registered_ops()}
    if op_name not in tables:
        return f"dmil_fast.ops registers no backends for {op_name}"
    check = tables[op_name].checks.get(provider)
    if check is None:
        return f"{op_name} has no {provider!r} backend"
    return check(torch.device(device), dtype)


def skip_unless_available(op_name: str, provider: str, device: str, dtype: torch.dtype,
                          benchmark=None) -> None:
    """Skip, with the reason, unless ``provider`` runs here (``benchmark``: whether it is timed)."""
    untimed = bool(getattr(benchmark, "disabled", False))
    reason = provider_skip_reason(op_name, provider, device, dtype, untimed=untimed)
    if reason is not None:
        pytest.skip(f"{provider}: {reason}")


def skip_compiled_backward_on_cpu(provider: str, device: str, mode: str) -> None:
    if provider == "compile" and device == "cpu" and mode != "fwd":
        pytest.skip(CPU_COMPILE_FWD_ONLY_REASON)


def compiled(fn: Callable) -> Callable:
    """``torch.compile(fn, dynamic=False)`` after clearing the compiler's caches, so that earlier
    shapes never push this one over the recompile limit (which would silently fall back to eager)."""
    torch.compiler.reset()
    return torch.compile(fn, dynamic=False)


# ---------------------------------------------------------------- timing

def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@functools.lru_cache(maxsize=None)
def _flush_buffer(device: str) -> torch.Tensor:
    return torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device=device)


def flush_l2(device: str) -> None:
    """Write 256 MB on ``device`` and wait, evicting the L2 cache (no-op on the CPU)."""
    if device == "cuda":
        _flush_buffer(device).zero_()
        torch.cuda.synchronize()


def _clamp(value: float, low: int, high: int) -> int:
    return int(max(low, min(high, value)))


def _plan(probe_s: float, device: str) -> Tuple[int, int]:
    """(rounds, iterations) for a function whose one synchronised call takes ``probe_s``."""
    probe_s = max(probe_s, 1e-7)
    if device == "cuda":
        return _clamp(_GPU_BUDGET_S / probe_s, _GPU_MIN_ROUNDS, _GPU_MAX_ROUNDS), 1
    iterations = _clamp(math.ceil(_CPU_MIN_ROUND_S / probe_s), 1, 1000)
    return _clamp(_CPU_BUDGET_S / (probe_s * iterations), _CPU_MIN_ROUNDS, _CPU_MAX_ROUNDS), iterations


def measure(benchmark, fn: Callable[[], object], device: str, *, warmup: int = 2):
    """Time ``fn`` with pytest-benchmark and return its last result.

    CUDA: one call per round, an L2 flush before each (untimed), the synchronisation inside the
    timed call. CPU: rounds of several calls when one is shorter than 2 ms, and the minor page faults
    per timed call in ``extra_info["page_faults_per_call"]``. Each call's result is dropped before
    the next call. With ``--benchmark-disable`` the function runs once, untimed.
    """
    last: List[object] = [None]

    def timed():
        # The previous result is released first: one result alive at a time, as in a loop that
        # consumes each one, so the allocator can hand its memory to the next call (else two
        # generations of outputs alternate, and on the CPU every other call page-faults fresh ones).
        last[0] = None
        last[0] = fn()
        synchronize(device)

    if getattr(benchmark, "disabled", False):
        benchmark.pedantic(timed, rounds=1, iterations=1)
        return last[0]
    for _ in range(max(warmup - 1, 0)):
        timed()
    start = time.perf_counter()
    timed()
    rounds, iterations = _plan(time.perf_counter() - start, device)
    if device == "cuda":
        benchmark.pedantic(timed, setup=lambda: flush_l2(device), rounds=rounds, iterations=1, warmup_rounds=1)
    else:
        faults_before = minor_page_faults()
        benchmark.pedantic(timed, rounds=rounds, iterations=iterations, warmup_rounds=0)
        faults_after = minor_page_faults()
        if faults_before is not None and faults_after is not None:
            benchmark.extra_info["page_faults_per_call"] = round((faults_after - faults_before) / (rounds * iterations), 1)
    return last[0]


def minor_page_faults() -> Optional[int]:
    """Minor page faults of this process so far (``getrusage``), ``None`` where it is unknown.

    On the CPU a call's fresh output memory is faulted in page by page whenever the allocator has
    given it back to the system since the previous call (glibc trims the heap and unmaps large
    blocks); those faults can cost more than the kernel itself, so each CPU benchmark records them
    per call (``extra_info["page_faults_per_call"]``, counted over the timed calls of every thread).
    """
    try:
        import resource
    except ImportError:  # not a POSIX system
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def time_rounds(fn: Callable[[], object], device: str, rounds: int) -> List[float]:
    """Seconds of ``rounds`` synchronised calls of ``fn``, each after an L2 flush (as :func:`measure`)."""
    fn()
    synchronize(device)
    out = []
    for _ in range(rounds):
        flush_l2(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        out.append(time.perf_counter() - start)
    return out


def copy_bandwidth_gbps(device: str) -> float:
    """The device's own copy bandwidth: bytes read + written by a copy of a tensor larger than the
    last-level cache (512 MB on CUDA, 64 MB on the CPU), median of the rounds, in GB/s.

    CUDA times ``clone`` (the caching allocator makes it allocation-free after the first call).
    The CPU copies into a preallocated tensor: a fresh 64 MB CPU allocation is a new mmap whose
    page faults, not the memory bus, would set the time.
    """
    numel = 2**27 if device == "cuda" else 2**24
    src = torch.ones(numel, dtype=torch.float32, device=device)
    if device == "cuda":
        copy = src.clone
    else:
        dst = torch.empty_like(src)

        def copy():
            return dst.copy_(src)
    seconds = time_rounds(copy, device, rounds=20 if device == "cuda" else 7)
    median = sorted(seconds)[len(seconds) // 2]
    return 2 * numel * 4 / median / 1e9


def median_seconds(benchmark) -> Optional[float]:
    stats = getattr(benchmark, "stats", None)
    if not stats:
        return None
    return float(stats.stats.median)


# ---------------------------------------------------------------- metrics and memory

def release_flush_buffer() -> None:
    """Free the L2-flush buffer so that memory statistics count only the benchmark's tensors."""
    _flush_buffer.cache_clear()
    if has_cuda():
        torch.cuda.empty_cache()


def call_memory_mb(fn: Callable[[], object], device: str) -> Dict[str, Optional[float]]:
    """Memory of one untimed call of ``fn`` on CUDA: ``peak_mem_mb`` (``max_memory_allocated``
    during the call, everything the benchmark holds included) and ``extra_mem_mb`` (that peak minus
    what was allocated before the call: intermediates and outputs). ``None`` on the CPU."""
    if device != "cuda":
        return {"peak_mem_mb": None, "extra_mem_mb": None}
    release_flush_buffer()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    return {"peak_mem_mb": peak / 2**20, "extra_mem_mb": (peak - before) / 2**20}


def label(benchmark, *, op: str, variant: str, provider: str, shape: str, dtype: torch.dtype,
          device: str) -> None:
    """Name the benchmark before it runs: its pytest-benchmark group (providers of one case side
    by side) and the descriptive half of ``extra_info``."""
    benchmark.group = f"{op} {variant} {device} {dtype_name(dtype)} {shape}"
    benchmark.extra_info.update({"op": op, "variant": variant, "provider": provider, "shape": shape,
                                 "dtype": dtype_name(dtype), "device": device})


def record(benchmark, *, nbytes: Optional[float] = None, flops: Optional[float] = None,
           items: Optional[float] = None, copy_gbps: Optional[float] = None, **extra) -> Dict[str, object]:
    """The measured half of ``extra_info`` (updated in place: pytest-benchmark keeps a reference).

    ``nbytes``: the minimal bytes one call must move (inputs read once, outputs written once)
    -> ``gbps`` and, with ``copy_gbps`` (memory-bound ops), ``fraction_of_copy_bw``;
    ``flops`` -> ``tflops``; ``items`` (samples per call) -> ``samples_per_s``; ``extra`` (memory
    figures, ...) is stored as given (floats rounded). Rates are ``None`` when nothing was timed
    (``--benchmark-disable``).
    """
    median = median_seconds(benchmark)
    info: Dict[str, object] = {}
    if nbytes is not None:
        gbps = nbytes / median / 1e9 if median else None
        info["gbps"] = _round(gbps)
        if copy_gbps is not None:
            info["copy_gbps"] = _round(copy_gbps)
            info["fraction_of_copy_bw"] = _round(gbps / copy_gbps, 4) if gbps else None
    if flops is not None:
        info["tflops"] = _round(flops / median / 1e12, 4) if median else None
    if items is not None:
        info["samples_per_s"] = _round(items / median, 1) if median else None
    info.update({k: (_round(v) if isinstance(v, float) else v) for k, v in extra.items()})
    benchmark.extra_info.update(info)
    return info


def _round(value: Optional[float], digits: int = 3) -> Optional[float]:
    return None if value is None else round(float(value), digits)


def assert_finite(*tensors: Iterable) -> None:
    """Sanity only: every tensor in the (possibly nested) result is finite."""
    for t in tensors:
        if isinstance(t, torch.Tensor):
            assert bool(torch.isfinite(t.float()).all()), "benchmark output has NaN/inf values"
        elif isinstance(t, (tuple, list)):
            assert_finite(*t)


# ---------------------------------------------------------------- the DMIL training step

#: VGGSound-shaped features: 512-d pooled features per modality, 309 classes.
DMIL_FEATURES = 512
DMIL_CLASSES = 309
#: Step providers: the official architecture (``compile`` compiles it), dmil_fast, and dmil_fast
#: with ``recompute=False``.
DMIL_STEP_PROVIDERS = ("reference", "compile", "dmil_fast", "dmil_fast_keep")


def dmil_step_model(provider: str, embed: int, stage: int, device: str, *, encoder: str = "identity",
                    backend: Optional[str] = None):
    """The model of one step provider, seeded, in train mode with ``stage`` configured.

    ``reference``/``compile``: ``ReferenceDMILModel``; ``dmil_fast``/``dmil_fast_keep``:
    ``DMILModel`` with ``recompute`` True/False and ``backend``. ``encoder``: ``identity`` (the
    inputs are the features) or ``mlp`` (the feature-data MLP encoders).
    """
    if provider not in DMIL_STEP_PROVIDERS:
        raise ValueError(f"provider must be one of {DMIL_STEP_PROVIDERS}, got {provider!r}")
    kwargs = {}
    if provider in ("dmil_fast", "dmil_fast_keep"):
        cls = need("dmil_fast.nn", "DMILModel")
        kwargs = {"recompute": provider == "dmil_fast", "backend": backend}
    else:
        cls = need("dmil_fast.reference.model", "ReferenceDMILModel")

    def make_encoder():
        if encoder == "identity":
            return None
        mlp = need("dmil_fast.nn", "MLPEncoder")
        return mlp(DMIL_FEATURES, hidden=DMIL_FEATURES, depth=2, out_dim=DMIL_FEATURES)

    torch.manual_seed(0)
    model = cls(make_encoder(), make_encoder(), embed, DMIL_CLASSES, None, stage, DMIL_FEATURES, **kwargs)
    model.to(device).train()
    model.configure_stage(stage)  # after train(): stage 2 keeps the frozen modules in eval mode
    return model


def dmil_step_loss(provider: str) -> Callable:
    """``dmil_loss`` as the step of ``provider`` computes it: ``reference``/``compile`` with the
    official trainer's ``F.cross_entropy`` for every term, ``dmil_fast``/``dmil_fast_keep`` with
    dmil_loss's default (``lean_cross_entropy`` for the parts' logits, which the gate keeps anyway:
    no (B, C) log-softmax kept beside them)."""
    if provider not in DMIL_STEP_PROVIDERS:
        raise ValueError(f"provider must be one of {DMIL_STEP_PROVIDERS}, got {provider!r}")
    dmil_loss = need("dmil_fast.train", "dmil_loss")
    if provider in ("dmil_fast", "dmil_fast_keep"):
        return dmil_loss
    return functools.partial(dmil_loss, cross_entropy=torch.nn.functional.cross_entropy)


def dmil_step_batch(batch: int, device: str) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(visual, audio, labels) of one step, seeded: features >= 0 as pooled CNN features are."""
    gen = torch.Generator(device=device).manual_seed(0)
    visual = torch.randn(batch, DMIL_FEATURES, device=device, generator=gen).relu()
    audio = torch.randn(batch, DMIL_FEATURES, device=device, generator=gen).relu()
    labels = torch.randint(0, DMIL_CLASSES, (batch,), device=device, generator=gen)
    return visual, audio, labels
