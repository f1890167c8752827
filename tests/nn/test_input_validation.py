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


class _Refuses(nn.Module):
    """An encoder that must not be reached."""

    def forward(self, x):
        raise AssertionError("the encoder ran")


@pytest.fixture(params=sorted(MODELS))
def model(request):
    return MODELS[request.param]().train()


@pytest.mark.parametrize("which", ["visual", "audio"])
def test_empty_batch_is_refused_naming_the_argument(model, which):
    x1, x2 = _inputs()
    args = {"visual": x1, "audio": x2}
    args[which] = args[which][:0]
    with pytest.raises(ValueError, match=f"^{which} must be a batch of at least one sample.*\\(0, {D}\\)"):
        model(args["visual"], args["audio"])
    with pytest.raises(ValueError, match=f"^{which} must be a batch"):
        model.interaction_outputs(args["visual"], args["audio"])


@pytest.mark.parametrize("cls", [dm.DMILModel, JointModel, EnsembleModel])
def test_empty_batch_is_refused_before_the_encoders_run(cls):
    model = cls(_Refuses(), _Refuses(), embed_size=E, num_class=C, input_size=D)
    with pytest.raises(ValueError, match="^visual must be a batch"):
        model(torch.randn(0, 3, 8, 8), torch.randn(0, 1, 8, 8))


@pytest.mark.parametrize("which", ["visual", "audio"])
def test_non_tensor_inputs_are_refused_naming_the_argument_and_type(model, which):
    x1, x2 = _inputs()
    args = {"visual": x1, "audio": x2}
    args[which] = args[which].numpy()
    with pytest.raises(TypeError, match=f"^{which} must be a torch.Tensor, got ndarray"):
        model(args["visual"], args["audio"])
    args[which] = [[0.0] * D] * B
    with pytest.raises(TypeError, match=f"^{which} must be a torch.Tensor, got list"):
        model(args["visual"], args["audio"])


@pytest.mark.parametrize("which", ["visual", "audio"])
def test_dtype_other_than_the_parameters_is_refused_with_a_hint(model, which):
    x1, x2 = _inputs()
    args = {"visual": x1, "audio": x2}
    args[which] = args[which].double()
    with pytest.raises(TypeError, match=f"{which} features are torch.float64.*torch.float32.*model.to"):
        model(args["visual"], args["audio"])


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
    x1, x2 = _inputs()
    args = {"visual": x1, "audio": x2}
    args[which] = torch.randn(B, D + 2)
    with pytest.raises(ValueError, match=f"the {which} encoder output has {D + 2} features, expected input_size={D}"):
        model(args["visual"], args["audio"])
