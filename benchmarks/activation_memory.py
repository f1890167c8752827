"""Activation memory of a DMIL training step, counted from the autograd graph (any device).

    python benchmarks/activation_memory.py [--batch 4096] [--embed 256] [--stages 1 2 3]
                                           [--backend triton] [--json out.json]

prints, per stage, the bytes the backward keeps alive after forward + loss for the official
architecture in eager PyTorch (``ReferenceDMILModel`` with the official loss) and for
``dmil_fast.nn.DMILModel``, and their ratio. The target of the training-step benchmark is a ratio
of at most 60% (measured there on CUDA with the allocator).

What is counted: every tensor saved for the backward (``torch.autograd.graph.saved_tensors_hooks``)
that is still alive once the loss is computed, by the whole storage it keeps alive (a saved view
of a wide tensor keeps all of it), each storage once, leaving out the storages that existed
before the step (parameters, buffers, the input batch). That is what the CUDA measure
(allocated after forward + loss minus allocated before) holds too, less allocator rounding.
The count depends on which tensors are saved, not on the device, so it can be taken on a CPU:
there ``--backend triton`` (the default, the GPU path) runs the Triton kernels under the
interpreter (slow, about 20 s for B = 4096, E = 256).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import weakref
from typing import Callable, Dict, Iterable, List, Tuple

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

from bench_harness import DMIL_CLASSES, DMIL_FEATURES, dmil_step_batch, dmil_step_loss, dmil_step_model  # noqa: E402


def saved_activation_bytes(run: Callable[[], object], keep: Iterable[torch.Tensor] = ()
                           ) -> Tuple[int, int, object]:
    """Run ``run()`` and count what its autograd graph holds for the backward afterwards.

    Returns (bytes, number of storages, run's result). The result is kept (it holds the graph)
    until the count is taken. Storages of ``keep`` (tensors that exist before the step) are left
    out.
    """
    before = {t.untyped_storage().data_ptr() for t in keep}
    saved: List[weakref.ref] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        # A detached alias (same storage): packing ``t`` itself would tie a saved output to its
        # own grad_fn in a cycle that outlives the graph.
        alias = t.detach()
        saved.append(weakref.ref(alias))
        return alias

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = run()
    gc.collect()
    storages: Dict[int, int] = {}
    for ref in saved:
        t = ref()
        if t is None:  # saved by a graph that is gone already
            continue
        storage = t.untyped_storage()
        if storage.data_ptr() not in before:
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values()), len(storages), result


def step_activation_bytes(provider: str, stage: int, batch: int, embed: int, *,
                          backend: str = "triton", device: str = "cpu",
                          recompute: bool = True) -> Tuple[int, int]:
    """(bytes, storages) kept for the backward by one training step of ``provider``
    ("reference": the official architecture and loss in eager PyTorch; "dmil_fast", built with
    ``recompute``)."""
    from dmil_fast.train import DMILConfig

    if provider not in ("reference", "dmil_fast"):
        raise ValueError(f"provider must be 'reference' or 'dmil_fast', got {provider!r}")
    if provider == "dmil_fast" and not recompute:
        provider = "dmil_fast_keep"
    model = dmil_step_model(provider, embed, stage, device, backend=backend)
    dmil_loss = dmil_step_loss(provider)
    visual, audio, labels = dmil_step_batch(batch, device)
    config = DMILConfig()

    def run():
        return dmil_loss(model(visual, audio), labels, stage=stage, config=config)[0]

    keep = [*model.parameters(), *model.buffers(), visual, audio, labels]
    nbytes, count, loss = saved_activation_bytes(run, keep)
    if not torch.isfinite(loss):
        raise RuntimeError(f"{provider} stage {stage}: the loss is not finite ({loss.item()})")
    return nbytes, count


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=4096, help="B (default 4096)")
    parser.add_argument("--embed", type=int, default=256, help="E (default 256)")
    parser.add_argument("--stages", type=int, nargs="+", default=[1, 2, 3], choices=[1, 2, 3])
    parser.add_argument("--backend", default="triton", choices=["triton", "reference"],
                        help="dmil_fast's op backend (default triton, the GPU path)")
    parser.add_argument("--no-recompute", dest="recompute", action="store_false",
                        help="build DMILModel with recompute=False (keep the heads' projections)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    for name in ("batch", "embed"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    rows = []
    print(f"activation memory kept for the backward, B={args.batch} D={DMIL_FEATURES} E={args.embed} "
          f"C={DMIL_CLASSES}, dmil_fast backend={args.backend} recompute={args.recompute}, "
          f"device={args.device}")
    print("| stage | official eager (MiB) | dmil_fast (MiB) | ratio |")
    print("|---|---|---|---|")
    for stage in args.stages:
        ref, _ = step_activation_bytes("reference", stage, args.batch, args.embed, device=args.device)
        fast, _ = step_activation_bytes("dmil_fast", stage, args.batch, args.embed,
                                        backend=args.backend, device=args.device,
                                        recompute=args.recompute)
        rows.append({"stage": stage, "reference_bytes": ref, "dmil_fast_bytes": fast,
                     "ratio": fast / ref})
        print(f"| {stage} | {ref / 2**20:.1f} | {fast / 2**20:.1f} | {fast / ref:.3f} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"batch": args.batch, "embed": args.embed, "features": DMIL_FEATURES,
                       "num_classes": DMIL_CLASSES, "backend": args.backend,
                       "recompute": args.recompute,
                       "device": args.device, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
