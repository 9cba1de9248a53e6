"""What torch.compile does with dsd_kernels (docs/kernels.md, torch.compile): the raw ops trace
into one graph; the public functions and the optimizers' step validate on the host (NaN
checks, step counts) and so run as graph breaks inside a compiled function, with the same
results as eager."""

import pytest
import torch

import dsd_kernels as dk


def _weights():
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(64, 9, generator=gen), torch.randn(33, generator=gen)]


def test_raw_ops_compile_into_one_graph():
    xs = _weights()
    ks = [(64 * 9 + 33) // 2]
    masks = torch.compile(lambda ts: torch.ops.dsd.magnitude_masks(ts, ks, "global"),
                          fullgraph=True)(xs)
    assert all(torch.equal(a, b) for a, b in zip(masks, dk.magnitude_masks(xs, 0.5, "global")))


@pytest.mark.slow  # two torch.compile runs with graph breaks
def test_public_functions_are_graph_breaks_not_one_graph():
    xs = _weights()
    masks = torch.compile(lambda ts: dk.magnitude_masks(ts, 0.3))(xs)
    assert all(torch.equal(a, b) for a, b in zip(masks, dk.magnitude_masks(xs, 0.3)))
    with pytest.raises(Exception, match="data-dependent"):  # the NaN check reads the data
        torch.compile(lambda ts: dk.magnitude_masks(ts, 0.3), fullgraph=True)(xs)


@pytest.mark.slow  # compiles a model, its backward and the optimizer step
def test_a_compiled_training_step_matches_eager():
    results = []
    for compiled in (False, True):
        torch.manual_seed(1)
        model = torch.nn.Linear(9, 4)
        opt = dk.MaskedAdamW(model.parameters(), lr=0.01)
        opt.set_masks({model.weight: model.weight.detach().abs() > 0.1})

        def train_step(x):
            loss = model(x).square().mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            return loss

        step = torch.compile(train_step) if compiled else train_step
        for i in range(3):
            step(torch.randn(8, 9, generator=torch.Generator().manual_seed(i)))
        results.append([p.detach().clone() for p in model.parameters()])
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-7)
