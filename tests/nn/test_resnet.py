"""ResNet18 encoders: torchvision's layer names and parameter count, a forward equal to a
functional ResNet18 written here from the architecture, frames folded into the batch, ImageNet
weights (audio: conv1 averaged over RGB) and the DMIL model built on them."""

import math

import pytest
import torch
import torch.nn.functional as F

from dmil_fast.nn import DMILModel
from dmil_fast.nn.resnet import ResNet18, adapt_imagenet_state, load_imagenet_weights, resnet18

# torchvision's resnet18 has 11,689,512 parameters, of which fc holds 512 * 1000 + 1000.
TORCHVISION_RESNET18_PARAMS = 11_689_512
FC_PARAMS = 512 * 1000 + 1000


def _expected_names():
    """torchvision resnet18 state_dict names without fc."""
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    names = ["conv1.weight"] + [f"bn1.{s}" for s in bn]
    for layer in range(1, 5):
        for block in range(2):
            p = f"layer{layer}.{block}"
            for k in (1, 2):
                names += [f"{p}.conv{k}.weight"] + [f"{p}.bn{k}.{s}" for s in bn]
            if layer > 1 and block == 0:
                names += [f"{p}.downsample.0.weight"] + [f"{p}.downsample.1.{s}" for s in bn]
    return names


def _randomise_bn(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=g))
            m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
            m.bias.data.copy_(0.1 * torch.randn(m.num_features, generator=g))
    return model


def _bn(x, sd, p):
    return F.batch_norm(x, sd[f"{p}.running_mean"], sd[f"{p}.running_var"], sd[f"{p}.weight"], sd[f"{p}.bias"],
                        training=False, eps=1e-5)


def _functional_resnet18(sd, x):
    """Eval-mode ResNet18 trunk from a state_dict: 7x7/2 conv, BN, ReLU, 3x3/2 max pool, four stages
    of two basic blocks (3x3 convs; the first block of stages 2-4 strides 2 with a 1x1 projection)."""
    x = F.relu(_bn(F.conv2d(x, sd["conv1.weight"], stride=2, padding=3), sd, "bn1"))
    x = F.max_pool2d(x, kernel_size=3, stride=2, padding=1)
    for layer in range(1, 5):
        for block in range(2):
            p = f"layer{layer}.{block}"
            stride = 2 if layer > 1 and block == 0 else 1
            out = F.relu(_bn(F.conv2d(x, sd[f"{p}.conv1.weight"], stride=stride, padding=1), sd, f"{p}.bn1"))
            out = _bn(F.conv2d(out, sd[f"{p}.conv2.weight"], padding=1), sd, f"{p}.bn2")
            if f"{p}.downsample.0.weight" in sd:
                x = _bn(F.conv2d(x, sd[f"{p}.downsample.0.weight"], stride=stride), sd, f"{p}.downsample.1")
            x = F.relu(out + x)
    return x


@pytest.mark.parametrize("modality,channels", [("visual", 3), ("audio", 1)])
def test_names_and_parameter_count_are_torchvision_resnet18_without_fc(modality, channels):
    model = resnet18(modality)
    assert list(model.state_dict()) == _expected_names()
    n = sum(p.numel() for p in model.parameters())
    assert n == TORCHVISION_RESNET18_PARAMS - FC_PARAMS - 64 * (3 - channels) * 7 * 7
    assert model.conv1.weight.shape == (64, channels, 7, 7)


def test_audio_forward_equals_a_functional_resnet18():
    model = _randomise_bn(resnet18("audio")).eval()
    x = torch.randn(2, 1, 64, 48)
    with torch.no_grad():
        out = model(x)
        ref = _functional_resnet18(model.state_dict(), x)
    assert out.shape == (2, 512, 2, 2)  # each stride-2 step rounds up: 64 -> 32 -> 16 -> 8 -> 4 -> 2
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_visual_frames_fold_into_the_batch_sample_major():
    model = _randomise_bn(resnet18("visual"), seed=1).eval()
    x = torch.randn(2, 3, 2, 32, 32)  # (B, C, T, H, W)
    with torch.no_grad():
        out = model(x)
        sd = model.state_dict()
        for b in range(2):
            for t in range(2):
                ref = _functional_resnet18(sd, x[b:b + 1, :, t])
                torch.testing.assert_close(out[b * 2 + t: b * 2 + t + 1], ref, rtol=1e-4, atol=1e-5)
    assert out.shape == (4, 512, 1, 1)


def test_training_mode_backward_runs():
    model = resnet18("visual").train()
    out = model(torch.randn(2, 3, 1, 32, 32))
    out.mean().backward()
    assert model.conv1.weight.grad is not None and torch.isfinite(model.conv1.weight.grad).all()


def test_bad_inputs_and_modalities_are_refused():
    with pytest.raises(ValueError, match="modality"):
        ResNet18(modality="depth")
    with pytest.raises(ValueError, match=r"\(B, 3, T, H, W\)"):
        resnet18("visual")(torch.randn(2, 3, 32, 32))
    with pytest.raises(ValueError, match=r"\(B, 1, F, T\)"):
        resnet18("audio")(torch.randn(2, 3, 32, 32))


def _imagenet_like(seed=0):
    g = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone()
             for k, v in resnet18("visual").state_dict().items()}
    state["fc.weight"] = torch.randn(1000, 512, generator=g)
    state["fc.bias"] = torch.randn(1000, generator=g)
    return state


def test_imagenet_weights_load_and_audio_conv1_is_the_rgb_mean():
    state = _imagenet_like()
    visual = load_imagenet_weights(resnet18("visual"), state)
    audio = load_imagenet_weights(resnet18("audio"), state)
    for name, value in visual.state_dict().items():
        assert torch.equal(value, state[name]), name
    expected = (state["conv1.weight"][:, 0] + state["conv1.weight"][:, 1] + state["conv1.weight"][:, 2]) / 3
    torch.testing.assert_close(audio.conv1.weight[:, 0], expected)
    assert torch.equal(audio.layer3[0].downsample[0].weight,
                       state["layer3.0.downsample.0.weight"])
    prefixed = {f"module.{k}": v for k, v in state.items()}
    assert set(adapt_imagenet_state(prefixed, in_channels=3)) == set(_expected_names())


def test_imagenet_weights_of_another_shape_are_refused():
    state = _imagenet_like()
    state["layer1.0.conv1.weight"] = torch.randn(64, 64, 5, 5)
    with pytest.raises(ValueError, match="layer1.0.conv1.weight"):
        load_imagenet_weights(resnet18("visual"), state)
    del state["layer1.0.conv1.weight"]
    with pytest.raises(ValueError, match="missing"):
        load_imagenet_weights(resnet18("visual"), state)


def test_dmil_model_on_resnet18_encoders_has_official_names_and_runs():
    torch.manual_seed(0)
    model = DMILModel(resnet18("visual"), resnet18("audio"), embed_size=8, num_class=6, input_size=512)
    names = set(model.state_dict())
    assert {f"visual_net.{n}" for n in _expected_names()} <= names
    assert {f"audio_net.{n}" for n in _expected_names()} <= names
    visual, audio = torch.randn(2, 3, 2, 32, 32), torch.randn(2, 1, 32, 32)
    out = model(visual, audio)
    assert out["out"].shape == (2, 6) and torch.isfinite(out["out"]).all()
    model.eval()
    with torch.no_grad():
        e1, _ = model.embed(visual, audio)
        # embed_v of the frame-and-space average of the visual maps
        pooled = model.visual_net(visual).view(2, 2, 512, -1).mean(dim=(1, 3))
        torch.testing.assert_close(e1, model.embed_v(pooled), rtol=1e-4, atol=1e-5)


def test_initialisation_is_the_official_backbones():
    """Kaiming-normal convolutions (fan_out, ReLU gain: std sqrt(2 / (out * kh * kw))) and
    BatchNorm weights N(1, 0.02) with zero biases, as the official ResNet18 initialises them."""
    torch.manual_seed(0)
    net = ResNet18(modality="visual")
    for name, m in net.named_modules():
        if isinstance(m, torch.nn.Conv2d):
            fan_out = m.out_channels * m.kernel_size[0] * m.kernel_size[1]
            ratio = float(m.weight.detach().std()) / math.sqrt(2.0 / fan_out)
            assert abs(ratio - 1) < 0.1, (name, ratio)
    norms = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    weights = torch.cat([m.weight.detach() for m in norms])
    assert abs(float(weights.mean()) - 1.0) < 0.003 and abs(float(weights.std()) / 0.02 - 1) < 0.1
    assert all(bool((m.bias == 0).all()) for m in norms)
