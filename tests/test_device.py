"""Device arguments: what each accepted form means, and a clear error for one that is not usable."""

import pytest
import torch

from dmil_fast._settings import check_device


def test_auto_is_the_gpu_when_one_is_visible_else_the_cpu():
    assert check_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("given", ["cpu", torch.device("cpu"), "cpu:0"])
def test_the_cpu_in_any_spelling(given):
    assert check_device(given).type == "cpu"


def test_a_gpu_past_the_last_one_or_absent_is_refused_naming_the_argument():
    with pytest.raises(ValueError, match=r"--device 'cuda:99' is not available"):
        check_device("cuda:99", name="--device")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"device 'cuda' is not available: (this torch was built without "
                                             r"CUDA|no GPU is visible)"):
            check_device("cuda")
    else:
        assert check_device("cuda").type == "cuda"


@pytest.mark.parametrize("given,error,match", [
    ("gpu", ValueError, "device must be 'auto' or a torch device such as 'cpu', 'cuda' or 'cuda:1', got 'gpu'"),
    ("", ValueError, "device must be 'auto' or a torch device"),
    (0.5, TypeError, "device must be a str, a torch.device or a GPU ordinal, got float"),
    (-1, ValueError, "device must be a GPU ordinal >= 0, got -1"),
])
def test_what_is_not_a_device(given, error, match):
    with pytest.raises(error, match=match):
        check_device(given)


def test_an_int_is_a_gpu_ordinal_as_torch_takes_it():
    if torch.cuda.is_available():
        assert check_device(0) == torch.device("cuda", 0)
    with pytest.raises(ValueError, match=r"device 'cuda:99' is not available"):
        check_device(99)
