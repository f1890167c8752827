"""Checkpoints (atomic, verified) and evaluation metrics."""

import numpy as np
import pytest
import torch

from dmil_fast.train import load_checkpoint, prediction_metrics, save_checkpoint


def test_checkpoint_round_trip_atomic_and_verified(tmp_path):
    state = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.zeros(2)}
    path = save_checkpoint(tmp_path / "ck" / "a.pt", {"state_dict": state, "epoch": 3})
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.pt"]  # no temporary file left
    payload = load_checkpoint(path)
    assert payload["epoch"] == 3 and torch.equal(payload["state_dict"]["w"], state["w"])
    assert torch.load(path, weights_only=True)["state_dict"].keys() == state.keys()  # plain torch.save file

    bad = dict(payload, state_dict={"w": state["w"] + 1, "b": state["b"]})
    torch.save(bad, tmp_path / "tampered.pt")
    with pytest.raises(ValueError, match="verification"):
        load_checkpoint(tmp_path / "tampered.pt")
    data = path.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cut.pt"):
        load_checkpoint(tmp_path / "cut.pt")
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_checkpoint(tmp_path / "nope.pt")


@pytest.mark.parametrize("change", ["dtype", "shape", "name"])
def test_verification_sees_a_change_of_dtype_shape_or_name_with_the_same_bytes(tmp_path, change):
    """The digest covers each entry's name, dtype and shape, not only its bytes: the same zero bytes
    reinterpreted as int32, reshaped or renamed fail verification."""
    payload = load_checkpoint(save_checkpoint(tmp_path / "a.pt", {"state_dict": {"w": torch.zeros(2, 2)}}))
    same_bytes = {"dtype": {"w": torch.zeros(2, 2, dtype=torch.int32)}, "shape": {"w": torch.zeros(4)},
                  "name": {"v": torch.zeros(2, 2)}}[change]
    torch.save(dict(payload, state_dict=same_bytes), tmp_path / "changed.pt")
    with pytest.raises(ValueError, match="verification"):
        load_checkpoint(tmp_path / "changed.pt")


def test_prediction_metrics_by_hand():
    # 4 samples, 3 classes. Predictions: m1 (0, 0, 2, 1), m2 (1, 0, 0, 1), m12 (0, 2, 2, 1).
    def onehot(pred):
        return torch.nn.functional.one_hot(torch.tensor(pred), 3).float()

    labels = torch.tensor([0, 1, 2, 1])
    m = prediction_metrics(onehot([0, 0, 2, 1]), onehot([1, 0, 0, 1]), onehot([0, 2, 2, 1]), labels,
                           class_names=["a", "b", "c"], types=np.array([0, 3, 3, 0]), type_names=["red", "u1", "u2", "syn"])
    assert m["accuracy"] == 0.75 and m["accuracy_1"] == 0.75 and m["accuracy_2"] == 0.25
    assert m["per_class_accuracy"] == {"a": 1.0, "b": 0.5, "c": 1.0}
    # sample 2 (label 2): m12 right, m1 right -> not Syn.; no sample has m12 right and both wrong
    assert m["syn"] == 0.0
    assert m["per_type_accuracy"]["red"] == 1.0 and m["per_type_accuracy"]["syn"] == 0.5
    m2 = prediction_metrics(onehot([1]), onehot([2]), onehot([0]), torch.tensor([0]), class_names=["a", "b", "c"])
    assert m2["syn"] == 1.0 and m2["per_type_accuracy"] == {} and m2["per_class_accuracy"]["b"] is None


def _onehot(pred, c=3):
    return torch.nn.functional.one_hot(torch.tensor(pred), c).float()


def test_per_class_accuracy_is_the_multimodal_prediction_by_hand():
    """Per class, the fraction of that class's samples the multimodal logits get right; the unimodal
    predictions are chosen to give other per-class numbers (m1 all right, m2 all wrong)."""
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    m = prediction_metrics(_onehot([0, 0, 1, 1, 2, 2]), _onehot([1, 1, 0, 0, 0, 0]),
                           _onehot([0, 1, 1, 1, 0, 2]), labels, class_names=["a", "b", "c"])
    assert m["per_class_accuracy"] == {"a": 0.5, "b": 1.0, "c": 0.5}
    assert m["accuracy"] == 4 / 6 and m["accuracy_1"] == 1.0 and m["accuracy_2"] == 0.0


def test_per_type_accuracy_without_type_names_names_every_code_up_to_the_largest():
    # m12 right on samples 0 and 3; codes 0, 2, 2, 1 -> "0": 1/1, "1": 1/1, "2": 0/2
    labels = torch.tensor([0, 1, 2, 1])
    m = prediction_metrics(_onehot([0, 0, 0, 0]), _onehot([0, 0, 0, 0]), _onehot([0, 2, 1, 1]), labels,
                           class_names=["a", "b", "c"], types=np.array([0, 2, 2, 1]))
    assert m["per_type_accuracy"] == {"0": 1.0, "1": 1.0, "2": 0.0}
    # a code that no sample has gets None (JSON has no NaN)
    m = prediction_metrics(_onehot([0]), _onehot([0]), _onehot([0]), torch.tensor([0]),
                           class_names=["a", "b", "c"], types=np.array([2]))
    assert m["per_type_accuracy"] == {"0": None, "1": None, "2": 1.0}
