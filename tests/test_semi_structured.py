"""Export of N:M models: check_nm names the first group that breaks the pattern, and
to_semi_structured_ checks every constraint of torch's semi-structured kernels before it
changes anything (on CPU, every check; on CUDA, the conversion and the outputs)."""

import re

import pytest
import torch
from torch import nn

from dsd_kernels import prune, semi_structured
from dsd_kernels.semi_structured import check_nm, to_semi_structured_


def _model(seed=0):
    """Two eligible Linears, one whose in_features (6) no pattern of 4 fits, a conv."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 6), nn.ReLU(),
                         nn.Linear(6, 16), nn.Unflatten(1, (4, 2, 2)), nn.Conv2d(4, 2, 1))


def _snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [type(p) for p in model.parameters()])


def assert_unchanged(model, snapshot):
    state, types = snapshot
    assert list(model.state_dict()) == list(state)
    for key, value in state.items():
        assert torch.equal(model.state_dict()[key], value), key
    assert [type(p) for p in model.parameters()] == types


def test_check_nm_passes_a_pruned_model_and_names_what_it_checked():
    model = _model()
    assert prune.nm_structured_model(model, "2:4") == {
        "4.weight": "shape (16, 6): dim 1 (6) is not a multiple of 4"}
    expected = ["0.weight", "2.weight", "6.weight"]
    assert check_nm(model, "2:4") == expected  # the masks as they leave the weights
    for i in (0, 2, 6):
        prune.remove(model[i], "weight")
    assert check_nm(model, "2:4") == expected
    assert check_nm(model, "4:8") == ["0.weight", "2.weight"]  # 4 channels: not 4:8-able
    with pytest.raises(ValueError, match="not 1:4"):
        check_nm(model, "1:4")


def test_check_nm_names_the_first_group_with_more_than_n_non_zeros():
    weight = torch.zeros(3, 8)
    weight[0, :2] = 1
    weight[1, 4:7] = torch.tensor([1.0, float("nan"), -0.5])  # NaN counts as non-zero
    weight[2, 0:4] = 1
    message = ("fc.weight is not 2:4: the group fc.weight[1, 4:8] (row 1, columns 4 to 7) "
               "has 3 non-zeros, more than 2")
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        check_nm({"fc.weight": weight}, "2:4")
    conv = torch.zeros(2, 8, 3, 3)
    conv[1, 0:4, 2, 1] = -0.0  # signed zeros are zeros
    conv[1, 4:8, 2, 1] = 1  # four along in_channels at (out 1, kh 2, kw 1)
    with pytest.raises(ValueError, match=r"conv is not 2:4: the group conv\[1, 4:8, 2, 1\] has "
                                         r"4 non-zeros, more than 2$"):
        check_nm([("conv", conv)], (2, 4))
    assert check_nm([("conv", conv)], "4:8") == ["conv"]


@pytest.mark.parametrize("given, error, message", [
    ({"bias": torch.zeros(8)}, ValueError, r"bias has shape \(8,\): it cannot be 2:4"),
    ({"w": torch.zeros(4, 6)}, ValueError, r"w has shape \(4, 6\)"),
    ([torch.zeros(4, 4)], TypeError, "check_nm takes"),
    (torch.zeros(4, 4), TypeError, "check_nm takes"),
    ({"w": torch.zeros(4, 4)}, ValueError, "pattern"),  # with the pattern "4:4" below
    ({"w": 3}, TypeError, "check_nm: w is a int, not a tensor"),
])
def test_check_nm_refuses_what_cannot_take_the_pattern(given, error, message):
    pattern = "4:4" if message == "pattern" else "2:4"
    with pytest.raises(error, match=message):
        check_nm(given, pattern)


def test_to_semi_structured_explains_each_constraint_and_leaves_the_layers_dense():
    model = nn.Sequential(nn.Linear(8, 12), nn.Linear(16, 32).half())
    before = _snapshot(model)
    report = to_semi_structured_(model)
    assert report.converted == []
    backend = semi_structured._backend()
    float16 = backend._DTYPE_SHAPE_CONSTRAINTS[torch.float16]
    rows, cols = float16.sparse_min_rows, float16.sparse_min_cols
    assert report.dense == {
        "0.weight": "; ".join([
            "on cpu: torch's semi-structured kernels run on CUDA only",
            f"dtype torch.float32: {backend.BACKEND} takes torch.float16, torch.bfloat16, "
            "torch.int8 (e.g. model.half())",
            f"shape (12, 8): {backend.BACKEND} needs out_features a positive multiple of "
            f"{rows} and in_features one of {cols}"]),
        "1.weight": "on cpu: torch's semi-structured kernels run on CUDA only"}
    assert_unchanged(model, before)


@pytest.mark.parametrize("pattern, fits", [("2:4", True), ("1:4", True), ("1:2", True),
                                           ("2:8", True), ("4:8", False), ("3:4", False),
                                           ("1:3", False), ("2:6", False)])
def test_only_patterns_that_imply_two_four_are_taken(pattern, fits):
    model = _model()
    if fits:
        to_semi_structured_(model, pattern)
    else:
        with pytest.raises(ValueError, match=f"pattern {pattern} does not imply 2:4"):
            to_semi_structured_(model, pattern)


def test_a_pruned_model_is_refused_with_the_fix():
    model = _model()
    prune.nm_structured_model(model)
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"^0.weight is reparametrised by torch.nn.utils.prune; "
                                         r"call prune.remove\(model.0, 'weight'\) first"):
        to_semi_structured_(model)
    assert_unchanged(model, before)
    with pytest.raises(TypeError, match="nn.Module"):
        to_semi_structured_({"0.weight": torch.zeros(4, 4)})


def test_weights_that_are_not_nm_are_refused_before_any_conversion(monkeypatch):
    """With the device checks passed (as on a GPU), a dense eligible weight stops the
    conversion of all of them."""
    model = _model()
    prune.nm_structured_model(model)
    for i in (0, 2, 6):
        prune.remove(model[i], "weight")
    model[2].weight.data[5, 8:12] = 1.0
    monkeypatch.setattr(semi_structured, "_why_dense",
                        lambda weight, backend: ["shape"] if weight.shape[1] % 4 else [])
    monkeypatch.setattr(semi_structured, "_check_device", lambda weights, backend: None)
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"^2.weight is not 2:4: the group 2.weight\[5, 8:12\]"):
        to_semi_structured_(model)
    assert_unchanged(model, before)


def test_weights_already_semi_structured_are_left_as_they_are():
    """A second export, or a model converted by hand: nothing to check or convert there."""
    model = nn.Sequential(nn.Linear(16, 16).half(), nn.Linear(16, 16).half())
    converted = torch.sparse.SparseSemiStructuredTensorCUTLASS(
        torch.Size([16, 16]), packed=torch.zeros(16, 8, dtype=torch.half),
        meta=torch.zeros(16, 1, dtype=torch.int16), packed_t=None, meta_t=None,
        compressed_swizzled_bitmask=None, requires_grad=False)
    model[0].weight = nn.Parameter(converted, requires_grad=False)
    with pytest.raises(ValueError, match="^1.weight is not 2:4"):  # the dense one only
        check_nm(model, "2:4")
    prune.nm_structured_model(model[1])
    prune.remove(model[1], "weight")
    assert check_nm(model, "2:4") == ["1.weight"]
    report = to_semi_structured_(model)
    assert report.converted == [] and list(report.dense) == ["1.weight"]
    assert model[0].weight is not None and isinstance(model[0].weight, type(converted))


@pytest.mark.parametrize("capability, cusparselt, message", [
    ((7, 5), True, "compute capability 7.5; torch's semi-structured kernels need 8.0"),
    ((9, 0), False, "no cuSPARSELt; set torch.sparse.SparseSemiStructuredTensor._FORCE_CUTLASS"),
])
def test_the_device_checks(monkeypatch, capability, cusparselt, message):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: capability)
    monkeypatch.setattr(torch.backends.cusparselt, "is_available", lambda: cusparselt)
    backend = torch.sparse.SparseSemiStructuredTensorCUSPARSELT
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        semi_structured._check_device([torch.zeros(16, 16)], backend)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_conversion_on_cuda_keeps_the_outputs():
    """Within 1e-2 (absolute and relative) of the dense fp16 model on outputs of order 1: the
    two kernels accumulate the same products in fp32 in different orders (docs/export.md)."""
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("torch's semi-structured kernels need compute capability 8.0")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(),
                          nn.Linear(64, 10)).half().cuda()
    prune.nm_structured_model(model, "2:4")
    for i in (0, 2, 4):
        prune.remove(model[i], "weight")
    x = torch.randn(32, 64, dtype=torch.float16, device="cuda")
    with torch.no_grad():
        dense = model(x)
        report = to_semi_structured_(model)
        sparse = model(x)
    assert report.converted == ["0.weight", "2.weight"]
    assert list(report.dense) == ["4.weight"]  # 10 rows: not a multiple of the minimum
    assert isinstance(model[0].weight, torch.sparse.SparseSemiStructuredTensor)
    torch.testing.assert_close(sparse, dense, rtol=1e-2, atol=1e-2)
