"""A Llama-shaped decoder-only transformer from `transformers` (random init, nothing
downloaded) that `dsd train` trains as a model factory on the text task:

    # pip install 'dsd[transformers]'
    dsd train --task text --model dsd.integrations.llama:tiny_llama
    dsd train --task text --model dsd.integrations.llama:from_pretrained_config \\
        --model-args '{"path": "pruned"}' --init pruned       # a save_pretrained directory

Its state_dict keys are those of `transformers.LlamaForCausalLM`, so a run's model.pt loads
into one and `save_pretrained` writes it as a plain Hugging Face checkpoint:

    python -m dsd.integrations.llama RUN/model.pt pruned finetuned    # weights, config, out

`import dsd` does not import this module.
"""

import argparse
import sys

import torch

try:
    import transformers
except ModuleNotFoundError as error:
    if error.name != "transformers":
        raise  # transformers is there but something it imports is not
    raise ImportError("dsd.integrations.llama needs transformers, which is not installed; "
                      "install it with: pip install 'dsd[transformers]'") from None


class LlamaLogits(transformers.LlamaForCausalLM):
    """`transformers.LlamaForCausalLM` whose forward returns the logits tensor (N, T, vocab)
    itself, the output `dsd train` scores; parameters, state_dict keys and weight tying are
    LlamaForCausalLM's."""

    def forward(self, input_ids, **kwargs):
        return super().forward(input_ids, **kwargs).logits


def tiny_llama(vocab_size: int | None = None, hidden_size: int = 256,
               intermediate_size: int = 688, num_layers: int = 4, num_heads: int = 4,
               max_positions: int = 512, tie_word_embeddings: bool = True) -> LlamaLogits:
    """A randomly initialised Llama (3.2M parameters at the defaults) for character ids.

    Args:
        vocab_size: the number of token ids; None: the vocabulary of the text task's
            embedded corpus (give the task's vocabulary size with --data FILE).
        hidden_size, intermediate_size: the width of the residual stream and of the MLP.
        num_layers, num_heads: decoder layers and attention heads (hidden_size must be a
            multiple of num_heads).
        max_positions: the longest sequence (the text task's seq_len at most).
        tie_word_embeddings: whether the output layer shares the input embedding's weight.

    Raises:
        ValueError: hidden_size is not a multiple of num_heads.
    """
    if vocab_size is None:
        from ..data import load_task
        vocab_size = load_task("text").num_classes
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size {hidden_size} is not a multiple of num_heads {num_heads}")
    config = transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads,
        num_key_value_heads=num_heads, max_position_embeddings=max_positions,
        tie_word_embeddings=tie_word_embeddings)
    return LlamaLogits(config)


def from_pretrained_config(path: str) -> LlamaLogits:
    """A randomly initialised LlamaLogits of the shape that the config.json of a
    `save_pretrained` directory gives (its weights come with `--init path`).

    Raises:
        ValueError: the directory has no Llama config.json.
    """
    config = transformers.AutoConfig.from_pretrained(path)
    if not isinstance(config, transformers.LlamaConfig):
        raise ValueError(f"{path} holds a {type(config).__name__}, not a LlamaConfig")
    return LlamaLogits(config)


def to_causal_lm(state: dict,
                 config: transformers.LlamaConfig) -> transformers.LlamaForCausalLM:
    """A plain `transformers.LlamaForCausalLM` of `config` holding `state` (a LlamaLogits
    state_dict, e.g. a run's model.pt), ready for `save_pretrained`.

    Raises:
        RuntimeError: `state` does not fit `config` (torch's load_state_dict message).
    """
    model = transformers.LlamaForCausalLM(config)
    model.load_state_dict(state)
    return model


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m dsd.integrations.llama",
        description="Write a dsd run's model.pt as a Hugging Face checkpoint (save_pretrained).")
    parser.add_argument("weights", help="the state_dict, e.g. RUN/model.pt")
    parser.add_argument("config", help="a save_pretrained directory whose config.json it fits")
    parser.add_argument("out", help="the directory to write")
    args = parser.parse_args(argv)
    config = transformers.AutoConfig.from_pretrained(args.config)
    state = torch.load(args.weights, map_location="cpu", weights_only=True)
    try:
        model = to_causal_lm(state, config)
    except RuntimeError as error:
        sys.exit(f"{args.weights} does not fit {args.config}/config.json: "
                 f"{str(error).strip().splitlines()[-1].strip()}")
    model.save_pretrained(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
