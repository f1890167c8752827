"""Importing dmil_fast leaves torch._dynamo unloaded, and the backend choice still stays a constant
under torch.compile (fullgraph) when torch._dynamo comes later. Run in a fresh interpreter, since
the test process has loaded torch._dynamo long ago."""

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import os, sys
    os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch
    import dmil_fast as dm
    import dmil_fast.ops
    assert "torch._dynamo" not in sys.modules, "importing dmil_fast.ops loaded torch._dynamo"

    from dmil_fast.reference.interactions import interaction_scores_ref

    # The automatic choice for this op imports the extension to see whether it is there: traced,
    # that is a graph break, so fullgraph fails unless the choice is taken as a constant.
    def f(l1, l2, l12, y, h):
        return dm.ops.interaction_scores(l1, l2, l12, y, entropy_1=h, entropy_2=h).synergy

    gen = torch.Generator().manual_seed(0)
    args = [torch.randn(5, 4, generator=gen) for _ in range(3)]
    args += [torch.randint(0, 4, (5,), generator=gen), torch.rand(5, generator=gen)]
    got = torch.compile(f, fullgraph=True, backend="eager")(*args)
    want = interaction_scores_ref(*args[:4], entropy_1=args[4], entropy_2=args[4]).synergy
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)
    print("ok")
""")


def test_import_leaves_dynamo_unloaded_and_compile_sees_a_constant_choice():
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "ok"
