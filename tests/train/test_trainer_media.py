"""Training on raw CREMA-D (tiny generated wav + jpg clips) with the ResNet18 encoders, and bad
media files: reported before training when their header is unreadable, and naming the sample
and file when one fails to decode mid-epoch."""

import json
import wave

import numpy as np
import pytest
import torch
from PIL import Image  # a test dependency (pyproject "test" extra)

from dmil_fast.cli import main
from dmil_fast.data import CremaDDataset
from dmil_fast.nn.resnet import resnet18
from dmil_fast.train import DMILConfig
from dmil_fast.train.media import MediaData, MediaSplit, build_media_model, load_pretrained_encoders

TRAIN = [("1001_DFA_ANG_XX", "ANG"), ("1002_IEO_NEU_LO", "NEU"), ("1003_ITH_SAD_XX", "SAD")]
TEST = [("1004_TIE_HAP_XX", "HAP"), ("1005_MTI_FEA_XX", "FEA")]


pytestmark = pytest.mark.usefixtures("one_thread")


def _wav(path, freq, rate=8000, seconds=0.5):
    pcm = np.round(0.5 * np.sin(2 * np.pi * freq * np.arange(int(rate * seconds)) / rate) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())


@pytest.fixture
def root(tmp_path):
    (tmp_path / "AudioWAV").mkdir()
    g = np.random.default_rng(0)
    for split, clips in (("train", TRAIN), ("test", TEST)):
        (tmp_path / f"{split}.csv").write_text("".join(f"{c},{lab}\n" for c, lab in clips))
        for k, (clip, _) in enumerate(clips):
            _wav(tmp_path / "AudioWAV" / f"{clip}.wav", 300 + 100 * k)
            folder = tmp_path / "Image-01-FPS" / clip
            folder.mkdir(parents=True)
            for f in range(2):
                Image.fromarray(g.integers(0, 255, (36, 48, 3), dtype=np.uint8)).save(folder / f"{f:05d}.jpg")
    return tmp_path


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "cremad.yaml"
    path.write_text("embed_size: 8\nbatch_size: 3\n")
    return path


def test_cremad_trains_with_resnet18_encoders_and_imagenet_weights(root, config_file, tmp_path, capsys):
    weights = {k: v for k, v in resnet18("visual").state_dict().items()}
    weights.update({"fc.weight": torch.zeros(1000, 512), "fc.bias": torch.zeros(1000)})
    torch.save(weights, tmp_path / "resnet18-imagenet.pth")
    out = tmp_path / "out"
    code = main(["train", "--data", str(root), "--method", "dmil", "--epochs", "1", "--out", str(out),
                 "--config", str(config_file), "--pretrained", str(tmp_path / "resnet18-imagenet.pth"),
                 "--no-progress", "--quiet", "--workers", "0"])
    assert code == 0, capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["preset"] == "published" and metrics["config"]["input_size"] == 512
    assert list(metrics["per_class_accuracy"]) == ["NEU", "HAP", "SAD", "FEA", "DIS", "ANG"]
    assert np.isfinite(metrics["final_train_loss"]) and metrics["stage_epochs"] == {"1": 1}
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=True)["state_dict"]
    assert state["visual_net.conv1.weight"].shape == (64, 3, 7, 7)
    assert state["audio_net.conv1.weight"].shape == (64, 1, 7, 7)


def test_pretrained_encoders_get_the_imagenet_weights(tmp_path):
    g = torch.Generator().manual_seed(1)
    weights = {k: torch.randn(v.shape, generator=g) if v.is_floating_point() else v
               for k, v in resnet18("visual").state_dict().items()}
    torch.save({"state_dict": weights}, tmp_path / "w.pth")
    model = load_pretrained_encoders(build_media_model("joint", 6, DMILConfig(embed_size=8)), tmp_path / "w.pth")
    assert torch.equal(model.visual_net.layer2[0].conv1.weight, weights["layer2.0.conv1.weight"])
    torch.testing.assert_close(model.audio_net.conv1.weight, weights["conv1.weight"].mean(dim=1, keepdim=True))


@pytest.mark.parametrize("victim,garbage,message", [
    ("Image-01-FPS/1002_IEO_NEU_LO/00001.jpg", b"not a jpeg at all", "00001.jpg"),
    ("AudioWAV/1005_MTI_FEA_XX.wav", b"RIFF\x00\x00junk", "1005_MTI_FEA_XX.wav"),
])
def test_unreadable_media_is_reported_before_training(root, config_file, tmp_path, capsys, victim, garbage,
                                                      message):
    (root / victim).write_bytes(garbage)
    out = tmp_path / "out"
    code = main(["train", "--data", str(root), "--method", "dmil", "--epochs", "1", "--out", str(out),
                 "--config", str(config_file), "--no-progress", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and message in err and "sample" in err
    assert "Traceback" not in err and not (out / "log.csv").exists()


def test_media_failing_to_decode_mid_epoch_names_sample_and_file(root, config_file, tmp_path, capsys):
    folder = root / "Image-01-FPS" / "1003_ITH_SAD_XX"
    for bad in folder.iterdir():  # whichever frame training picks
        data = bad.read_bytes()
        scan = data.index(b"\xff\xda")  # start of scan: headers before it stay intact
        bad.write_bytes(data[: scan + 40])  # only decoding the image data fails
    MediaData.load(root)  # passes the check before training
    out = tmp_path / "out"
    code = main(["train", "--data", str(root), "--method", "dmil", "--epochs", "1", "--out", str(out),
                 "--config", str(config_file), "--no-progress", "--quiet", "--workers", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "train split" in err and "sample 2" in err and str(folder) in err and "truncated" in err


@pytest.fixture
def same_clips(tmp_path):
    """Three training clips with identical frames and audio: only their augmentation can differ."""
    (tmp_path / "AudioWAV").mkdir()
    clips = [(f"100{k}_X_NEU_XX", "NEU") for k in range(3)]
    for split in ("train", "test"):
        (tmp_path / f"{split}.csv").write_text("".join(f"{c},{label}\n" for c, label in clips))
    frame = Image.fromarray(np.random.default_rng(0).integers(0, 255, (36, 48, 3), dtype=np.uint8))
    pcm = np.round(0.3 * np.sin(np.arange(4000) / 5.0) * 32767).astype("<i2")
    for clip, _ in clips:
        with wave.open(str(tmp_path / "AudioWAV" / f"{clip}.wav"), "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(8000)
            w.writeframes(pcm.tobytes())
        folder = tmp_path / "Image-01-FPS" / clip
        folder.mkdir(parents=True)
        frame.save(folder / "00000.png")
    return tmp_path


def test_each_sample_draws_its_own_augmentation_whatever_its_batch(same_clips):
    split = MediaSplit(CremaDDataset(same_clips, "train"), "train", seed=0)
    visual = split.fetch(torch.tensor([0, 1, 2]))[0]
    assert not torch.equal(visual[0], visual[1]) and not torch.equal(visual[1], visual[2])
    torch.testing.assert_close(split.fetch(torch.tensor([2]))[0][0], visual[2], rtol=0, atol=0)
    split.set_epoch(1)
    assert not torch.equal(split.fetch(torch.tensor([0]))[0][0], visual[0])  # and a new draw each epoch
