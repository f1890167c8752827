"""benchmarks/activation_memory.py: the count of what a graph keeps for the backward, on graphs
whose saved tensors are known from autograd's formulas, and its command line at a tiny size."""

import json

import pytest
import torch

import activation_memory as am  # benchmarks/, on sys.path by conftest.py

from tests.conftest import triton_device

B, D, H = 8, 5, 6
F32 = 4


def _leaves():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, D, generator=g)
    w = torch.randn(2 * H, D, generator=g, requires_grad=True)
    return x, w


def test_counts_new_saved_storages_and_leaves_out_kept_ones():
    x, w = _leaves()
    # linear saves x and w (both kept: not counted); exp saves its output (B, 2H): counted.
    nbytes, count, out = am.saved_activation_bytes(lambda: torch.exp(x @ w.t()).sum(), keep=[x, w])
    assert (nbytes, count) == (B * 2 * H * F32, 1)
    out.backward()  # the graph is intact
    assert w.grad is not None


def test_a_saved_view_counts_its_whole_storage_once():
    x, w = _leaves()

    def run():
        h = x @ w.t()  # (B, 2H)
        mu, logvar = h[:, :H], h[:, H:]
        return (mu * logvar).sum()  # mul saves both views of h: one storage of B * 2H floats

    nbytes, count, _ = am.saved_activation_bytes(run, keep=[x, w])
    assert (nbytes, count) == (B * 2 * H * F32, 1)


def test_graphs_dropped_before_the_count_are_not_counted():
    x, w = _leaves()

    def run():
        torch.exp(x @ w.t()).sum()  # built and dropped at once
        return (x @ w.t()).sum()  # saves only the kept x and w

    nbytes, count, _ = am.saved_activation_bytes(run, keep=[x, w])
    assert (nbytes, count) == (0, 0)


def test_command_line_prints_every_stage_and_writes_json(tmp_path, capsys):
    out = tmp_path / "act.json"
    assert am.main(["--batch", "4", "--embed", "8", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    rows = json.loads(out.read_text())["rows"]
    assert [r["stage"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert r["reference_bytes"] > 0 and r["dmil_fast_bytes"] > 0
        assert r["ratio"] == pytest.approx(r["dmil_fast_bytes"] / r["reference_bytes"])
        assert f"| {r['stage']} |" in printed


def test_bad_arguments_are_refused():
    with pytest.raises(SystemExit):
        am.main(["--batch", "0"])
    with pytest.raises(ValueError, match="provider"):
        am.step_activation_bytes("official", 1, 4, 8)


def test_recompute_frees_exactly_the_two_first_level_projections_in_stage_1():
    """Stage 1 keeps, per modality, the (B, 4E) projection of the tr/ir head pair, or with
    recompute the (4E,) concatenated bias instead: 2 * 4E * (B - 1) floats less in all."""
    b, e = 8, 8
    kept = am.step_activation_bytes("dmil_fast", 1, b, e, recompute=False, device=triton_device())[0]
    recomputed = am.step_activation_bytes("dmil_fast", 1, b, e, recompute=True, device=triton_device())[0]
    assert kept - recomputed == 2 * 4 * e * (b - 1) * F32


@pytest.mark.parametrize("stage", [2, 3])
def test_without_the_triton_heads_recompute_copies_nothing(stage):
    """On a CPU the automatic backend runs the heads in PyTorch, which keeps its own tensors:
    recompute then changes nothing, not even by a copy."""
    b, e = 8, 8
    with_recompute = am.step_activation_bytes("dmil_fast", stage, b, e, backend=None, recompute=True)
    without = am.step_activation_bytes("dmil_fast", stage, b, e, backend=None, recompute=False)
    assert with_recompute == without


@pytest.mark.parametrize("stage", [2, 3])
def test_default_loss_keeps_no_log_softmax_of_the_four_parts(stage):
    """With F.cross_entropy for every term a step keeps one (B, C) log-softmax per CE term; by
    default the four parts' CEs (whose logits the gate keeps) keep none: 4 B C floats less."""
    from dmil_fast.train import DMILConfig, dmil_loss

    b, e = 8, 8
    model = am.dmil_step_model("dmil_fast", e, stage, "cpu", backend=None)
    visual, audio, labels = am.dmil_step_batch(b, "cpu")
    keep = [*model.parameters(), *model.buffers(), visual, audio, labels]
    counted = {}
    for name, kwargs in (("default", {}), ("f_cross_entropy", {"cross_entropy": torch.nn.functional.cross_entropy})):
        counted[name] = am.saved_activation_bytes(
            lambda: dmil_loss(model(visual, audio), labels, stage=stage, config=DMILConfig(), **kwargs)[0], keep)[0]
    assert counted["f_cross_entropy"] - counted["default"] == 4 * b * am.DMIL_CLASSES * F32


@pytest.mark.parametrize("stage", [2, 3])
def test_under_autocast_the_parts_path_keeps_no_concatenation(stage):
    """Under bfloat16 autocast the gate's and the tr reconstructions' first layers run on their
    parts too: the concatenated call would keep its (B, 4E) and two (B, 2E) bfloat16 inputs and the
    bfloat16 casts of the three weights (a forward hook on the modules makes the model call them)."""
    from dmil_fast.train import DMILConfig, dmil_loss

    b, e, bf16 = 8, 8, 2
    counted, firsts = {}, None
    for hooked in (False, True):
        model = am.dmil_step_model("dmil_fast", e, stage, "cpu", backend=None)
        firsts = (model.gating_network[0], model.recon_tr_1[0], model.recon_tr_2[0])
        if hooked:
            for module in (model.gating_network, model.recon_tr_1, model.recon_tr_2):
                module.register_forward_hook(lambda module, args, out: None)
        visual, audio, labels = am.dmil_step_batch(b, "cpu")
        keep = [*model.parameters(), *model.buffers(), visual, audio, labels]

        def run():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return dmil_loss(model(visual, audio), labels, stage=stage, config=DMILConfig())[0]

        counted[hooked] = am.saved_activation_bytes(run, keep)[0]
    weights = sum(layer.weight.numel() for layer in firsts)
    assert counted[True] - counted[False] == (b * (4 + 2 + 2) * e + weights) * bf16


@pytest.mark.parametrize("stage, saved_per_row", [(2, 0), (3, 2)])
def test_the_synergy_module_keeps_no_concatenation_where_its_inputs_train(stage, saved_per_row):
    """Stage 3 trains the ir heads, so x1 * x2's backward keeps z_ir1 and z_ir2 anyway and the split
    synergy layer keeps 2E floats per row less than its (B, 3E) concatenated input; in stage 2 the
    heads are frozen and the module concatenates, as it does with a hook on its layer."""
    from dmil_fast.train import DMILConfig, dmil_loss

    b, e = 8, 8
    counted = {}
    for hooked in (False, True):
        model = am.dmil_step_model("dmil_fast", e, stage, "cpu", backend=None)
        if hooked:
            model.cross_modality.fc_out.register_forward_hook(lambda module, args, out: None)
        visual, audio, labels = am.dmil_step_batch(b, "cpu")
        keep = [*model.parameters(), *model.buffers(), visual, audio, labels]
        counted[hooked] = am.saved_activation_bytes(
            lambda: dmil_loss(model(visual, audio), labels, stage=stage, config=DMILConfig())[0], keep)[0]
    assert counted[True] - counted[False] == saved_per_row * b * e * F32
