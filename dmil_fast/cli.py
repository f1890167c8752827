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
from typing import List, Optional

USAGE_ERRORS = (ValueError, TypeError, FileNotFoundError, NotADirectoryError, KeyError)


def _device(name: str) -> str:
    from .demo import resolve_device

    return resolve_device(name)


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


def cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(args)


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
    p.add_argument("--n", type=int, help="number of synthetic samples (default: dmil_fast.demo.DEMO_SAMPLES)")
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
