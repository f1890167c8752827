"""The ``dmil-fast`` command (also ``python -m dmil_fast``).

    dmil-fast train --data DIR --method {dmil,joint,ensemble} --out DIR [--epochs N] [--config FILE]
                    [--seed S] [--preset {published,features}] [--device D]
    dmil-fast demo  [--out DIR] [--n N] [--epochs N] [--seed S] [--tiny]
    dmil-fast score --data DIR [--model CHECKPOINT] --out DIR [--redundancy {lsmi,mmi}] [--epochs N]
    dmil-fast info  [--json]

Bad input (missing files, inconsistent arrays, NaN features, empty splits, bad settings) is
reported as ``error: ...`` on stderr with exit status 2 before any training starts. Set
``DMIL_FAST_DEBUG=1`` to get the traceback instead.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

#: The demo's synthetic mix of (redundancy, unique_1, unique_2, synergy). No unique samples: in
#: ``make_synthetic`` a unique-1, unique-2 and synergistic sample with symbols (a, b) look alike
#: (both symbols uniform and independent), so their labels a, b and (a + b) mod C cannot be told
#: apart from the input and a mix of the three caps every model near 1/3 on them. With redundant
#: and synergistic samples only, the label is recoverable (Bayes accuracy about 0.92).
DEMO_MIX = (0.5, 0.0, 0.0, 0.5)
DEMO_METHODS = ("joint", "ensemble", "dmil")
#: Demo set size: 12000 samples (1800 test) keeps the standard error of the accuracies near 0.01.
DEMO_SAMPLES = 12000
USAGE_ERRORS = (ValueError, TypeError, FileNotFoundError, NotADirectoryError, KeyError)


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def _config(args):
    from .train import DMILConfig

    if args.config:
        config = DMILConfig.from_yaml(args.config, preset=args.preset)
    else:
        config = DMILConfig.from_preset(args.preset)
    if args.seed is not None:
        config = DMILConfig(**dict(config.to_dict(), random_seed=args.seed, adam_betas=config.adam_betas))
    if args.epochs is not None:
        config = config.scaled(args.epochs)
    return config


def cmd_train(args) -> int:
    from .train import FeatureData, train

    data = FeatureData.load(args.data)  # every data check runs before the model exists
    config = _config(args)
    metrics = train(data, method=args.method, config=config, out_dir=args.out, device=_device(args.device),
                    progress=not args.no_progress, echo=None if args.quiet else print)
    types = ", ".join(f"{k} {v:.3f}" for k, v in metrics["per_type_accuracy"].items() if v is not None)
    print(f"test accuracy {metrics['test_accuracy']:.4f}  Syn. {metrics['syn']:.4f}"
          + (f"  ({types})" if types else "") + f"  -> {Path(args.out) / 'metrics.json'}")
    return 0


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
    ax.axhline(chance, color="gray", linestyle="--", linewidth=1, label="chance")
    ax.set_xticks(x, groups)
    ax.set_ylim(0, 1)
    ax.set_ylabel("test accuracy (Syn.: fraction of samples)")
    ax.set_title("Synthetic benchmark: accuracy by ground-truth interaction type")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def cmd_demo(args) -> int:
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
    epochs = args.epochs if args.epochs is not None else (3 if args.tiny else None)
    path = make_synthetic(out / "data", n=n, mix=DEMO_MIX, seed=args.seed)
    data = FeatureData.load(path)
    print(f"synthetic set: {n} samples, mix (redundancy, unique_1, unique_2, synergy) = {DEMO_MIX}, "
          f"{data.num_classes} classes, chance {1 / data.num_classes:.3f}")
    device = _device(args.device)
    threads = torch.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(1)  # tiny models: one thread beats several that mostly synchronise
    results = {}
    try:
        _train_demo_methods(args, data, out, device, epochs, results)
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


def _train_demo_methods(args, data, out: Path, device: str, epochs, results: Dict[str, dict]) -> None:
    from .train import DMILConfig, train

    for method in DEMO_METHODS:
        if args.config:
            config = DMILConfig.from_yaml(args.config, preset="features")
            config = DMILConfig(**dict(config.to_dict(), random_seed=args.seed, adam_betas=config.adam_betas))
        else:
            config = DMILConfig.for_features(random_seed=args.seed)
        if epochs is not None:
            config = config.scaled(epochs)
        print(f"training {method} ({config.n_epochs} epochs) ...", flush=True)
        results[method] = train(data, method=method, config=config, out_dir=out / method, device=device,
                                progress=False, echo=None)


def cmd_score(args) -> int:
    try:
        from .interactions.report import main as report_main
    except ImportError as exc:
        raise ValueError(f"dmil-fast score is unavailable: dmil_fast.interactions.report cannot be imported ({exc})")
    return int(report_main(args) or 0)


def cmd_info(args) -> int:
    from .info import main as info_main

    return int(info_main(["--json"] if args.json else []) or 0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dmil-fast", description="Fast DMIL: training, demo, interaction scoring.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train DMIL or a baseline on a feature dataset")
    p.add_argument("--data", required=True, help="feature dataset directory (or .h5 file)")
    p.add_argument("--method", required=True, choices=("dmil", "joint", "ensemble"))
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--epochs", type=int, help="total epochs; the stage schedule scales proportionally")
    p.add_argument("--config", help="YAML file of DMILConfig settings (official names)")
    p.add_argument("--seed", type=int, help="random seed (default: the config's random_seed)")
    p.add_argument("--preset", choices=("published", "features"), default="features",
                   help="defaults: 'features' for pre-extracted features (default), 'published' as in the paper")
    p.add_argument("--device", default="auto", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--quiet", action="store_true", help="no per-epoch lines")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("demo", help="synthetic benchmark: joint vs ensemble vs DMIL")
    p.add_argument("--out", default="demo_out", help="output directory (default: demo_out)")
    p.add_argument("--n", type=int, help=f"number of synthetic samples (default {DEMO_SAMPLES})")
    p.add_argument("--epochs", type=int, help="epochs per method (default: the features preset)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--config", help="YAML file of DMILConfig settings on top of the features preset")
    p.add_argument("--tiny", action="store_true", help="a seconds-long smoke run (900 samples, 3 epochs)")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("score", help="per-sample interactions (LSMI) of a dataset or a trained model")
    p.add_argument("--data", required=True)
    p.add_argument("--model", help="checkpoint written by dmil-fast train (score its outputs)")
    p.add_argument("--out", required=True)
    p.add_argument("--redundancy", choices=("lsmi", "mmi"), default="lsmi")
    p.add_argument("--epochs", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, dest="batch_size")
    p.add_argument("--no-progress", action="store_false", dest="progress")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("info", help="versions and available backends")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("epochs", "n"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            print(f"error: --{name} must be a positive int, got {value}", file=sys.stderr)
            return 2
    try:
        return args.func(args)
    except USAGE_ERRORS as exc:
        if os.environ.get("DMIL_FAST_DEBUG") == "1":
            raise
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
