"""The embedded models: sizes against the papers, shapes, what fits which data, what DSD prunes
by default, and user factories loaded from "module:callable" specs."""

import itertools
import sys

import pytest
import torch
from torch import nn

from dsd.models import (
    DATA_KINDS,
    MODELS,
    VGG,
    CharLM,
    CifarResNet,
    RNNClassifier,
    build_model,
    default_model,
    is_factory,
    model_from_factory,
    models_for,
)
from dsd.runner import prunable_parameters


def count(model):
    return sum(p.numel() for p in model.parameters())


# Option-A shortcuts: 269,722 / 464,154 / 853,018 parameters, the paper's 0.27M / 0.46M / 0.85M.
@pytest.mark.parametrize("name, params, rounded", [
    ("resnet20", 269_722, 0.27e6), ("resnet32", 464_154, 0.46e6),
    ("resnet56", 853_018, 0.85e6)])
def test_cifar_resnet_sizes_match_the_paper(name, params, rounded):
    model = build_model(name, (3, 32, 32), 10)
    assert isinstance(model, CifarResNet)
    assert count(model) == params
    assert float(f"{count(model):.2g}") == rounded


def test_vgg16_size():
    model = build_model("vgg16", (3, 32, 32), 10)
    assert isinstance(model, VGG)
    # 13 bias-free convolutions (14,710,464), their batch norms (8,448), Linear(512, 10) (5,130)
    assert count(model) == 14_724_042
    assert count(build_model("vgg16", (3, 32, 32), 100)) == 14_724_042 - 5_130 + 51_300


@pytest.mark.parametrize("name", ["resnet20", "resnet32", "resnet56", "vgg16"])
@pytest.mark.parametrize("classes", [10, 100])
def test_cifar_output_shapes(name, classes):
    model = build_model(name, (3, 32, 32), classes).eval()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, classes)


@pytest.mark.parametrize("depth", [20, 32, 56])
def test_resnet_shortcuts_have_no_parameters(depth):
    model = CifarResNet(depth, 10)
    owners = {type(module) for module in model.modules() if list(module.parameters(False))}
    assert owners == {nn.Conv2d, nn.BatchNorm2d, nn.Linear}
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == depth - 1  # the stem and two per block; the classifier makes depth
    assert all(conv.bias is None and conv.kernel_size == (3, 3) for conv in convs)


def test_resnet_downsamples_twice_and_pads_channels():
    model = CifarResNet(20, 10).eval()
    features = model.stages(torch.randn(1, 16, 32, 32))
    assert features.shape == (1, 64, 8, 8)
    block = model.stages[1][0]  # the first block of stage 2: 16 -> 32 channels, stride 2
    x = torch.randn(1, 16, 8, 8)
    with torch.no_grad():
        block.conv2.weight.zero_()  # the residual branch is then zero (eval-mode BN of zeros)
        block.bn2.bias.zero_()
        out = block(x)
    assert out.shape == (1, 32, 4, 4)
    assert torch.equal(out[:, :16], torch.relu(x[:, :, ::2, ::2]))
    assert torch.equal(out[:, 16:], torch.zeros(1, 16, 4, 4))


def test_resnet_depth_must_be_6n_plus_2():
    with pytest.raises(ValueError, match="depth 21 is not 6n\\+2"):
        CifarResNet(21, 10)
    assert count(CifarResNet(44, 10)) > count(CifarResNet(32, 10))


def test_other_sizes_and_channels():
    assert build_model("vgg16", (1, 64, 96), 7).eval()(torch.randn(2, 1, 64, 96)).shape == (2, 7)
    resnet = build_model("resnet20", (1, 9, 13), 5)
    assert resnet.stem.in_channels == 1
    assert resnet.eval()(torch.randn(2, 1, 9, 13)).shape == (2, 5)


def test_cnn_takes_channels():
    cnn = build_model("cnn", (3, 16, 12), 10, cnn_channels=(4, 8))
    assert cnn.convs[0].in_channels == 3 and isinstance(cnn.convs[0], nn.Conv2d)
    assert cnn(torch.randn(2, 3, 16, 12)).shape == (2, 10)
    assert cnn.out.in_features == 8 * 4 * 3
    grayscale = build_model("cnn", (8, 8), 10, cnn_channels=(4,))
    assert grayscale.convs[0].in_channels == 1 and grayscale(torch.randn(2, 8, 8)).shape == (2, 10)
    signal = build_model("cnn", (40,), 10, cnn_channels=(4,))
    assert isinstance(signal.convs[0], nn.Conv1d) and signal(torch.randn(2, 40)).shape == (2, 10)


@pytest.mark.parametrize("cell, rnn", [("gru", nn.GRU), ("lstm", nn.LSTM)])
def test_char_lm(cell, rnn):
    model = build_model(cell, (20,), 30, kind="text", rnn_hidden=16, rnn_layers=2, dropout=0.25)
    assert isinstance(model, CharLM) and isinstance(model.rnn, rnn)
    assert model.rnn.num_layers == 2 and model.rnn.dropout == 0.25 and model.rnn.batch_first
    assert model.embed.num_embeddings == 30 and model.out.out_features == 30
    logits = model(torch.randint(0, 30, (4, 20)))
    assert logits.shape == (4, 20, 30)
    single = CharLM(cell, 30, 16)
    assert single.rnn.num_layers == 1 and single.rnn.dropout == 0.0


def test_rnn_classifier_layers():
    model = build_model("gru", (8, 8), 10, rnn_hidden=12, rnn_layers=3)
    assert isinstance(model, RNNClassifier)
    assert model.rnn.num_layers == 3 and model.rnn.input_size == 8
    assert model(torch.randn(2, 8, 8)).shape == (2, 10)
    signal = build_model("lstm", (40,), 10, rnn_hidden=12)
    assert signal.rnn.input_size == 1 and signal(torch.randn(2, 40)).shape == (2, 10)
    assert set(signal.state_dict()) == set(RNNClassifier("lstm", 1, 10, 12).state_dict())


@pytest.mark.parametrize("name", ["resnet20", "vgg16"])
def test_default_pruning_takes_conv_and_linear_weights_only(name):
    model = build_model(name, (3, 32, 32), 10)
    expected = {f"{module_name}.weight" for module_name, module in model.named_modules()
                if isinstance(module, (nn.Conv2d, nn.Linear))}
    chosen = {param_name for param_name, _ in prunable_parameters(model)}
    assert chosen == expected
    norms = {f"{module_name}.{p}" for module_name, module in model.named_modules()
             if isinstance(module, nn.BatchNorm2d) for p in ("weight", "bias")}
    assert norms and not chosen & norms
    assert not any(param_name.endswith("bias") for param_name in chosen)


def test_default_pruning_of_char_lm():
    model = build_model("lstm", (20,), 30, kind="text", rnn_hidden=16, rnn_layers=2)
    chosen = [param_name for param_name, _ in prunable_parameters(model)]
    assert chosen == ["embed.weight", "rnn.weight_ih_l0", "rnn.weight_hh_l0",
                      "rnn.weight_ih_l1", "rnn.weight_hh_l1", "out.weight"]


def test_what_fits_what():
    assert MODELS[0] == "auto" and DATA_KINDS == ("signal", "image", "text")
    assert models_for("signal", (40,)) == ("mlp", "cnn", "gru", "lstm")
    assert models_for("image", (8, 8)) == ("mlp", "cnn", "gru", "lstm")
    assert models_for("image", (3, 32, 32)) == ("mlp", "cnn", "resnet20", "resnet32",
                                                "resnet56", "vgg16")
    assert models_for("image", (1, 64, 96)) == models_for("image", (3, 32, 32))
    assert models_for("image", (3, 28, 28)) == ("mlp", "cnn", "resnet20", "resnet32", "resnet56")
    assert models_for("image", (3, 48, 48)) == models_for("image", (3, 28, 28))
    assert models_for("image", (3, 4, 4)) == ("mlp", "cnn")
    assert models_for("text", (64,)) == ("gru", "lstm")
    assert default_model("signal", (40,)) == "mlp"
    assert default_model("image", (8, 8)) == "mlp"
    assert default_model("image", (3, 32, 32)) == "resnet20"
    assert default_model("image", (3, 4, 4)) == "mlp"  # too small for resnet20
    assert default_model("text", (64,)) == "lstm"


def test_auto():
    assert isinstance(build_model("auto", (3, 32, 32), 10), CifarResNet)
    assert isinstance(build_model("auto", (64,), 30, kind="text", rnn_hidden=8), CharLM)
    assert build_model("auto", (40,), 10, mlp_hidden=[8]).hidden[0].in_features == 40


@pytest.mark.parametrize("name, shape, kind, message", [
    ("resnet20", (40,), None, "model 'resnet20' does not fit 1-D signals of length 40; for this "
                              "task choose one of mlp, cnn, gru, lstm"),
    ("mlp", (64,), "text", "model 'mlp' does not fit text in sequences of 64 characters; for "
                           "this task choose one of gru, lstm"),
    ("cnn", (64,), "text", "choose one of gru, lstm"),
    ("vgg16", (3, 28, 28), None, "model 'vgg16' does not fit 3-channel 28x28 images; for this "
                                 "task choose one of mlp, cnn, resnet20, resnet32, resnet56"),
    ("vgg16", (28, 28), None, "model 'vgg16' does not fit 28x28 grayscale images; for this task "
                              "choose one of mlp, cnn, gru, lstm"),
    ("lstm", (3, 32, 32), "image", "choose one of mlp, cnn, resnet20, resnet32, resnet56, vgg16"),
])
def test_models_that_do_not_fit(name, shape, kind, message):
    with pytest.raises(ValueError) as error:
        build_model(name, shape, 10, kind=kind)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_bad_names_kinds_and_shapes():
    with pytest.raises(ValueError, match="unknown model 'resnet18'; choose one of auto, mlp"):
        build_model("resnet18", (3, 32, 32), 10)
    with pytest.raises(ValueError, match="unknown data kind 'audio'; choose one of signal"):
        models_for("audio", (40,))
    with pytest.raises(ValueError, match=r"shape \(8, 8\) does not fit text"):
        build_model("lstm", (8, 8), 10, kind="text")
    with pytest.raises(ValueError, match=r"shape \(1, 2, 3, 4\) does not fit image"):
        default_model("image", (1, 2, 3, 4))


# Factories: each test writes its own module under a unique name into tmp_path (the working
# directory) and drops it from sys.modules afterwards.

FACTORY_MODULE = '''
from torch import nn

def build(width=4, classes=3):
    return nn.Sequential(nn.Linear(width, classes))

class Nets:
    @staticmethod
    def tiny(width):
        return nn.Linear(width, 2)
    answer = 42

def number():
    return 7

def broken():
    raise RuntimeError("factory blew up\\nsecond line")
'''


_module_ids = itertools.count()


@pytest.fixture
def factory_module(tmp_path, monkeypatch):
    """A writer of factory modules into the working directory, each under a new name."""
    monkeypatch.chdir(tmp_path)
    path_before, written = list(sys.path), []

    def write(source=FACTORY_MODULE):
        name = f"dsd_test_nets_{next(_module_ids)}"
        (tmp_path / f"{name}.py").write_text(source)
        written.append(name)
        return name

    yield write
    for name in written:
        sys.modules.pop(name, None)
    assert sys.path == path_before


def test_is_factory():
    assert is_factory("torchvision.models:resnet18") and is_factory("m:Class.build")
    assert is_factory(":f")  # malformed, but a factory spec: model_from_factory explains
    assert not any(is_factory(name) for name in MODELS)


def test_factory_with_kwargs(factory_module, tmp_path):
    name = factory_module()
    path_before = list(sys.path)
    model = model_from_factory(f"{name}:build", {"width": 5, "classes": 2})
    assert sys.path == path_before and str(tmp_path) not in sys.path
    assert isinstance(model, nn.Sequential) and model[0].weight.shape == (2, 5)
    assert model_from_factory(f"{name}:build")[0].weight.shape == (3, 4)
    assert model_from_factory(f"{name}:Nets.tiny", {"width": 6}).in_features == 6


def test_factory_from_an_installed_package():
    assert isinstance(model_from_factory("torch.nn:Linear", {"in_features": 2,
                                                             "out_features": 1}), nn.Linear)


@pytest.mark.parametrize("spec", ["mynets", "mynets:", ":build", "my nets:build", "m:a..b",
                                  "m:a:b", ".m:f"])
def test_malformed_factory_specs(spec):
    with pytest.raises(ValueError, match=f"model factory {spec!r} is malformed; write it as "
                                         "'package.module:callable'"):
        model_from_factory(spec)


def test_factory_module_missing(factory_module):
    path_before = list(sys.path)
    with pytest.raises(ValueError) as error:
        model_from_factory("dsd_test_nets_absent:build")
    assert str(error.value) == ("model factory 'dsd_test_nets_absent:build': cannot import "
                                "'dsd_test_nets_absent': ModuleNotFoundError: No module named "
                                "'dsd_test_nets_absent'")
    assert sys.path == path_before


def test_factory_module_that_raises_on_import(factory_module):
    name = factory_module("raise RuntimeError('needs a GPU\\nmore detail')\n")
    path_before = list(sys.path)
    with pytest.raises(ValueError) as error:
        model_from_factory(f"{name}:build")
    assert str(error.value) == (f"model factory '{name}:build': cannot import '{name}': "
                                f"RuntimeError: needs a GPU")
    assert sys.path == path_before


def test_factory_module_with_a_syntax_error(factory_module):
    name = factory_module("def build(:\n")
    with pytest.raises(ValueError, match=f"cannot import '{name}': SyntaxError: "):
        model_from_factory(f"{name}:build")


def test_factory_attribute_missing(factory_module):
    name = factory_module()
    with pytest.raises(ValueError) as error:
        model_from_factory(f"{name}:biuld")
    assert str(error.value) == (f"model factory '{name}:biuld': module '{name}' has no "
                                f"attribute 'biuld'")
    with pytest.raises(ValueError, match=f"{name}:Nets has no attribute 'huge'"):
        model_from_factory(f"{name}:Nets.huge")


def test_factory_not_callable(factory_module):
    name = factory_module()
    with pytest.raises(ValueError, match=f"model factory '{name}:Nets.answer': "
                                         f"{name}:Nets.answer is int, not callable"):
        model_from_factory(f"{name}:Nets.answer")


def test_factory_call_fails(factory_module):
    name = factory_module()
    with pytest.raises(ValueError) as error:
        model_from_factory(f"{name}:build", {"depth": 3})
    assert str(error.value) == (f"model factory {name}:build(**{{'depth': 3}}) failed: "
                                f"TypeError: build() got an unexpected keyword argument 'depth'")
    assert isinstance(error.value.__cause__, TypeError)
    with pytest.raises(ValueError) as error:
        model_from_factory(f"{name}:broken")
    assert str(error.value) == (f"model factory {name}:broken(**{{}}) failed: RuntimeError: "
                                f"factory blew up")


def test_factory_returns_no_module(factory_module):
    name = factory_module()
    with pytest.raises(ValueError) as error:
        model_from_factory(f"{name}:number")
    assert str(error.value) == f"model factory {name}:number returned int, not a torch.nn.Module"
