"""The performance targets, judged on saved benchmark results.

    python benchmarks/bench_targets.py benchmarks/results/<device>-<date>.json [more.json ...]

prints one Markdown table: for every target, each case it is judged on, the measured ratio (or
fraction of copy bandwidth), the goal and whether it is met. Every number comes from the JSON
files (medians of the timed rounds, ``extra_info`` of each benchmark); a target with no measured
case says so. Only the cases marked ``target`` (``extra_info["target"]``, the shapes each
benchmark file's ``TARGETS`` names) are judged, so a run of the whole grid gets the same verdicts
as one of ``-m target``; files written before that field existed are judged on every case.
Several files are read as one run only for the table: each ratio is formed inside one file, from
providers timed side by side in one session.

The targets (H100; issue "Benchmarks"):

- ``gaussian_sample``, ``diagonal_gaussian_kl`` and ``interaction_scores`` kernels on the largest
  GPU shape: at least 85% of the copy bandwidth measured in the same run;
- variational-bottleneck epilogue forward+backward: at least 3x eager and 1.25x torch.compile;
- interaction scoring (forward and forward+backward): at least 5x eager and 1.5x torch.compile;
- a DMIL training step on features: at least 2x the official architecture eager and 1.3x its
  torch.compile, activation memory at most 60% of eager;
- on the CPU, the C++ interaction scoring at least 3x the PyTorch reference.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

#: Fused providers per op: the kernels the copy-bandwidth and speed-up targets are about.
FUSED = {"gaussian_sample": ("triton",), "diagonal_gaussian_kl": ("triton",),
         "variational_bottleneck": ("triton",), "interaction_scores": ("cuda", "triton")}
BANDWIDTH_GOAL = 0.85


@dataclass(frozen=True)
class Row:
    """One judged case: ``measured`` against ``goal`` (``higher`` says which way is better)."""

    target: str
    case: str
    measured: Optional[float]
    goal: float
    unit: str  # "x" (a ratio) or "%" (a fraction shown as a percentage)
    higher: bool = True

    @property
    def met(self) -> Optional[bool]:
        if self.measured is None:
            return None
        return self.measured >= self.goal if self.higher else self.measured <= self.goal

    def cells(self) -> Tuple[str, str, str, str, str]:
        sign = ">=" if self.higher else "<="
        if self.unit == "%":
            goal, measured = f"{sign} {100 * self.goal:.0f}%", _pct(self.measured)
        else:
            goal, measured = f"{sign} {self.goal:g}x", _times(self.measured)
        verdict = {True: "met", False: "NOT met", None: "not measured"}[self.met]
        return self.target, self.case, measured, goal, verdict


def _pct(value: Optional[float]) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def _times(value: Optional[float]) -> str:
    return "–" if value is None else f"{value:.2f}x"


# ---------------------------------------------------------------- reading results

@dataclass(frozen=True)
class Result:
    op: str
    variant: str
    provider: str
    shape: str
    dtype: str
    device: str
    median: float
    info: dict

    @property
    def case(self) -> Tuple[str, str, str, str, str]:
        return self.op, self.variant, self.device, self.dtype, self.shape


def read_results(payload: dict) -> List[Result]:
    """The timed target cases of one results file (those without a median are left out; in a file
    that records ``extra_info["target"]``, so are the cases not marked ``target``)."""
    out = []
    records = payload.get("benchmarks", [])
    marked = any("target" in (record.get("extra_info") or {}) for record in records)
    for record in records:
        info = record.get("extra_info", {})
        median = (record.get("stats") or {}).get("median")
        if not median or "op" not in info or (marked and info.get("target") is not True):
            continue
        out.append(Result(info["op"], str(info.get("variant")), str(info.get("provider")),
                          str(info.get("shape")), str(info.get("dtype")), str(info.get("device")),
                          float(median), info))
    return out


def _by_case(results: Iterable[Result]) -> Dict[tuple, Dict[str, Result]]:
    cases: Dict[tuple, Dict[str, Result]] = {}
    for r in results:
        cases.setdefault(r.case, {})[r.provider] = r
    return cases


def _size_of_shape(shape: str) -> int:
    """The product of the ``K=N`` numbers of a shape string (``B=1048576 E=256`` -> 2**28; 0 when
    there are none), so that the largest shape is the one of most elements, not of most rows."""
    size = 0
    for part in shape.split() if shape else ():
        try:
            value = int(part.split("=", 1)[1])
        except (IndexError, ValueError):
            continue
        size = value if size == 0 else size * value
    return size


def _label(case: tuple, provider: str, against: str = "") -> str:
    op, variant, device, dtype, shape = case
    versus = f" vs {against}" if against else ""
    return f"{op} {variant} {device} {dtype} {shape}: {provider}{versus}"


# ---------------------------------------------------------------- the targets

def bandwidth_rows(results: Sequence[Result]) -> List[Row]:
    """Fraction of copy bandwidth of the fused kernels at the largest GPU shape (most elements) of each op."""
    rows = []
    name = "memory-bound kernels, fraction of copy bandwidth"
    for op in ("gaussian_sample", "diagonal_gaussian_kl", "interaction_scores"):
        mine = [r for r in results if r.op == op and r.device == "cuda" and r.provider in FUSED[op]
                and r.info.get("fraction_of_copy_bw") is not None]
        if not mine:
            rows.append(Row(name, f"{op} (cuda)", None, BANDWIDTH_GOAL, "%"))
            continue
        largest = max(_size_of_shape(r.shape) for r in mine)
        for r in sorted((r for r in mine if _size_of_shape(r.shape) == largest),
                        key=lambda r: (r.variant, r.dtype, r.shape, r.provider)):
            rows.append(Row(name, _label(r.case, r.provider), float(r.info["fraction_of_copy_bw"]),
                            BANDWIDTH_GOAL, "%"))
    return rows


def speedup_rows(results: Sequence[Result], *, target: str, op: str, device: str,
                 variants: Sequence[str], goals: Dict[str, float],
                 providers: Sequence[str]) -> List[Row]:
    """``baseline median / provider median`` for every case of ``op`` on ``device`` whose variant
    is in ``variants``, against each baseline in ``goals`` (``{"reference": 3.0, ...}``)."""
    rows = []
    for case, by_provider in sorted(_by_case(r for r in results if r.op == op and r.device == device
                                             and r.variant in variants).items()):
        for provider in providers:
            mine = by_provider.get(provider)
            if mine is None:
                continue
            for baseline, goal in goals.items():
                base = by_provider.get(baseline)
                ratio = base.median / mine.median if base is not None else None
                rows.append(Row(target, _label(case, provider, baseline), ratio, goal, "x"))
    if not rows:
        rows = [Row(target, f"{op} ({device}) vs {baseline}", None, goal, "x")
                for baseline, goal in goals.items()]
    return rows


def activation_rows(results: Sequence[Result]) -> List[Row]:
    """dmil_fast's activation memory of a training step over the eager reference's."""
    rows = []
    target = "DMIL step activation memory vs eager"
    for case, by_provider in sorted(_by_case(r for r in results if r.op == "dmil_step"
                                             and r.device == "cuda").items()):
        mine, base = by_provider.get("dmil_fast"), by_provider.get("reference")
        if mine is None or base is None:
            continue
        a, b = mine.info.get("activation_mem_mb"), base.info.get("activation_mem_mb")
        ratio = a / b if a is not None and b else None
        rows.append(Row(target, _label(case, "dmil_fast", "reference"), ratio, 0.6, "%", higher=False))
    if not rows:
        rows.append(Row(target, "dmil_step (cuda)", None, 0.6, "%", higher=False))
    return rows


def target_rows(results: Sequence[Result]) -> List[Row]:
    """Every target's rows, in the order of the issue."""
    fwd_bwd = ("fwd", "fwd+bwd")
    stages = tuple(f"stage{s} {enc}" for s in (1, 2, 3) for enc in ("identity", "mlp"))
    return (
        bandwidth_rows(results)
        + speedup_rows(results, target="VB epilogue fwd+bwd", op="variational_bottleneck",
                       device="cuda", variants=("epilogue fwd+bwd",),
                       goals={"reference": 3.0, "compile": 1.25}, providers=FUSED["variational_bottleneck"])
        + speedup_rows(results, target="interaction scoring (GPU)", op="interaction_scores",
                       device="cuda", variants=fwd_bwd, goals={"reference": 5.0, "compile": 1.5},
                       providers=FUSED["interaction_scores"])
        + speedup_rows(results, target="DMIL training step", op="dmil_step", device="cuda",
                       variants=stages, goals={"reference": 2.0, "compile": 1.3}, providers=("dmil_fast",))
        + activation_rows(results)
        + speedup_rows(results, target="CPU C++ scoring", op="interaction_scores", device="cpu",
                       variants=fwd_bwd, goals={"reference": 3.0}, providers=("cpp",))
    )


def markdown(rows: Sequence[Row], sources: Sequence[str]) -> str:
    head = ("target", "case", "measured", "goal", "verdict")
    lines = [f"Targets judged on: {', '.join(sources)}", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row.cells()) + " |" for row in rows]
    judged = [r for r in rows if r.met is not None]
    lines += ["", f"{sum(bool(r.met) for r in judged)} of {len(judged)} measured cases meet their goal; "
                  f"{len(rows) - len(judged)} not measured."]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", type=Path, help="benchmarks/results/*.json files")
    args = parser.parse_args(argv)
    rows: List[Row] = []
    sources = []
    for path in args.results:
        try:
            payload = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            print(f"error: cannot read results file {path}: {exc}", file=sys.stderr)
            return 2
        if not isinstance(payload, dict) or not isinstance(payload.get("benchmarks", []), list):
            print(f"error: {path} is not a results file (a JSON object with a 'benchmarks' list)", file=sys.stderr)
            return 2
        sources.append(f"{path.name} ({payload.get('device')}, commit {str(payload.get('commit'))[:7]})")
        rows += [r for r in target_rows(read_results(payload)) if r.measured is not None]
    print(markdown(with_unmeasured(rows), sources))
    return 0


def with_unmeasured(rows: Sequence[Row]) -> List[Row]:
    """``rows`` plus a "not measured" row for each (target, op) that none of them covers."""
    covered = {(r.target, r.case.split()[0]) for r in rows}
    placeholders = target_rows([])
    order = {target: i for i, target in reversed(list(enumerate(r.target for r in placeholders)))}
    out = list(rows) + [r for r in placeholders if (r.target, r.case.split()[0]) not in covered]
    return sorted(out, key=lambda r: order[r.target])  # stable: the cases keep their order


if __name__ == "__main__":
    sys.exit(main())
