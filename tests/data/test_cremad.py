"""Raw CREMA-D reader on tiny generated files (stdlib wave, Pillow jpg).

References: a NumPy STFT written from the definition, closed-form tone frequencies, constant-colour
frames whose normalised value is known, and the frame-selection rule stated in the docstring.
"""

import sys
import wave

import numpy as np
import pytest
import torch
from PIL import Image  # a test dependency (pyproject "test" extra)

from dmil_fast.data import cremad

CLIPS_TRAIN = [("1001_DFA_ANG_XX", "ANG"), ("1002_IEO_NEU_LO", "NEU"), ("1003_ITH_SAD_XX", "SAD")]
CLIPS_TEST = [("1004_TIE_HAP_XX", "HAP"), ("1005_MTI_FEA_XX", "FEA")]
FRAME_COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200)]  # frame k of every clip


def write_wav(path, samples, rate, channels=1):
    data = np.clip(np.asarray(samples), -1, 1)
    pcm = np.round(data * 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())


def tone(freq, seconds, rate, amp=0.5):
    return amp * np.sin(2 * np.pi * freq * np.arange(int(seconds * rate)) / rate)


@pytest.fixture
def root(tmp_path):
    (tmp_path / "AudioWAV").mkdir()
    for split, clips in (("train", CLIPS_TRAIN), ("test", CLIPS_TEST)):
        (tmp_path / f"{split}.csv").write_text("".join(f"{c},{lab}\n" for c, lab in clips))
        for k, (clip, _) in enumerate(clips):
            write_wav(tmp_path / "AudioWAV" / f"{clip}.wav", tone(300 + 100 * k, 1.0, 16000), 16000)
            folder = tmp_path / "Image-01-FPS" / clip
            folder.mkdir(parents=True)
            for f, colour in enumerate(FRAME_COLOURS):
                Image.new("RGB", (48, 36), colour).save(folder / f"frame_{f:05d}.jpg", quality=95)
    return tmp_path


def _normalised(colour):
    return (np.asarray(colour) / 255.0 - np.asarray(cremad.IMAGENET_MEAN)) / np.asarray(cremad.IMAGENET_STD)


def test_items_shapes_labels(root):
    ds = cremad.CremaDDataset(root, "train")
    assert len(ds) == 3 and ds.num_classes == 6
    visual, audio, label, index = ds[1]
    assert visual.shape == (3, 1, 224, 224) and visual.dtype == torch.float32
    # 3 s at 22,050 Hz, hop 353, centred frames: 1 + 66150 // 353 = 188 frames of 512 // 2 + 1 bins.
    assert audio.shape == (1, 257, 188) and audio.dtype == torch.float32
    assert label.dtype == torch.int64 and int(label) == ["NEU", "HAP", "SAD", "FEA", "DIS", "ANG"].index("NEU")
    assert int(index) == 1
    test = cremad.CremaDDataset(root, "val", num_frames=2)
    assert test.labels.tolist() == [1, 3] and test[0][0].shape == (3, 2, 224, 224)


def test_eval_frames_are_deterministic_and_evenly_spaced(root):
    ds = cremad.CremaDDataset(root, "test", num_frames=1)
    visual = ds[0][0]
    assert torch.equal(visual, ds[0][0])
    # One of three frames in eval: the middle one (index 1, green), normalised with ImageNet stats.
    expected = _normalised(FRAME_COLOURS[1])
    np.testing.assert_allclose(visual[:, 0].mean(dim=(1, 2)).numpy(), expected, atol=0.05)
    assert float(visual.std(dim=(2, 3)).max()) < 0.05  # a resize of a constant frame stays constant
    three = cremad.CremaDDataset(root, "test", num_frames=3)[0][0]
    for k, colour in enumerate(FRAME_COLOURS):
        np.testing.assert_allclose(three[:, k].mean(dim=(1, 2)).numpy(), _normalised(colour), atol=0.05)


def test_train_frames_are_random(root):
    ds = cremad.CremaDDataset(root, "train")
    picks = set()
    for seed in range(12):
        torch.manual_seed(seed)
        visual = ds[0][0]
        picks.add(int(np.argmax(visual[:, 0].mean(dim=(1, 2)).numpy())))  # dominant channel = frame colour
    assert picks == {0, 1, 2}


def test_random_resized_crop_box_bounds():
    torch.manual_seed(0)
    for _ in range(200):
        left, top, w, h = cremad.random_resized_crop_box(320, 240)
        assert 0 <= left and left + w <= 320 and 0 <= top and top + h <= 240
        assert 0.08 * 320 * 240 * 0.9 <= w * h <= 320 * 240
        assert 3 / 4 * 0.9 <= w / h <= 4 / 3 * 1.1


def test_train_transform_flips_and_crops():
    # Left half black, right half white: a flip or a crop changes where the bright part lies.
    img = Image.new("RGB", (64, 64), (0, 0, 0))
    img.paste((255, 255, 255), (32, 0, 64, 64))
    left_means = set()
    for seed in range(10):
        torch.manual_seed(seed)
        x = cremad.transform_frame(img, train=True)
        assert x.shape == (3, 224, 224)
        left_means.add(round(float(x[:, :, :112].mean()), 3))
    assert len(left_means) > 1
    ev = cremad.transform_frame(img, train=False)
    assert float(ev[:, :, :100].mean()) < float(ev[:, :, 124:].mean())  # eval keeps the orientation


def _numpy_log_spec(x, n_fft=512, hop=353):
    padded = np.pad(x.astype(np.float64), n_fft // 2)
    count = 1 + len(x) // hop
    frames = np.stack([padded[t * hop: t * hop + n_fft] for t in range(count)])
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)
    return np.log(np.abs(np.fft.rfft(frames * window, axis=1)) + 1e-7).T


def test_log_spectrogram_matches_numpy_definition():
    rng = np.random.default_rng(0)
    x = (0.3 * rng.standard_normal(66150)).astype(np.float32)
    ours = cremad.log_spectrogram(x)
    assert ours.shape == (1, 257, 188)
    np.testing.assert_allclose(ours[0].numpy(), _numpy_log_spec(x), atol=2e-4)


def test_tone_lands_in_its_frequency_bin(tmp_path):
    k = 40  # bin k of a 512-point FFT at 22,050 Hz is k * 22050 / 512 Hz
    path = tmp_path / "tone.wav"
    write_wav(path, tone(k * 22050 / 512, 3.0, 22050), 22050)
    spec = cremad.log_spectrogram(cremad.load_waveform(path))
    assert (spec[0, :, 2:-2].argmax(dim=0) == k).all()


def test_waveform_resampled_tiled_and_mono(tmp_path):
    path = tmp_path / "short.wav"
    write_wav(path, tone(440.0, 1.0, 16000), 16000)
    w = cremad.load_waveform(path)
    assert w.shape == (66150,) and w.dtype == np.float32
    np.testing.assert_array_equal(w[:22050], w[22050:44100])  # 1 s at 22,050 Hz repeated
    spectrum = np.abs(np.fft.rfft(w[:22050]))
    peak = np.fft.rfftfreq(22050, d=1 / 22050)[np.argmax(spectrum)]  # 1 Hz bins over 1 s
    assert abs(peak - 440.0) <= 1.0
    stereo = tmp_path / "stereo.wav"
    left, right = tone(300.0, 0.5, 22050), tone(500.0, 0.5, 22050, amp=0.25)
    write_wav(stereo, np.stack([left, right], axis=1).reshape(-1), 22050, channels=2)
    np.testing.assert_allclose(cremad.load_waveform(stereo)[:11025], (left + right) / 2, atol=1e-4)


def test_loud_audio_is_clipped(tmp_path):
    path = tmp_path / "loud.wav"
    write_wav(path, np.ones(22050), 22050)
    w = cremad.load_waveform(path)
    assert w.max() <= 1.0 and w.min() >= -1.0


def test_corrupted_wav_names_file_and_index(root):
    bad = root / "AudioWAV" / f"{CLIPS_TRAIN[2][0]}.wav"
    bad.write_bytes(b"this is not a RIFF file at all")
    ds = cremad.CremaDDataset(root, "train")
    with pytest.raises(ValueError, match=rf"sample 2: cannot read audio file .*{CLIPS_TRAIN[2][0]}\.wav"):
        ds[2]
    ds[0]  # the other clips still load


@pytest.mark.parametrize("content", [b"garbage bytes, no JPEG header", "truncated"])
def test_corrupted_jpg_names_file_and_index(root, content):
    bad = root / "Image-01-FPS" / CLIPS_TEST[1][0] / "frame_00001.jpg"
    if content == "truncated":
        content = bad.read_bytes()[:200]
    bad.write_bytes(content)
    ds = cremad.CremaDDataset(root, "test")  # eval picks the middle frame, frame_00001
    with pytest.raises(ValueError, match=r"sample 1: cannot read frame .*frame_00001\.jpg"):
        ds[1]


def test_missing_files_skip_or_raise(root):
    (root / "AudioWAV" / f"{CLIPS_TRAIN[0][0]}.wav").unlink()
    with pytest.warns(UserWarning, match="1 CREMA-D clip"):
        ds = cremad.CremaDDataset(root, "train")
    assert ds.clip_ids == [c for c, _ in CLIPS_TRAIN[1:]]
    with pytest.raises(FileNotFoundError, match=rf"{CLIPS_TRAIN[0][0]}\.wav"):
        cremad.CremaDDataset(root, "train", on_missing="error")
    with pytest.raises(FileNotFoundError, match="train.csv"):
        cremad.CremaDDataset(root / "elsewhere", "train")


def test_bad_list_and_arguments(root):
    (root / "test.csv").write_text("1004_TIE_HAP_XX,HAPPY\n")
    with pytest.raises(ValueError, match=r"test.csv, line 1: unknown label 'HAPPY'"):
        cremad.CremaDDataset(root, "test")
    with pytest.raises(ValueError, match="split"):
        cremad.CremaDDataset(root, "dev")
    with pytest.raises(ValueError, match="num_frames"):
        cremad.CremaDDataset(root, "train", num_frames=0)


def test_frame_folder_name_is_configurable(root):
    (root / "Image-01-FPS").rename(root / "Image-05-FPS")
    ds = cremad.CremaDDataset(root, "train", frame_dir="Image-05-FPS")
    assert len(ds) == 3 and ds[0][0].shape == (3, 1, 224, 224)


def test_missing_pillow_is_a_clear_import_error(root, monkeypatch):
    ds = cremad.CremaDDataset(root, "train")
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(ImportError, match="Pillow"):
        ds[0]


def test_select_frames_rule():
    assert cremad.select_frames(10, 1, train=False) == [5]
    assert cremad.select_frames(10, 2, train=False) == [2, 7]
    assert cremad.select_frames(2, 4, train=False) == [0, 0, 1, 1]
    torch.manual_seed(0)
    picks = cremad.select_frames(10, 4, train=True)
    assert picks == sorted(picks) and len(set(picks)) == 4 and all(0 <= p < 10 for p in picks)
    assert cremad.select_frames(1, 3, train=True) == [0, 0, 0]


def test_paths_of_a_clip(root):
    ds = cremad.CremaDDataset(root, "test")
    clip = CLIPS_TEST[1][0]
    assert ds.audio_path(1) == root / "AudioWAV" / f"{clip}.wav"
    assert ds.frame_folder(-1) == root / "Image-01-FPS" / clip
    with pytest.raises(IndexError, match="index 2 out of range for 2 CREMA-D clips"):
        ds.audio_path(2)
    with pytest.raises(TypeError, match="i must be an int"):
        ds.frame_folder("0")


def test_eval_frames_are_normalised_with_the_published_imagenet_statistics():
    colour = (200, 100, 50)
    x = cremad.transform_frame(Image.new("RGB", (48, 36), colour), train=False)
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])  # torchvision's ImageNet values
    np.testing.assert_allclose(x.mean(dim=(1, 2)).numpy(), (np.array(colour) / 255 - mean) / std, atol=1e-4)


def test_random_crops_span_torchvisions_default_scale_range():
    """RandomResizedCrop's default scale is (0.08, 1.0) of the area."""
    torch.manual_seed(0)
    area = np.array([w * h / (320 * 240) for _, _, w, h in
                     (cremad.random_resized_crop_box(320, 240) for _ in range(2000))])
    assert area.min() < 0.1 and area.max() > 0.9
    assert (area < 0.3).mean() > 0.15
