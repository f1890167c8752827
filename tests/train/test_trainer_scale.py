"""Trainer options for scale: streamed data through DataLoader workers (the same batches as in
memory), bf16 autocast on CPU, torch.compile, mid-epoch checkpoints and their argument checks."""

import json

import numpy as np
import pytest
import torch

from dmil_fast.data import make_synthetic
from dmil_fast.train import DMILConfig, FeatureData, Trainer, load_checkpoint
from dmil_fast.train.data import StreamSplit

SMALL = dict(embed_size=8, input_size=16, encoder_hidden=16, encoder_depth=1, batch_size=32,
             stage1_lr=0.05, stage2_lr=0.02, stage3_lr=0.01, lr=0.03, joint_fusion_hidden=8)
COMPARED = ("test_accuracy", "test_loss", "final_train_loss", "best_val_accuracy", "per_type_accuracy")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def syn(tmp_path_factory):
    return make_synthetic(tmp_path_factory.mktemp("syn") / "d", n=500, dim=8, num_classes=3, seed=4)


def _h5(src, dst):
    import h5py

    with h5py.File(dst, "w") as f:
        for name in ("modality_1", "modality_2", "labels", "split", "interaction_type"):
            f[name] = np.load(src / f"{name}.npy")
        f.attrs["meta"] = (src / "meta.json").read_text()
    return dst


def test_streamed_data_trains_exactly_as_in_memory(syn, tmp_path):
    """Streaming reads the same rows (memory map / HDF5, two worker processes) as the in-memory
    tensors, so the whole run is identical."""
    config = DMILConfig(n_epochs=3, stage1_epochs=1, stage2_epochs=1, **SMALL)
    memory = Trainer(FeatureData.load(syn), config, method="dmil", out_dir=tmp_path / "mem", echo=None).fit()
    data = FeatureData.load(syn, stream=True)
    assert isinstance(data.train, StreamSplit) and data.stream
    streamed = Trainer(data, config, method="dmil", out_dir=tmp_path / "stream", echo=None, workers=2).fit()
    h5 = FeatureData.load(_h5(syn, tmp_path / "d.h5"), stream=True)
    from_h5 = Trainer(h5, config, method="dmil", out_dir=tmp_path / "h5", echo=None, workers=1).fit()
    for key in COMPARED:
        assert streamed[key] == memory[key], key
        assert from_h5[key] == memory[key], key


def test_stream_none_follows_the_size_threshold(syn, monkeypatch):
    import dmil_fast.train.data as data_module

    assert not FeatureData.load(syn, stream=None).stream  # 500 x 16 floats: far below 2 GiB
    monkeypatch.setattr(data_module, "STREAM_THRESHOLD_BYTES", 1000)
    assert FeatureData.load(syn, stream=None).stream


@pytest.mark.parametrize("method,backend", [
    ("dmil", None),
    ("dmil", "reference"),
    ("joint", None),
])
def test_bf16_autocast_on_cpu_trains_with_finite_loss(syn, tmp_path, method, backend):
    config = DMILConfig(n_epochs=3, stage1_epochs=1, stage2_epochs=1, **SMALL)
    trainer = Trainer(FeatureData.load(syn), config, method=method, out_dir=tmp_path, echo=None, amp="bf16",
                      backend=backend)
    seen = []
    step = trainer.train_step

    def spy(x1, x2, y):
        loss, outputs = step(x1, x2, y)
        seen.append(outputs["out"].dtype)
        return loss, outputs

    trainer.train_step = spy
    metrics = trainer.fit()
    assert set(seen) == {torch.bfloat16}  # the Linear layers really ran in bf16
    assert np.isfinite(metrics["final_train_loss"]) and np.isfinite(metrics["test_loss"])
    assert metrics["amp"] == "bf16" and 0.0 <= metrics["test_accuracy"] <= 1.0
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())  # weights stay fp32


def test_compiled_model_trains_like_the_eager_one(syn, tmp_path):
    """torch.compile (aot_eager: the same kernels as eager, so the numbers agree to round-off)."""
    config = DMILConfig(n_epochs=1, stage1_epochs=1, stage2_epochs=0, **SMALL)
    eager = Trainer(FeatureData.load(syn), config, method="joint", out_dir=tmp_path / "e", echo=None).fit()
    lines = []
    trainer = Trainer(FeatureData.load(syn), config, method="joint", out_dir=tmp_path / "c", echo=lines.append,
                      compile="aot_eager")
    compiled = trainer.fit()
    assert type(trainer.net).__name__ == "OptimizedModule" and compiled["compile"] == "aot_eager"
    assert lines[0].startswith("[joint] stage 1: torch.compile builds the model's graphs")  # before the wait
    assert compiled["final_train_loss"] == pytest.approx(eager["final_train_loss"], rel=1e-5)
    assert compiled["test_loss"] == pytest.approx(eager["test_loss"], rel=1e-5)
    # the checkpoint holds the plain model's names, not the compiled wrapper's
    names = set(load_checkpoint(tmp_path / "c" / "checkpoints" / "last.pt")["state_dict"])
    assert names == set(trainer.model.state_dict()) and not any("_orig_mod" in n for n in names)


def test_checkpoint_every_writes_mid_epoch_states(syn, tmp_path):
    config = DMILConfig(n_epochs=1, stage1_epochs=1, stage2_epochs=0, **SMALL)  # 350 train rows: 11 steps
    positions = []

    class Spy(Trainer):
        def save_last(self):
            super().save_last()
            positions.append(load_checkpoint(self.ckpt_dir / "last.pt")["position"])

    Spy(FeatureData.load(syn), config, method="dmil", out_dir=tmp_path, echo=None, checkpoint_every=4).fit()
    assert positions == [{"epoch": 1, "step": 4, "complete": False}, {"epoch": 1, "step": 8, "complete": False},
                         {"epoch": 1, "step": 11, "complete": True}]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert set(metrics["train_samples_per_second"]) == {"1"} and metrics["train_samples_per_second"]["1"] > 0


@pytest.mark.parametrize("kwargs,message", [
    (dict(checkpoint_every=-1), "checkpoint_every"),
    (dict(workers=-2), "workers"),
    (dict(amp="fp8"), "amp"),
])
def test_bad_options_are_refused(syn, tmp_path, kwargs, message):
    config = DMILConfig(n_epochs=1, stage1_epochs=1, stage2_epochs=0, **SMALL)
    with pytest.raises(ValueError, match=message):
        Trainer(FeatureData.load(syn), config, method="dmil", out_dir=tmp_path, echo=None, **kwargs)


def test_sync_bn_on_one_process_is_a_no_op_and_on_cpu_ranks_a_clear_error(syn, tmp_path):
    from dmil_fast.train import DistContext

    config = DMILConfig(n_epochs=1, stage1_epochs=1, stage2_epochs=0, **SMALL)
    data = FeatureData.load(syn)
    said = []
    single = Trainer(data, config, method="joint", out_dir=tmp_path / "a", echo=said.append, sync_bn=True)
    assert single.sync_bn is False
    assert len(said) == 1 and "one process" in said[0]  # not silently ignored
    assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in single.model.modules())
    two_cpu_ranks = DistContext(rank=0, world_size=2, backend="gloo", device=torch.device("cpu"))
    with pytest.raises(ValueError, match="sync_bn needs CUDA devices"):
        Trainer(data, config, method="joint", out_dir=tmp_path / "b", echo=None, dist=two_cpu_ranks, sync_bn=True)
    with pytest.raises(TypeError, match="sync_bn must be a bool"):
        Trainer(data, config, method="joint", out_dir=tmp_path / "c", echo=None, sync_bn="yes")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="SyncBatchNorm runs on CUDA only; no GPU here")
def test_sync_bn_converts_the_resnet_batchnorms_on_gpu_ranks(tmp_path):
    from dmil_fast.nn import resnet18
    from dmil_fast.train import DistContext, build_model

    config = DMILConfig(embed_size=8, input_size=512)
    model = build_model("dmil", None, 6, config, encoders=(resnet18("visual"), resnet18("audio")))
    plain_keys = set(model.state_dict())
    ranks = DistContext(rank=0, world_size=2, backend="nccl", device=torch.device("cuda", 0))
    data = FeatureData.from_tensors(*[(torch.randn(4, 8), torch.randn(4, 8), torch.arange(4) % 2)] * 3,
                                    num_classes=6)
    trainer = Trainer(data, config, method="dmil", out_dir=tmp_path, echo=None, dist=ranks, model=model,
                      sync_bn=True)
    assert trainer.sync_bn is True
    assert not any(type(m) is torch.nn.BatchNorm2d for m in trainer.model.modules())
    assert sum(isinstance(m, torch.nn.SyncBatchNorm) for m in trainer.model.modules()) == 2 * 20
    assert set(trainer.model.state_dict()) == plain_keys  # checkpoints keep their keys


@pytest.mark.parametrize("stream", [False, True])
def test_each_split_holds_the_rows_split_npy_gives_it(tmp_path, stream):
    n = 40
    rng = np.random.default_rng(0)
    split = rng.permutation(np.repeat(np.array([0, 1, 2], np.int8), [24, 9, 7]))
    np.save(tmp_path / "modality_1.npy", rng.standard_normal((n, 3)).astype(np.float32))
    np.save(tmp_path / "modality_2.npy", rng.standard_normal((n, 3)).astype(np.float32))
    np.save(tmp_path / "labels.npy", rng.integers(0, 2, n))
    np.save(tmp_path / "split.npy", split)
    data = FeatureData.load(tmp_path, stream=stream)
    for name, code in (("train", 0), ("val", 1), ("test", 2)):
        np.testing.assert_array_equal(getattr(data, name).idx.numpy(), np.flatnonzero(split == code), err_msg=name)


def test_stream_none_compares_the_training_features_bytes_with_the_threshold(syn, monkeypatch):
    """The threshold is in bytes: n_train x (D1 + D2) float32 values, 4 bytes each, streamed only
    when strictly above it."""
    import dmil_fast.train.data as data_module

    memory = FeatureData.load(syn)
    nbytes = len(memory.train) * sum(memory.dims) * 4
    assert nbytes == memory.train.x1.numel() * 4 + memory.train.x2.numel() * 4
    monkeypatch.setattr(data_module, "STREAM_THRESHOLD_BYTES", nbytes - 1)
    assert FeatureData.load(syn, stream=None).stream
    monkeypatch.setattr(data_module, "STREAM_THRESHOLD_BYTES", nbytes)
    assert not FeatureData.load(syn, stream=None).stream
