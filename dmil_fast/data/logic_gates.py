"""Logic-gate tasks: two one-bit modalities whose dataset-level interactions are known exactly.

The inputs are uniform over the bit combinations; each modality is its bit plus Gaussian jitter.
"""

from __future__ import annotations

import math

import torch

LOGIC_GATES = ("and", "or", "xor", "copy_x1", "copy_both")

_LN2 = math.log(2.0)
# AND / OR with uniform inputs: I(x_m; y) = (3/4) ln(4/3) for each input (the redundancy),
# I(x1, x2; y) = H(y) = (3/4) ln(4/3) + (1/2) ln 2, leaving (1/2) ln 2 to synergy.
_AND_OR = {"redundancy": 0.75 * math.log(4.0 / 3.0), "unique_1": 0.0, "unique_2": 0.0, "synergy": 0.5 * _LN2}

LOGIC_GATE_TRUTH = {
    "xor": {"redundancy": 0.0, "unique_1": 0.0, "unique_2": 0.0, "synergy": _LN2},
    "and": dict(_AND_OR),
    "or": dict(_AND_OR),
    "copy_x1": {"redundancy": 0.0, "unique_1": _LN2, "unique_2": 0.0, "synergy": 0.0},
    "copy_both": {"redundancy": _LN2, "unique_1": 0.0, "unique_2": 0.0, "synergy": 0.0},
}
"""Dataset-level partial information decomposition of each gate, in nats, for uniform inputs.

These are the published values of the PID literature (Williams and Beer 2010; the BROJA / minimum-MI
decompositions of Bertschinger et al. 2014, used for these gates by Liang et al. 2023): XOR is pure
synergy, S = ln 2; AND and OR have R = (3/4) ln(4/3) = 0.2158 (0.311 bit) and S = (1/2) ln 2 = 0.3466
(0.5 bit), U1 = U2 = 0; copying x1 is pure uniqueness U1 = ln 2; two copies of one bit are pure
redundancy R = ln 2. Keys match :meth:`InteractionScores.means`.
"""


def logic_gate(name: str, n: int, *, noise: float = 0.05, seed: int = 0):
    """Sample ``n`` examples of a logic-gate task.

    Args:
        name: one of ``"and"``, ``"or"``, ``"xor"``, ``"copy_x1"`` (y = the x1 bit; x2 an independent
            bit) or ``"copy_both"`` (x1 and x2 carry the same bit, y = that bit).
        n: number of samples (> 0). Bits are drawn independently and uniformly over the 4 input
            combinations (2 for ``"copy_both"``).
        noise: standard deviation (>= 0) of the Gaussian jitter added to each input bit.
        seed: seed of a private ``torch.Generator`` (the global RNG is untouched).

    Returns:
        ``x1`` (n, 1) float32, ``x2`` (n, 1) float32 (bit + jitter), ``y`` (n,) int64 in {0, 1}.
    Exact dataset-level interactions: ``LOGIC_GATE_TRUTH[name]``.
    """
    if name not in LOGIC_GATES:
        raise ValueError(f"name must be one of {LOGIC_GATES}, got {name!r}")
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not (math.isfinite(noise) and noise >= 0):
        raise ValueError(f"noise must be a finite number >= 0, got {noise!r}")
    gen = torch.Generator().manual_seed(int(seed))
    bits = torch.randint(0, 2, (2, n), generator=gen, dtype=torch.int64)
    b1 = bits[0]
    b2 = b1 if name == "copy_both" else bits[1]
    if name == "and":
        y = b1 & b2
    elif name == "or":
        y = b1 | b2
    elif name == "xor":
        y = b1 ^ b2
    else:  # copy_x1, copy_both
        y = b1.clone()
    jitter = torch.randn(2, n, 1, generator=gen) * float(noise)
    x1 = b1.to(torch.float32).unsqueeze(1) + jitter[0]
    x2 = b2.to(torch.float32).unsqueeze(1) + jitter[1]
    return x1, x2, y
