"""The ``dmil-fast`` command (also ``python -m dmil_fast``).

    dmil-fast train --data DIR --method {dmil,joint,ensemble} --out DIR [--epochs N] [--config FILE]
                    [--seed S] [--preset {published,features}] [--device D] [--no-progress] [--quiet]
                    [--resume] [--checkpoint-every K] [--amp {none,bf16}] [--sync-bn] [--compile [BACKEND]]
                    [--init-from CKPT] [--backend NAME] [--stream | --in-memory] [--workers N]
                    [--threads N] [--pretrained RESNET18] [--num-frames T] [--frame-dir DIR]
    torchrun --nproc_per_node N -m dmil_fast train ...     (data parallel: NCCL on GPUs, gloo on CPU)
    dmil-fast demo  [--out DIR] [--n N] [--epochs N] [--seed S] [--config FILE] [--tiny] [--device D]
    dmil-fast score --data DIR [--model CHECKPOINT] --out DIR [--redundancy {lsmi,mmi}] [--epochs N]
                    [--seed S] [--batch-size N] [--device D] [--threads N] [--no-progress]
    dmil-fast bench [--all] [-k EXPR] [--out DIR] [--threads N] [--suite DIR]
    dmil-fast info  [--json]

``dmil-fast COMMAND --help`` says what each option does.

``--data`` is a feature dataset (directory of ``.npy`` files or an ``.h5`` file) or a raw CREMA-D
root (a directory with ``train.csv`` and ``test.csv``; needs ``pip install dmil-fast[av]``),
trained with the official ResNet18 encoders (``--pretrained``: ImageNet ``resnet18`` weights).

Never losing work: ``OUT/checkpoints/last.pt`` is written atomically at the end of every epoch
and every ``--checkpoint-every`` steps; ``--resume`` continues a killed run from it exactly
(same metrics as an uninterrupted run; without a ``last.pt`` it starts from scratch and says so).
``--init-from`` starts from other weights: a dmil-fast checkpoint, an official DMIL checkpoint
or a plain state_dict file.

Bad input (missing files, inconsistent arrays, NaN features, empty splits, unreadable media,
corrupt checkpoints, bad settings) is reported as ``error: ...`` on stderr with exit status 2
before any training starts (a media file that fails to decode mid-epoch: when it is read,
naming the sample and file). A run whose model became NaN (a diverged training) stops with
``error: training diverged at epoch ...`` (an op of the model met NaN) or ``error: training loss
became nan at epoch ...`` and exit status 1; the checkpoints written before it stay. Set ``DMIL_FAST_DEBUG=1`` to get the traceback instead.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import List, Optional

from ._settings import check_device, check_out_dir
from .bench import add_arguments as bench_arguments
from .demo import DEMO_MIN_SAMPLES, DEMO_SAMPLES
from .interactions.report import add_arguments as score_arguments
from .ops import BackendUnavailableError

USAGE_ERRORS = (ValueError, TypeError, FileNotFoundError, FileExistsError, NotADirectoryError, KeyError,
                ImportError, BackendUnavailableError)


def _check_settings(args) -> None:
    """Settings that need no data: checked before anything is read or written."""
    import torch

    from .nn.dmil import MODEL_BACKENDS, model_backend
    from .ops._dispatch import ENV_VAR
    from .train.trainer import AMP_DTYPES

    device = check_device(args.device, name="--device")
    if isinstance(args.compile, str):
        known = torch.compiler.list_backends(exclude_tags=())
        if args.compile not in known:
            raise ValueError(f"--compile must name a torch.compile backend such as inductor, aot_eager or eager "
                             f"(torch.compiler.list_backends(exclude_tags=()) lists them all), got {args.compile!r}")
    env = os.environ.get(ENV_VAR)
    if env and args.method == "dmil" and args.backend is None and env not in MODEL_BACKENDS:
        raise ValueError(f"{ENV_VAR}={env!r}: the DMIL model's ops run {' or '.join(MODEL_BACKENDS)} "
                         f"(unset it to let them choose by device)")
    if args.backend is not None:
        if args.method != "dmil":
            raise ValueError(f"--backend applies to the DMIL model's fused ops; the {args.method} baseline "
                             "runs plain PyTorch layers")
        if args.backend not in MODEL_BACKENDS:
            raise ValueError(f"--backend must be one of {', '.join(MODEL_BACKENDS)} (the DMIL model's ops have "
                             f"no other kernel), got {args.backend!r}")
    if args.method == "dmil":  # can the model's ops run there? (the Trainer checks again on the model)
        model_backend(args.backend, device, AMP_DTYPES.get(args.amp, torch.float32))
    check_out_dir(args.out)


def _config(args, preset: str) -> tuple:
    """(the run's DMILConfig, a note for stderr when --epochs leaves a DMIL stage out, or None)."""
    from .train import DMILConfig

    if args.config:
        config = DMILConfig.from_yaml(args.config, preset=preset)
        if args.preset is not None and config.preset != args.preset:
            raise ValueError(f"--preset {args.preset} and the preset {config.preset!r} that {args.config} sets "
                             "disagree: give one of them")
    else:
        config = DMILConfig.from_preset(preset)
    if args.seed is not None:
        config = DMILConfig(**dict(config.to_dict(), random_seed=args.seed, adam_betas=config.adam_betas))
    note = None
    if args.epochs is not None:
        full, config = config, config.scaled(args.epochs)
        if getattr(args, "method", None) == "dmil":
            note = _dropped_stages_note(full, config, args.epochs)
    return config, note


def _stage_epochs(config) -> tuple:
    """Epochs of DMIL stages 1, 2, 3 under ``config``, counted from the trainer's schedule."""
    from .train import stage_of_epoch

    stages = [stage_of_epoch(epoch, config) for epoch in range(1, config.n_epochs + 1)]
    return tuple(stages.count(stage) for stage in (1, 2, 3))


def _dropped_stages_note(full, scaled, epochs: int) -> Optional[str]:
    """What to say when scaling to ``--epochs`` leaves a DMIL stage of the schedule without epochs."""
    before, after = _stage_epochs(full), _stage_epochs(scaled)
    dropped = [str(k + 1) for k in range(3) if before[k] > 0 and after[k] == 0]
    if not dropped:
        return None
    last = max(k + 1 for k in range(3) if after[k] > 0)
    return (f"note: --epochs {epochs} leaves DMIL stage {' and '.join(dropped)} without epochs (stages 1/2/3: "
            f"{'/'.join(map(str, after))}); the test uses the stage-{last} model")


def _load_data(args, config):
    """Every data check runs here, before the model exists."""
    from .train import FeatureData
    from .train.media import MediaData, looks_like_cremad

    if args.pretrained and args.init_from:
        raise ValueError("--pretrained and --init-from both set the initial weights: give one of them")
    if looks_like_cremad(args.data):
        given = {k: v for k, v in (("num_frames", args.num_frames), ("frame_dir", args.frame_dir)) if v is not None}
        return MediaData.load(args.data, seed=config.random_seed, **given)
    for flag, value in (("--pretrained", args.pretrained), ("--num-frames", args.num_frames),
                        ("--frame-dir", args.frame_dir)):
        if value is not None:
            raise ValueError(f"{flag} applies to raw CREMA-D video: it needs a raw CREMA-D --data directory")
    return FeatureData.load(args.data, stream=args.stream)


def cmd_train(args) -> int:
    import torch

    from .train import Trainer
    from .train.distributed import init_distributed, shutdown
    from .train.resume import check_fresh_out_dir
    from .train.media import load_pretrained_encoders, looks_like_cremad

    _check_settings(args)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:  # under torchrun the trainer checks, on rank 0 for all
        check_fresh_out_dir(args.out, resume=args.resume, overwrite=args.overwrite)  # before reading any data
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    preset = args.preset or ("published" if looks_like_cremad(args.data) else "features")
    config, note = _config(args, preset)
    data = _load_data(args, config)
    dist = init_distributed(args.device)
    try:
        trainer = Trainer(data, config, method=args.method, out_dir=args.out, dist=dist,
                          progress=not args.no_progress, echo=None if args.quiet else _echo,
                          amp=None if args.amp == "none" else args.amp, compile=args.compile or False,
                          checkpoint_every=args.checkpoint_every, workers=args.workers, init_from=args.init_from,
                          backend=args.backend, sync_bn=args.sync_bn, overwrite=args.overwrite)
        if args.pretrained:
            load_pretrained_encoders(trainer.model, args.pretrained)
        if note is not None and dist.is_main and not args.resume:  # settings checked; said when the run began
            print(note, file=sys.stderr, flush=True)
        metrics = trainer.fit(resume=args.resume)
    finally:
        shutdown(dist)
    if dist.is_main:
        types = ", ".join(f"{k} {v:.3f}" for k, v in metrics["per_type_accuracy"].items() if v is not None)
        print(f"test accuracy {metrics['test_accuracy']:.4f}  Syn. {metrics['syn']:.4f}"
              + (f"  ({types})" if types else "") + f"  -> {Path(args.out) / 'metrics.json'}")
    return 0


def _echo(line: str) -> None:
    print(line, flush=True)


def cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(args)


def cmd_score(args) -> int:
    from .interactions.report import main as report_main

    return int(report_main(args) or 0)


def cmd_bench(args) -> int:
    from .bench import main as bench_main

    return bench_main(args)


def cmd_info(args) -> int:
    from .info import main as info_main

    return int(info_main(["--json"] if args.json else []) or 0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dmil-fast", description="Fast DMIL: training, demo, interaction scoring.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train DMIL or a baseline on a feature dataset or raw CREMA-D")
    p.add_argument("--data", required=True, help="feature dataset directory (or .h5 file), or a CREMA-D root")
    p.add_argument("--method", required=True, choices=("dmil", "joint", "ensemble"),
                   help="DMIL (three stages), or the joint / ensemble baseline")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--epochs", type=int, help="total epochs; the stage schedule scales proportionally (a DMIL stage it leaves "
                   "without epochs is noted on stderr)")
    p.add_argument("--config", help="YAML file of DMILConfig settings (official names)")
    p.add_argument("--seed", type=int, help="random seed (default: the config's random_seed)")
    p.add_argument("--preset", choices=("published", "features"),
                   help="defaults: 'features' for feature data, 'published' (as in the paper) for CREMA-D")
    p.add_argument("--device", default="auto", help="torch device (default: cuda if available, else cpu; "
                   "under torchrun each rank takes cuda:LOCAL_RANK)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--quiet", action="store_true", help="no per-epoch lines")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/last.pt")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in an --out that holds an earlier run's checkpoints or metrics.json, "
                        "replacing them (without it, such an --out is refused unless --resume continues it)")
    p.add_argument("--checkpoint-every", type=int, default=0, metavar="K",
                   help="also write last.pt every K steps within an epoch (default: at epoch ends only)")
    p.add_argument("--amp", choices=("none", "bf16"), default="none", help="bf16 autocast (default: none)")
    p.add_argument("--sync-bn", action="store_true",
                   help="under torchrun on GPUs: BatchNorm statistics over the global batch (SyncBatchNorm)")
    p.add_argument("--compile", nargs="?", const=True, metavar="BACKEND",
                   help="torch.compile the model (default backend: inductor)")
    p.add_argument("--init-from", metavar="CKPT",
                   help="initial weights: a dmil-fast checkpoint, an official DMIL checkpoint or a state_dict")
    p.add_argument("--backend", help="ops backend of the DMIL model: reference or triton (default: the ops "
                   "choose by device)")
    stream = p.add_mutually_exclusive_group()
    stream.add_argument("--stream", action="store_true", default=None,
                        help="read features from disk batch by batch (default: when they exceed 2 GiB)")
    stream.add_argument("--in-memory", action="store_false", dest="stream", help="load the features into memory")
    p.add_argument("--workers", type=int, help="DataLoader workers for streamed data (default 2)")
    p.add_argument("--threads", type=int, help="CPU threads of torch (default: torch's choice; small models "
                   "on few cores often run faster with 1)")
    p.add_argument("--pretrained", metavar="RESNET18",
                   help="CREMA-D: ImageNet resnet18 weights (torchvision names) for both encoders")
    p.add_argument("--num-frames", type=int, help="CREMA-D: frames per clip (default 1)")
    p.add_argument("--frame-dir", help="CREMA-D: folder of frame folders (default Image-01-FPS)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("demo", help="synthetic benchmark: joint vs ensemble vs DMIL")
    p.add_argument("--out", default="demo_out", help="output directory (default: demo_out)")
    p.add_argument("--n", type=int, help=f"number of synthetic samples (default {DEMO_SAMPLES})")
    p.add_argument("--epochs", type=int, help="epochs per method (default: the features preset)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data and of every method (default 0)")
    p.add_argument("--config", help="YAML file of DMILConfig settings on top of the features preset")
    p.add_argument("--tiny", action="store_true", help="a seconds-long smoke run (900 samples, 3 epochs)")
    p.add_argument("--device", default="auto", help="torch device (default: cuda if available, else cpu)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("score", help="per-sample interactions (LSMI) of a dataset or a trained model")
    score_arguments(p)
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("bench", help="the benchmark suite's target cases, then each performance target's verdict")
    bench_arguments(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("info", help="versions and available backends")
    p.add_argument("--json", action="store_true", help="print it as JSON")
    p.set_defaults(func=cmd_info)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    for name, low in (("epochs", 1), ("n", DEMO_MIN_SAMPLES), ("checkpoint_every", 0), ("workers", 0),
                      ("num_frames", 1), ("threads", 1), ("seed", 0)):  # score checks --batch-size itself
        value = getattr(args, name, None)
        if value is not None and value < low:
            flag = "--" + name.replace("_", "-")
            print(f"error: {flag} must be an int >= {low}, got {value}", file=sys.stderr)
            return 2
    try:
        return args.func(args)
    except USAGE_ERRORS as exc:
        if os.environ.get("DMIL_FAST_DEBUG") == "1":
            raise
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"error: {message}", file=sys.stderr)
        return 2
    except FloatingPointError as exc:  # a diverged training run (its checkpoints are kept)
        if os.environ.get("DMIL_FAST_DEBUG") == "1":
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
