"""bench/bench_optim.py cannot rot: a tiny run times every optimizer's masked step against its
unmasked step and the hooks, its rows carry the goals bench/_goals.py judges, and the hooks it
compares with mask as dsd does."""

import json
import sys
from pathlib import Path

import pytest
import torch

import dsd_kernels as dk
from dsd_kernels.optim import make_masked_

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import bench_optim  # noqa: E402

from _goals import judge  # noqa: E402


def test_a_tiny_run_times_every_optimizer_and_judges_the_goals(tmp_path, torch_backend):
    out = tmp_path / "optim.json"
    bench_optim.main(["--backend", "torch", "--sizes", "1e3", "--min-time", "0.002",
                      "--out", str(out)])
    rows = json.loads(out.read_text())
    assert {"Adam(amsgrad)", "Lion"} <= set(bench_optim.OPTIMIZERS)  # Lion: a test dependency
    for name in bench_optim.OPTIMIZERS:
        mine = {r["impl"]: r for r in rows if r["optimizer"] == name}
        dsd = mine[f"dsd Masked{name}"]
        fused = name in ("AdamW", "SGD", "Adam")
        assert dsd["path"] == ("fused" if fused else "general")
        how = "fused" if fused else "foreach"
        expected = "lion_pytorch Lion" if name == "Lion" else f"torch {name} {how}"
        assert dsd["baseline"] == f"{expected} (no mask)" and dsd["baseline"] in mine
        assert dsd["goal"] == f"<= {1.1 if fused else 1.3}" and dsd["status"] in ("pass", "fail")
        assert dsd["x_unmasked"] > 0 and dsd["state_tensors"] >= 1
        hooks = [r for impl, r in mine.items() if impl.startswith("hook")]
        assert len(hooks) == 1 and hooks[0]["x_dsd"] > 0
    goals = {g["goal"]: g for g in judge({"optim.json": rows}, 1000)}
    for goal in ("masked fused steps / torch's fused unmasked step",
                 "masked general steps / the optimizer's foreach unmasked step"):
        assert goals[goal]["status"] in ("pass", "fail")
    with pytest.raises(SystemExit) as exit_:
        bench_optim.main(["--optimizers", "RMSprop,Lamb"])
    assert exit_.value.code == 2


@pytest.mark.parametrize("name", ["RMSprop", "Adamax"])
def test_the_hooks_leave_the_weights_dsd_leaves(name, torch_backend):
    cls, hyper = bench_optim.OPTIMIZERS[name]
    weights = [torch.randn(6, 5), torch.randn(7)]
    masks = dk.magnitude_masks(weights, 0.5, "layer")
    grads = [torch.randn_like(w) for w in weights]
    hooked = bench_optim._params(weights, [g.clone() for g in grads])
    opt = cls(hooked, **hyper, foreach=True)
    bench_optim._hook_masking(opt, hooked, masks)
    masked = bench_optim._params(weights, [g.clone() for g in grads])
    dsd = make_masked_(cls(masked, **hyper, foreach=True))
    dsd.set_masks(dict(zip(masked, masks)))
    for _ in range(3):
        opt.step()
        dsd.step()
    for a, b, m in zip(hooked, masked, masks):
        assert torch.equal(a, b)
        assert not a[~m].any()
