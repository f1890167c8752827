"""NaN inputs of the Gaussian ops: a ValueError naming the argument on CPU tensors (every backend),
on GPU tensors under anomaly detection only, and no check inside torch.compile graphs; the
trainer reports a model whose weights became NaN as a diverged run."""

import numpy as np
import pytest
import torch

import dmil_fast as dm
from dmil_fast.ops._validate import NaNInputError, values_checked
from dmil_fast.train import DMILConfig, FeatureData, Trainer, load_checkpoint
from tests.conftest import triton_device

NAN = float("nan")
BACKENDS = ["reference", "triton"]


def _backend_device(backend):
    return "cpu" if backend == "reference" else triton_device()


def _with_nan(t, index=(1, 2)):
    t = t.clone()
    t[index] = NAN
    return t


def _calls(device):
    """(name of the NaN argument, call) for every tensor argument of the three ops."""
    g = torch.Generator().manual_seed(0)
    mu, lv = (torch.randn(4, 3, generator=g).to(device) for _ in range(2))
    x, w, b = (torch.randn(*s, generator=g).to(device) for s in ((4, 5), (6, 5), (6,)))
    sample, kl, vb = dm.ops.gaussian_sample, dm.ops.diagonal_gaussian_kl, dm.ops.variational_bottleneck
    return [
        ("mu", lambda be: sample(_with_nan(mu), lv, seed=1, backend=be)),
        ("logvar", lambda be: sample(mu, _with_nan(lv), seed=1, backend=be)),
        ("q_mu", lambda be: kl(_with_nan(mu), lv, backend=be)),
        ("q_logvar", lambda be: kl(mu, _with_nan(lv), backend=be)),
        ("p_mu", lambda be: kl(mu, lv, _with_nan(mu[:1], (0, 2)), backend=be)),
        ("p_logvar", lambda be: kl(mu, lv, 0.0, NAN, backend=be)),  # a number becomes a tensor
        ("x", lambda be: vb(_with_nan(x), w, b, seed=1, backend=be)),
        ("weight", lambda be: vb(x, _with_nan(w, (5, 4)), b, seed=1, backend=be)),
        ("bias", lambda be: vb(x, w, _with_nan(b, 0), seed=1, backend=be)),
        ("weight", lambda be: dm.ops.variational_bottleneck_grouped(x, _with_nan(w, (0, 0)), None, 3,
                                                                    sample=False, backend=be)),
    ]


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_nan_input_raises_naming_the_argument(backend):
    device = _backend_device(backend)
    if device != "cpu":
        pytest.skip("the CPU case; on a GPU see test_gpu_tensors_are_checked_under_anomaly_detection")
    for name, call in _calls(device):
        with pytest.raises(ValueError, match=f"^{name} contains NaN; expected finite values$"):
            call(backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_finite_inputs_pass_and_infinities_are_not_nan(backend):
    device = _backend_device(backend)
    mu = torch.tensor([[0.0, 1.0], [2.0, -3.0]], device=device)
    lv = torch.tensor([[float("-inf"), 0.0], [0.5, 0.0]], device=device)  # std 0: z = mu there
    z = dm.ops.gaussian_sample(mu, lv, seed=3, backend=backend)
    assert z[0, 0].item() == 0.0 and torch.isfinite(z).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (GPU tensors)")
@pytest.mark.parametrize("backend", BACKENDS)
def test_gpu_tensors_are_checked_under_anomaly_detection(backend):
    for name, call in _calls("cuda"):
        out = call(backend)  # no check by default: NaN flows through, as in PyTorch's own ops
        assert torch.isnan(out if isinstance(out, torch.Tensor) else out[0]).any(), name
        with torch.autograd.detect_anomaly(check_nan=False):
            with pytest.raises(ValueError, match=f"^{name} contains NaN"):
                call(backend)


def test_which_tensors_are_checked():
    cpu, cuda, meta = torch.device("cpu"), torch.device("cuda", 0), torch.device("meta")
    assert values_checked(cpu) and not values_checked(cuda) and not values_checked(meta)
    with torch.autograd.set_detect_anomaly(True):
        assert values_checked(cpu) and values_checked(cuda) and not values_checked(meta)
    assert not values_checked(cuda)


def test_meta_tensors_still_trace():
    mu = torch.empty(4, 3, device="meta")
    with torch.autograd.set_detect_anomaly(True):
        z = dm.ops.gaussian_sample(mu, mu, backend="reference")
    assert z.shape == (4, 3) and z.device.type == "meta"


def test_compiled_graphs_carry_no_value_check():
    compiled = torch.compile(lambda m, v: dm.ops.diagonal_gaussian_kl(m, v, backend="reference"),
                             fullgraph=True, dynamic=False)
    mu = torch.randn(4, 3)
    assert torch.isnan(compiled(_with_nan(mu), mu))  # NaN in, NaN out, no graph break
    with pytest.raises(ValueError, match="q_mu contains NaN"):
        dm.ops.diagonal_gaussian_kl(_with_nan(mu), mu, backend="reference")  # eager checks


def test_vmap_and_fake_tensor_tracing_run_without_value_checks():
    from torch.fx.experimental.proxy_tensor import make_fx

    mu, lv = torch.randn(5, 4, 3), torch.randn(5, 4, 3)
    kl = torch.func.vmap(lambda m, v: dm.ops.diagonal_gaussian_kl(m, v, backend="reference"))(mu, lv)
    want = torch.stack([dm.ops.diagonal_gaussian_kl(m, v, backend="reference") for m, v in zip(mu, lv)])
    torch.testing.assert_close(kl, want)
    z = torch.func.vmap(lambda m, v: dm.ops.gaussian_sample(m, v, backend="reference"),
                        randomness="different")(mu, lv)
    assert z.shape == mu.shape
    x, w = torch.randn(4, 5), torch.randn(6, 5)
    graph = make_fx(lambda x, w: dm.ops.variational_bottleneck(x, w, None, sample=False, backend="reference"),
                    tracing_mode="fake")(x, w)
    torch.testing.assert_close(graph(x, w)[1], x @ w[:3].t())  # mu, through the traced graph
    with pytest.raises(ValueError, match="x contains NaN"):  # outside them the check is back
        dm.ops.variational_bottleneck(_with_nan(x), w, None, sample=False, backend="reference")


def test_the_error_pickles_with_its_argument():
    import pickle

    error = pickle.loads(pickle.dumps(NaNInputError("weight")))
    assert isinstance(error, ValueError) and error.argument == "weight"
    assert str(error) == "weight contains NaN; expected finite values"


def _toy_data(features=None):
    g = torch.Generator().manual_seed(0)
    splits = []
    for size in (32, 16, 16):
        y = torch.randint(0, 3, (size,), generator=g)
        splits.append((torch.randn(size, 6, generator=g), torch.randn(size, 6, generator=g), y,
                       np.arange(size) % 4))
    if features is not None:
        splits[features[0]][features[1]][features[2]] = NAN
    return FeatureData.from_tensors(*splits, num_classes=3,
                                    type_names=["redundancy", "unique_1", "unique_2", "synergy"])


TOY_CONFIG = dict(embed_size=4, input_size=6, encoder_hidden=8, encoder_depth=1, batch_size=16)


def test_nan_features_in_memory_are_refused_naming_split_modality_and_row():
    with pytest.raises(ValueError, match=r"^the val split's x2 has NaN or inf features at row 3$"):
        _toy_data(features=(1, 1, (3, 0)))
    with pytest.raises(ValueError, match=r"^the train split's x1 has NaN or inf features at row 7$"):
        _toy_data(features=(0, 0, (7, 5)))


class _DivergingTrainer(Trainer):
    """Its weights become NaN after the first epoch's checkpoint is written, as after an
    optimiser step on infinite gradients."""

    def save_last(self):
        super().save_last()
        with torch.no_grad():
            for p in self.model.parameters():
                p.fill_(NAN)


def test_a_diverged_model_stops_training_with_the_epoch_and_keeps_its_checkpoint(tmp_path):
    config = DMILConfig(n_epochs=3, stage1_epochs=3, stage2_epochs=0, **TOY_CONFIG)
    trainer = _DivergingTrainer(_toy_data(), config, method="dmil", out_dir=tmp_path, echo=None)
    with pytest.raises(FloatingPointError,
                       match=r"^training diverged at epoch 2 \(stage 1\): the \w+ of an op in the "
                             r"model's forward holds NaN$") as caught:
        trainer.fit()
    assert isinstance(caught.value.__cause__, NaNInputError)
    last = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert last["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())


class _DivergingInLastStep(Trainer):
    """Its weights become NaN in the epoch's last step: validation is the first to see them."""

    def train_epoch(self):
        result = super().train_epoch()
        with torch.no_grad():
            for p in self.model.parameters():
                p.fill_(NAN)
        return result


def test_weights_that_became_nan_in_the_last_step_stop_validation_as_a_divergence(tmp_path):
    config = DMILConfig(n_epochs=2, stage1_epochs=2, stage2_epochs=0, **TOY_CONFIG)
    trainer = _DivergingInLastStep(_toy_data(), config, method="dmil", out_dir=tmp_path, echo=None)
    with pytest.raises(FloatingPointError, match=r"^training diverged at epoch 1 \(stage 1\): the \w+ of an op"):
        trainer.fit()
