"""``dmil-fast demo``: the synthetic benchmark with per-sample interaction types.

Makes a synthetic feature set (``dmil_fast.data.make_synthetic``), trains the joint and ensemble
baselines and DMIL with the features preset, prints overall and per-type test accuracy and Syn.,
and saves a bar chart.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Sequence

from ._settings import check_device, check_out_dir


#: The demo's synthetic mix of (redundancy, unique_1, unique_2, synergy): all four types.
DEMO_MIX = (0.25, 0.25, 0.25, 0.25)
DEMO_METHODS = ("joint", "ensemble", "dmil")
#: Demo set size: 12000 samples (1800 test) keeps the standard error of the accuracies near 0.01.
DEMO_SAMPLES = 12000
#: The smallest set ``--n`` takes: 200 samples leave 30 for the test split, about 7 per type.
DEMO_MIN_SAMPLES = 200

def _present(results: Dict[str, dict], type_names: Sequence[str]) -> List[str]:
    """The types with test samples (a type absent from the mix has accuracy None everywhere)."""
    return [t for t in type_names if any(m["per_type_accuracy"].get(t) is not None for m in results.values())]


def _format_table(results: Dict[str, dict], type_names: Sequence[str]) -> str:
    type_names = _present(results, type_names)
    cols = ["overall"] + list(type_names) + ["Syn.", "time"]
    lines = [f"{'method':<10}" + "".join(f"{c:>12}" for c in cols)]
    for method, m in results.items():
        cells = [m["test_accuracy"]] + [m["per_type_accuracy"].get(t) for t in type_names] + [m["syn"]]
        row = "".join(f"{v:>12.3f}" if v is not None else f"{'-':>12}" for v in cells)
        lines.append(f"{method:<10}" + row + f"{m['seconds']:>11.1f}s")
    return "\n".join(lines)


def _plot(results: Dict[str, dict], type_names: Sequence[str], path: Path, chance: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    groups = ["overall"] + _present(results, type_names) + ["Syn."]
    x = np.arange(len(groups))
    width = 0.8 / len(results)
    fig, ax = plt.subplots(figsize=(1.6 * len(groups) + 2, 3.6))
    for i, (method, m) in enumerate(results.items()):
        values = [m["test_accuracy"]] + [m["per_type_accuracy"].get(t) or 0.0 for t in groups[1:-1]] + [m["syn"]]
        ax.bar(x + (i - (len(results) - 1) / 2) * width, values, width, label=method)
    last_accuracy = len(groups) - 1.5  # Syn. is a fraction of samples, not an accuracy: no chance line there
    ax.hlines(chance, -0.5, last_accuracy, color="gray", linestyle="--", linewidth=1, label="chance")
    ax.axvline(last_accuracy, color="lightgray", linewidth=0.8)
    ax.set_xlim(-0.5, len(groups) - 0.5)
    ax.set_xticks(x, groups)
    ax.set_ylim(0, 1)
    ax.set_ylabel("test accuracy (Syn.: fraction of samples)")
    ax.set_title("Synthetic benchmark: accuracy by ground-truth interaction type")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_demo(args) -> int:
    """Synthetic set (``DEMO_MIX``) -> joint, ensemble and DMIL with the features preset -> a table of
    test accuracy overall and per interaction type, Syn., and a bar chart ``OUT/demo.png``.

    On CPU the training runs single-threaded (the models are tiny); the thread count is restored.
    """
    import time

    import torch

    from .data import make_synthetic
    from .train import FeatureData

    start = time.perf_counter()
    out = Path(args.out)
    n = args.n if args.n is not None else (900 if args.tiny else DEMO_SAMPLES)
    if n < DEMO_MIN_SAMPLES:
        raise ValueError(f"--n must be at least {DEMO_MIN_SAMPLES} (15% of the samples are the test split), got {n}")
    epochs = args.epochs if args.epochs is not None else (3 if args.tiny else None)
    device = str(check_device(args.device, name="--device"))  # settings first, before any data is written
    check_out_dir(out)
    config = _demo_config(args, epochs)
    path = make_synthetic(out / "data", n=n, mix=DEMO_MIX, seed=args.seed, overwrite=True)
    data = FeatureData.load(path)
    print(f"synthetic set: {n} samples, mix (redundancy, unique_1, unique_2, synergy) = {DEMO_MIX}, "
          f"{data.num_classes} classes, chance {1 / data.num_classes:.3f}")
    threads = torch.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(1)  # tiny models: one thread beats several that mostly synchronise
    results = {}
    try:
        _train_demo_methods(config, data, out, device, results)
    finally:
        torch.set_num_threads(threads)
    type_names = data.type_names or []
    print()
    print(_format_table(results, type_names))
    print(f"(accuracies on {len(data.test)} test samples carry a standard error of up to "
          f"{(0.25 / len(data.test)) ** 0.5:.3f}; Syn.: fraction of test samples the multimodal prediction "
          "gets right while both unimodal ones are wrong)")
    chart = out / "demo.png"
    _plot(results, type_names, chart, 1.0 / data.num_classes)
    print(f"\nchart: {chart}   total {time.perf_counter() - start:.1f}s")
    return 0


def _demo_config(args, epochs):
    """The features preset (or ``--config`` on top of it) with the demo's seed and epochs."""
    from .train import DMILConfig

    if args.config:
        config = DMILConfig.from_yaml(args.config, preset="features")
        config = DMILConfig(**dict(config.to_dict(), random_seed=args.seed, adam_betas=config.adam_betas))
    else:
        config = DMILConfig.for_features(random_seed=args.seed)
    return config if epochs is None else config.scaled(epochs)


def _train_demo_methods(config, data, out: Path, device: str, results: Dict[str, dict]) -> None:
    from .train import train

    for method in DEMO_METHODS:
        print(f"training {method} ({config.n_epochs} epochs) ...", flush=True)
        results[method] = train(data, method=method, config=config, out_dir=out / method, device=device,
                                progress=False, echo=None, overwrite=True)  # the demo's own earlier output
