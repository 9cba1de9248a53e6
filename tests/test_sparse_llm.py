"""The Llama model factory (dsd.integrations.llama) and `--init` from Hugging Face checkpoints:
logits of the text task's shape, save_pretrained directories (one file or sharded) and
.safetensors files loaded exactly with the tied output layer, mismatches refused in one line,
a `dsd train` run of the model on text from such a checkpoint, and its model.pt written back
as a Hugging Face checkpoint."""

import importlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

from dsd.config import RunConfig
from dsd.data import load_task
from dsd.integrations.llama import LlamaLogits, main, tiny_llama, to_causal_lm
from dsd.models import model_from_factory
from dsd.train import RunError, train
from dsd.train.init_file import load_init, read_init

SMALL = {"hidden_size": 16, "intermediate_size": 32, "num_layers": 2, "num_heads": 2}
TEXT = "the quick brown fox jumps over the lazy dog. " * 40
VOCAB = len(set(TEXT))


def _model(seed: int, **sizes) -> LlamaLogits:
    torch.manual_seed(seed)
    return tiny_llama(VOCAB, **{**SMALL, **sizes})


def _saved(model: LlamaLogits, directory, **kwargs):
    to_causal_lm(model.state_dict(), model.config).save_pretrained(directory, **kwargs)
    return directory


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_the_factory_gives_logits_per_character_with_llamas_state_dict():
    model = _model(0)
    assert model(torch.randint(VOCAB, (3, 7))).shape == (3, 7, VOCAB)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    plain = transformers.LlamaForCausalLM(model.config)
    assert model.state_dict().keys() == plain.state_dict().keys()
    embedded = tiny_llama(**SMALL).config.vocab_size  # the text task's own corpus
    assert embedded == load_task("text").num_classes
    with pytest.raises(ValueError, match="hidden_size 16 is not a multiple of num_heads 3"):
        tiny_llama(VOCAB, **{**SMALL, "num_heads": 3})


@pytest.mark.parametrize("where", ["directory", "safetensors file", "sharded directory"])
def test_init_from_a_hugging_face_checkpoint_loads_exactly_with_the_tied_output(tmp_path,
                                                                               where):
    source = _model(0)
    shards = {"max_shard_size": "20KB"} if where == "sharded directory" else {}
    directory = _saved(source, tmp_path / "hf", **shards)
    assert (directory / "model.safetensors.index.json").is_file() == bool(shards)
    path = directory / "model.safetensors" if where == "safetensors file" else directory
    init = read_init(str(path))
    assert "lm_head.weight" not in init.state  # safetensors keeps one copy of tied tensors
    target = _model(1)
    assert not _same(source, target)
    load_init(target, init.state, str(path))
    assert _same(source, target)
    assert target.lm_head.weight is target.model.embed_tokens.weight


def test_a_mismatching_hugging_face_checkpoint_is_refused_in_one_line(tmp_path):
    directory = _saved(_model(0, hidden_size=24), tmp_path / "wider")
    target = _model(1)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(RunError) as refused:
        load_init(target, read_init(str(directory)).state, str(directory))
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith(f"init file {directory} does not fit the model: shapes differ: "
                              f"model.embed_tokens.weight is ({VOCAB}, 24) there, ({VOCAB}, 16) "
                              "in the model, ")
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())


def test_different_tensors_under_tied_names_are_refused(tmp_path):
    untied = _model(0, tie_word_embeddings=False)
    path = tmp_path / "untied.safetensors"
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in untied.state_dict().items()}, path)
    with pytest.raises(RunError, match=r"holds different tensors under "
                                       r"model\.embed_tokens\.weight and lm_head\.weight, which "
                                       r"the model ties \(one parameter\)$"):
        load_init(_model(1), read_init(str(path)).state, str(path))


def test_a_directory_without_a_checkpoint_is_refused(tmp_path):
    with pytest.raises(RunError, match="is a directory without a Hugging Face checkpoint"):
        read_init(str(tmp_path))


def test_dsd_train_fine_tunes_it_from_a_checkpoint_and_writes_it_back(tmp_path):
    (tmp_path / "text.txt").write_text(TEXT)
    pretrained = _saved(_model(3), tmp_path / "hf")
    config = RunConfig.from_mapping({
        "task": "text", "data": str(tmp_path / "text.txt"), "seq_len": 16,
        "model": "dsd.integrations.llama:from_pretrained_config",
        "model_args": {"path": str(pretrained)}, "init": str(pretrained),
        "phases": [1, 1], "first_phase": "sparse", "backend": "torch", "baseline": False})
    run = tmp_path / "run"
    train(config, run, quiet=True)
    weights = torch.load(run / "model.pt", weights_only=True)
    main([str(run / "model.pt"), str(pretrained), str(tmp_path / "back")])
    back = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "back")
    assert back.config.architectures == ["LlamaForCausalLM"]
    assert all(torch.equal(weights[k], v) for k, v in back.state_dict().items())
    assert not torch.equal(weights["model.layers.0.mlp.up_proj.weight"],
                           read_init(str(pretrained)).state["model.layers.0.mlp.up_proj.weight"])


def test_missing_packages_are_named_in_one_line(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if not installed
    monkeypatch.delitem(sys.modules, "dsd.integrations.llama")  # imported anew
    with pytest.raises(ImportError, match=r"^dsd\.integrations\.llama needs transformers, which "
                                          r"is not installed; install it with: pip install "
                                          r"'dsd\[transformers\]'$"):
        importlib.import_module("dsd.integrations.llama")
    monkeypatch.setitem(sys.modules, "safetensors", None)
    with pytest.raises(RunError, match=r"reading it needs the safetensors package: pip install "
                                       r"safetensors$"):
        read_init(str(tmp_path / "model.safetensors"))


def test_a_checkpoint_of_another_architecture_is_refused_by_the_factory(tmp_path):
    transformers.BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=32).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"\(\*\*\{'path': '.*'\}\) failed: ValueError: .* "
                                         r"holds a BertConfig, not a LlamaConfig$"):
        model_from_factory("dsd.integrations.llama:from_pretrained_config",
                           {"path": str(tmp_path)})


def test_fsdp2_units_are_the_decoder_layers_and_the_tied_output_stays_with_the_root():
    from dsd.world import shard_units

    model = _model(0)
    assert shard_units(model) == list(model.model.layers)


@pytest.mark.slow  # torchrun, twice per case
@pytest.mark.parametrize("args", [[], ["--pattern", "2:4", "--dense-steps", "5"]])
def test_the_example_prunes_fine_tunes_sharded_resumes_and_keeps_every_zero(tmp_path, args):
    example = Path(__file__).resolve().parents[1] / "examples" / "sparse_llm.py"
    done = subprocess.run([sys.executable, str(example), "--out", str(tmp_path), *args],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "(its workers killed after 1 epoch(s), as a crash would)" in done.stdout
    assert "every zero kept in 14 tensors" in done.stdout
