"""Keeping the sparsity a model already has: `nonzero_masks` on every backend against the
bit-level oracle, plans whose sparse phases take the model's exact zeros (`masks="zeros"`),
the zeros kept bit for bit through S and S-D training, resume, and `dsd train --masks zeros`."""

import copy

import pytest
import torch
from conftest import DTYPES
from torch import nn

import dsd_kernels as dk
from dsd import DSD, Plan
from dsd.cli import main
from dsd.config import RunConfig
from dsd.plan import Phase
from dsd.train import load_config
from dsd.train.prepare import prepare
from dsd_kernels.backends import torch_ref

from _backends import per_backend
from _runs import interrupted_run

NAN_MESSAGE = "contains NaN; a NaN weight is neither zero nor a number to keep"


def _kept_by_bits(x):
    """Oracle: an entry is kept when the bits of |x| (its dtype's, sign cleared) are not 0."""
    x = x.detach().cpu().contiguous()
    if x.dtype == torch.float32:
        return (x.view(torch.int32) & 0x7FFFFFFF) != 0
    return (x.view(torch.int16) & 0x7FFF) != 0


def _specials(shape, dtype, seed):
    """Both zeros, subnormals of the dtype, Inf and ordinary values, drawn at random."""
    tiny = torch.finfo(dtype).smallest_normal
    values = torch.tensor([0.0, -0.0, tiny / 4, -tiny / 4, 1.0, -2.5, float("inf"),
                           -float("inf")])
    gen = torch.Generator().manual_seed(seed)
    return values[torch.randint(0, len(values), shape, generator=gen)].to(dtype)


def _check(xs, device):
    xs = [x.to(device) for x in xs]
    before = [x.clone() for x in xs]
    got = dk.nonzero_masks(xs)
    assert len(got) == len(xs)
    for i, (mask, x) in enumerate(zip(got, xs)):
        assert mask.dtype == torch.bool and mask.shape == x.shape and mask.device == x.device
        assert mask.is_contiguous()
        assert torch.equal(mask.cpu(), _kept_by_bits(x)), f"tensor {i}"
        assert torch.equal(mask.cpu(), torch_ref.nonzero_masks([x.cpu()])[0]), f"tensor {i}"
    assert all(torch.equal(x, b) for x, b in zip(xs, before))


@per_backend
@pytest.mark.parametrize("dtype", DTYPES)
def test_masks_are_the_entries_that_are_not_zero(backend, device, dtype):
    """Signed zeros pruned, subnormals and Inf kept; 0-d, empty, strided and channels_last
    tensors and a tensor longer than a work unit, all in one call."""
    conv = _specials((4, 6, 3, 3), dtype, 1).to(memory_format=torch.channels_last)
    xs = [_specials((7, 9), dtype, 0), conv, _specials((12, 10), dtype, 2).t(),
          torch.tensor(0.0, dtype=dtype), torch.tensor(-0.0, dtype=dtype),
          torch.tensor(3.0, dtype=dtype), torch.empty(0, 5, dtype=dtype),
          _specials((70_001,), dtype, 3)]
    _check(xs, device)


@per_backend
def test_a_list_of_mixed_dtypes(backend, device):
    _check([_specials((33,), dtype, seed) for seed, dtype in enumerate(DTYPES * 2)], device)


@per_backend
def test_nan_refused_naming_the_tensor_inf_kept(backend, device):
    x = torch.ones(4, 8, device=device)
    x[1, 3] = float("inf")
    assert dk.nonzero_masks(x)[1, 3]
    x[2, 5] = float("nan")
    for dtype in DTYPES:
        xs = [torch.zeros(2, 4, device=device), x.to(dtype)]
        with pytest.raises(ValueError, match=rf"^xs\[1\] {NAN_MESSAGE}$"):
            dk.nonzero_masks(xs)
        with pytest.raises(ValueError, match=rf"xs\[1\] {NAN_MESSAGE}"):  # the kernel finds it
            torch.ops.dsd.nonzero_masks(xs)
    with pytest.raises(ValueError, match=r"^xs\[0\] \('fc.weight'\) contains NaN"):
        dk.nonzero_masks([x], names=["fc.weight"])


@per_backend
def test_opcheck(backend, device):
    xs = [_specials((4, 8), torch.float32, 0).to(device),
          _specials((2, 4, 3), torch.float16, 1).to(device)]
    torch.library.opcheck(torch.ops.dsd.nonzero_masks, (xs,))


def test_triton_interpreted_matches_the_oracle(triton_backend):
    """A fast interpreted case of every dtype (the per-backend tests run Triton's interpreter
    with the slow tests)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    xs = [_specials((5, 7), dtype, seed) for seed, dtype in enumerate(DTYPES)]
    xs += [torch.tensor(-0.0), torch.empty(0), _specials((40_000,), torch.bfloat16, 9)]
    _check(xs, device)
    nan = torch.ones(3)
    nan[1] = float("nan")
    with pytest.raises(ValueError, match=rf"^xs\[1\] {NAN_MESSAGE}$"):
        dk.nonzero_masks([torch.ones(2), nan.to(device)])


def test_one_tensor_in_one_mask_out_meta_and_bad_input():
    x = torch.tensor([[0.0, 1.0]])
    assert isinstance(dk.nonzero_masks(x), torch.Tensor)
    assert isinstance(dk.nonzero_masks((x, x)), list)
    meta = dk.nonzero_masks(torch.empty(4, 8, device="meta"))
    assert meta.device.type == "meta" and meta.shape == (4, 8) and meta.dtype == torch.bool
    for bad, match in [([], "xs is an empty list"),
                       ([torch.ones(2, dtype=torch.float64)], r"xs\[0\] has dtype torch.float64"),
                       ("w", "xs must be a tensor or a list of tensors")]:
        with pytest.raises(ValueError, match=match):
            dk.nonzero_masks(bad)


# ---- plans -----------------------------------------------------------------------------

def test_zeros_plans_and_their_round_trip():
    plan = Plan.sparse(3, masks="zeros", unit="steps", exclude="0.*")
    assert [(p.kind, p.masks, p.sparsity) for p in plan.phases] == [("sparse", "zeros", None)]
    assert plan.keeps_zeros and (plan.unit, plan.exclude) == ("steps", ("0.*",))
    s_d = Plan.from_lengths([2, 3], first="sparse", masks="zeros", redense_lr_factor=0.5)
    assert [(p.kind, p.masks, p.lr_scale) for p in s_d.phases] == [
        ("sparse", "zeros", 1.0), ("dense", "magnitude", 0.5)]
    for each in (plan, s_d):
        assert Plan.from_dict(each.to_dict()) == each
    assert Plan.sparse(2, sparsity=0.25).phases[0] == Phase("sparse", 2, sparsity=0.25)
    old = Plan.dsd(1, 1, 1).to_dict()  # a checkpoint's plan from before the masks option
    for phase in old["phases"]:
        del phase["masks"]
    assert Plan.from_dict(old) == Plan.dsd(1, 1, 1)


@pytest.mark.parametrize("make, match", [
    (lambda: Plan.dsd(1, 1, 1, masks="zeros"),
     r"^phase 1 keeps the model's zeros \(masks='zeros'\) but follows dense phase 0, which "
     r"fills them in; it must come before any dense phase \(S or S-D\)$"),
    (lambda: Plan.from_lengths([1, 1, 1], first="sparse", masks="zeros"),
     r"^phase 2 keeps the model's zeros .* follows dense phase 1"),
    (lambda: Plan((Phase("sparse", 1), Phase("dense", 1), Phase("sparse", 1, masks="zeros"))),
     r"^phase 2 keeps the model's zeros .* follows dense phase 1"),
    (lambda: Plan.sparse(2, masks="zeros", sparsity=0.5),
     r"^masks='zeros' keeps the zeros the model has, so it takes no sparsity"),
    (lambda: Plan.sparse(2, masks="zeros", pattern="2:4"),
     r"^masks='zeros' keeps the zeros the model has, so it takes no pattern"),
    (lambda: Phase("dense", 1, masks="zeros"),
     r"^a dense phase has no masks; masks='zeros' needs kind='sparse'$"),
    (lambda: Plan.sparse(1, masks="zero"), r"^masks must be one of \('magnitude', 'zeros'\)"),
    (lambda: Phase("sparse", 1, masks="zeros", lr_scale=0), "^lr_scale must be a positive"),
])
def test_bad_zeros_plans_refused_in_one_line(make, match):
    with pytest.raises(ValueError, match=match) as info:
        make()
    assert "\n" not in str(info.value)


# ---- training ----------------------------------------------------------------------------

def _pruned_net(seed=0):
    """A small MLP whose weights are half zeros (some of them -0.0), as a pruned checkpoint."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    with torch.no_grad():
        for layer in (net[0], net[2]):
            layer.weight.mul_(dk.magnitude_masks(layer.weight, 0.5))
            rows, cols = (layer.weight == 0).nonzero()[:3].unbind(1)
            layer.weight[rows, cols] = -0.0
    return net


def _weights(net):
    return [net[0].weight, net[2].weight]


def _steps(net, optimizer, dsd, steps, first_step):
    for step in range(first_step, first_step + steps):
        dsd.step_start(step)
        optimizer.zero_grad()
        x = torch.randn(32, 8, generator=torch.Generator().manual_seed(step))
        nn.functional.cross_entropy(net(x), (x[:, 0] > 0).long()).backward()
        optimizer.step()


OPTIMIZERS = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-3),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
    "rmsprop": lambda ps: torch.optim.RMSprop(ps, lr=1e-2, momentum=0.5),  # the general path
}


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_zeros_kept_bit_for_bit_in_s_then_regrown_from_zero_in_d(optimizer):
    net = _pruned_net()
    zeros = [w.detach() == 0 for w in _weights(net)]
    start = [w.detach().clone() for w in _weights(net)]
    opt = OPTIMIZERS[optimizer](net.parameters())
    dsd = DSD(net, opt, Plan.from_lengths([4, 3], first="sparse", masks="zeros", unit="steps"))
    _steps(net, opt, dsd, 4, 0)
    assert dsd.found_sparsity == {"0.weight": 0.5, "2.weight": 0.5}
    assert dsd.sparsity() == dsd.found_sparsity
    for w, zero, w0 in zip(_weights(net), zeros, start):
        assert (w.detach()[zero].view(torch.int32) == 0).all()  # +0.0, the -0.0 ones too
        assert (w.detach()[~zero] != w0[~zero]).float().mean() > 0.9  # the kept weights train
        assert torch.equal(dk.nonzero_masks(w), ~zero)
        for state in opt.state[w].values():
            if isinstance(state, torch.Tensor) and state.shape == w.shape:
                assert (state[zero].view(torch.int32) == 0).all()
    dsd.step_start(4)  # re-dense: the pruned weights start from 0, with 0 state
    for w, zero in zip(_weights(net), zeros):
        assert (w.detach()[zero].view(torch.int32) == 0).all()
    _steps(net, opt, dsd, 3, 4)
    for w, zero in zip(_weights(net), zeros):
        assert (w.detach()[zero] != 0).float().mean() > 0.9  # regrown


def test_resume_recovers_the_masks_from_the_zeros():
    """Saved mid-phase; resumed into a plain AdamW (which drops the masks) they come back from
    the zeros, into a masked one from its state_dict; either way the run ends as one run."""
    plan = Plan.sparse(6, masks="zeros", unit="steps")

    def run(stop=None, restore=None, masked=False):
        net = _pruned_net()
        opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
        dsd = DSD(net, opt, plan)
        first = 0
        if restore is not None:
            restore = copy.deepcopy(restore)  # loaded optimizer state is stepped in place
            net.load_state_dict(restore["model"])
            if masked:
                opt.load_state_dict(restore["optimizer"])
            else:
                plain = torch.optim.AdamW(net.parameters(), lr=1e-2)
                plain.load_state_dict(restore["optimizer"])
                opt.load_state_dict(plain.state_dict())
            dsd.resume(3)
            first = 3
        _steps(net, opt, dsd, (stop or 6) - first, first)
        return net, {"model": net.state_dict(), "optimizer": opt.state_dict()}

    straight, _ = run()
    _, saved = run(stop=3)
    for masked in (False, True):
        resumed, _ = run(restore=saved, masked=masked)
        for a, b in zip(_weights(resumed), _weights(straight)):
            assert torch.equal(a.view(torch.int32), b.view(torch.int32))


def test_a_model_without_zeros_is_refused_with_nothing_changed():
    net = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 2))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    dsd = DSD(net, opt, Plan.from_lengths([1, 1], first="sparse", masks="zeros"))
    groups = [dict(group) for group in opt.param_groups]
    with pytest.raises(ValueError, match=r"^no exact zeros found in the prunable tensors: "
                       r"0.weight, 1.weight, 2.weight, \.\.\. \(4 tensors\); to prune, use a "
                       r"sparsity \(masks='magnitude'\)$"):
        dsd.epoch_start(0)
    assert dsd.phase_index is None and opt.masks == {}
    assert [dict(group) for group in opt.param_groups] == groups


# ---- dsd train ---------------------------------------------------------------------------

RUN = ["--task", "digits", "--mlp-hidden", "8", "--backend", "torch", "--optimizer", "adamw",
       "--lr", "0.01"]


@pytest.fixture(scope="module")
def pruned_init(tmp_path_factory):
    """The run's model as a plain state_dict (dense.pt), and with half of each weight zeroed
    (pruned.pt, a pruned checkpoint)."""
    root = tmp_path_factory.mktemp("zeros")
    config = RunConfig.from_mapping({"task": "digits", "mlp_hidden": [8], "backend": "torch"})
    state = prepare(config, torch.device("cpu"))[2].state_dict()
    torch.save(state, root / "dense.pt")
    for name, value in state.items():
        if name.endswith("weight"):
            value.mul_(dk.magnitude_masks(value, 0.5))
    torch.save(state, root / "pruned.pt")
    return root / "pruned.pt"


def test_an_s_only_run_keeps_the_init_zeros_and_resumes_bit_exactly(pruned_init, tmp_path,
                                                                     monkeypatch, capsys):
    args = [*RUN, "--phases", "2", "--first-phase", "sparse", "--init", str(pruned_init),
            "--masks", "zeros"]
    assert main(["train", *args, "--out", str(tmp_path / "straight")]) == 0
    printed = capsys.readouterr().out
    assert "phase 1/1 from epoch 1: kept the model's zeros (50.0% of the prunable weights)" \
        in printed
    assert "hidden.0.weight: 50.0% zeros" in printed and "out.weight: 50.0% zeros" in printed
    init, final = torch.load(pruned_init), torch.load(tmp_path / "straight" / "model.pt")
    for name in ("hidden.0.weight", "out.weight"):
        zero = init[name] == 0
        assert torch.equal(final[name] == 0, zero), name
        assert (final[name][zero].view(torch.int32) == 0).all(), name
    config = load_config(tmp_path / "straight")
    assert config.masks == "zeros"
    assert RunConfig.from_toml(tmp_path / "straight" / "config.toml") == config
    run = interrupted_run(tmp_path / "run", monkeypatch, ("dsd", 1), config.to_dict())
    assert main(["train", "--resume", str(run), "--quiet"]) == 0
    resumed = torch.load(run / "model.pt")
    for name, value in final.items():
        assert torch.equal(resumed[name], value), name


def test_the_dry_run_says_the_zeros_are_kept(pruned_init, capsys):
    assert main(["train", *RUN, "--phases", "2,1", "--first-phase", "sparse", "--init",
                 str(pruned_init), "--masks", "zeros", "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "plan 2,1 epochs from sparse, masks from the --init model's exact zeros" in printed
    assert "out.weight       10x8   80       40 (its zeros, kept)" in printed


@pytest.mark.parametrize("args, message", [
    (["--masks", "zeros", "--first-phase", "sparse"],
     "--masks zeros keeps the exact zeros of an --init model, and a random initialisation has "
     "none: give --init FILE"),
    (["--masks", "zeros", "--init", "INIT"],
     "--masks zeros needs --first-phase sparse: a dense phase before it fills the model's zeros "
     "in"),
    (["--masks", "zeros", "--init", "INIT", "--first-phase", "sparse", "--phases", "1,1,1"],
     "--phases 1,1,1 from sparse has a sparse phase after a dense one, which fills the zeros "
     "in; masks zeros takes one phase (S) or two (S-D)"),
    (["--masks", "zeros", "--init", "INIT", "--first-phase", "sparse", "--sparsity", "0.7"],
     "--sparsity 0.7 contradicts masks zeros, which keeps the --init model's own sparsity; "
     "leave it out"),
    (["--masks", "zeros", "--init", "INIT", "--first-phase", "sparse", "--pattern", "2:4"],
     "--pattern 2:4 contradicts masks zeros"),
    (["--masks", "zeros", "--init", "DENSE", "--first-phase", "sparse", "--phases", "1"],
     "--masks zeros: DENSE: no exact zeros found in the prunable tensors: hidden.0.weight, "
     "out.weight; to prune, use a sparsity (masks='magnitude')"),
])
def test_refusals_are_one_line_before_the_run_directory(pruned_init, tmp_path, args, message,
                                                        capsys):
    dense = pruned_init.parent / "dense.pt"
    args = [str(pruned_init) if a == "INIT" else str(dense) if a == "DENSE" else a
            for a in args]
    message = message.replace("DENSE", str(dense))
    assert main(["train", *RUN, *args, "--out", str(tmp_path / "run")]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and message in error
    assert not (tmp_path / "run").exists()
