"""Bad inputs to DMILModel (fused and reference paths) and the baselines: a ValueError or
TypeError that names the argument, raised before the encoders or the matmuls run."""

import pytest
import torch
from torch import nn

import dmil_fast as dm
from dmil_fast.nn import EnsembleModel, JointModel

E, C, D, B = 6, 3, 5, 4

MODELS = {
    "dmil_fused": lambda: dm.DMILModel(None, None, embed_size=E, num_class=C, input_size=D),
    "dmil_reference": lambda: dm.DMILModel(None, None, embed_size=E, num_class=C, input_size=D,
                                           backend="reference"),
    "joint": lambda: JointModel(None, None, embed_size=E, num_class=C, input_size=D),
    "ensemble": lambda: EnsembleModel(None, None, embed_size=E, num_class=C, input_size=D),
}


def _inputs(b=B, width=D, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return torch.randn(b, width, generator=g).to(dtype), torch.randn(b, width, generator=g).to(dtype)


def _with(which, edit):
    """(visual, audio) from :func:`_inputs`, the one named ``which`` replaced by ``edit(it)``."""
    args = dict(zip(("visual", "audio"), _inputs()))
    args[which] = edit(args[which])
    return args["visual"], args["audio"]


class _Refuses(nn.Module):
    """An encoder that must not be reached."""

    def forward(self, x):
        raise AssertionError("the encoder ran")


@pytest.fixture(params=sorted(MODELS))
def model(request):
    return MODELS[request.param]().train()


@pytest.mark.parametrize("which", ["visual", "audio"])
def test_empty_batch_is_refused_naming_the_argument(model, which):
    visual, audio = _with(which, lambda x: x[:0])
    with pytest.raises(ValueError, match=f"^{which} must be a batch of at least one sample.*\\(0, {D}\\)"):
        model(visual, audio)
    with pytest.raises(ValueError, match=f"^{which} must be a batch"):
        model.interaction_outputs(visual, audio)


@pytest.mark.parametrize("cls", [dm.DMILModel, JointModel, EnsembleModel])
def test_empty_batch_is_refused_before_the_encoders_run(cls):
    model = cls(_Refuses(), _Refuses(), embed_size=E, num_class=C, input_size=D)
    with pytest.raises(ValueError, match="^visual must be a batch"):
        model(torch.randn(0, 3, 8, 8), torch.randn(0, 1, 8, 8))


@pytest.mark.parametrize("which", ["visual", "audio"])
def test_non_tensor_inputs_are_refused_naming_the_argument_and_type(model, which):
    with pytest.raises(TypeError, match=f"^{which} must be a torch.Tensor, got ndarray"):
        model(*_with(which, lambda x: x.numpy()))
    with pytest.raises(TypeError, match=f"^{which} must be a torch.Tensor, got list"):
        model(*_with(which, lambda x: [[0.0] * D] * B))


@pytest.mark.parametrize("which", ["visual", "audio"])
def test_dtype_other_than_the_parameters_is_refused_with_a_hint(model, which):
    with pytest.raises(TypeError, match=f"{which} features are torch.float64.*torch.float32.*model.to"):
        model(*_with(which, lambda x: x.double()))


def test_float64_model_runs_float64_inputs(model):
    model.double().eval()
    x1, x2 = _inputs(dtype=torch.float64)
    out = model(x1, x2)
    assert out["out"].dtype == torch.float64 and out["out"].shape == (B, C)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_run_under_cpu_autocast(model, dtype):
    model.eval()
    x1, x2 = _inputs(dtype=dtype)
    with torch.autocast("cpu", dtype=dtype):
        out = model(x1, x2)
    assert out["out"].shape == (B, C) and torch.isfinite(out["out"].float()).all()


@pytest.mark.parametrize("which", ["visual", "audio"])
def test_feature_width_other_than_input_size_is_refused(model, which):
    with pytest.raises(ValueError, match=f"the {which} encoder output has {D + 2} features, expected input_size={D}"):
        model(*_with(which, lambda x: torch.randn(B, D + 2)))
