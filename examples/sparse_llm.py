"""A pruned Llama fine-tuned with its zeros kept, sharded over two processes: a small Llama
built from a `transformers` config (random init, nothing downloaded) trains densely on a slice
of the embedded text, is pruned (50% per layer by magnitude, or 2:4 with --pattern 2:4) and
saved as a plain Hugging Face checkpoint; then `dsd train --masks zeros --shard` fine-tunes it
under torchrun with FSDP2, is killed after its first epoch, resumes, and is written back as a
Hugging Face checkpoint whose zeros are exactly those of the pruned one.

    python examples/sparse_llm.py                   # OUT defaults to a temporary directory
    python examples/sparse_llm.py --pattern 2:4 --out llm

Each step prints its name and, for the commands, what it runs; a failing step stops the
script saying which one failed.
"""

import argparse
import fnmatch
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file

import dsd_kernels as dk
from dsd.data import load_task
from dsd.integrations.llama import tiny_llama, to_causal_lm

SIZES = {"hidden_size": 128, "intermediate_size": 352, "num_layers": 2, "num_heads": 4}
SEQ_LEN = 64
TEXT_CHARACTERS = 40_000  # the slice of the embedded corpus trained on, to stay in seconds
PRUNED = "model.layers.*_proj.weight"  # the decoder layers' Linear weights, as SparseGPT/Wanda


class StepFailed(RuntimeError):
    pass


def step(name: str):
    print(f"\n== {name}", flush=True)
    return name


def run(name: str, command: list[str], kill_after_epochs: int = 0, run_dir: Path | None = None):
    """Run `command`; with kill_after_epochs, SIGKILL its child processes (torchrun's workers)
    once the run's metrics.jsonl records that many epochs: a crash somewhere in the next."""
    print("$ " + " ".join(command), flush=True)
    process = subprocess.Popen(command)
    while kill_after_epochs and process.poll() is None:
        if _epochs_done(run_dir) >= kill_after_epochs:
            for child in _children(process.pid):
                os.kill(child, signal.SIGKILL)
            process.wait()
            print(f"(its workers killed after {kill_after_epochs} epoch(s), as a crash would)")
            return
        time.sleep(0.2)
    if process.wait() != 0:
        raise StepFailed(f"step {name!r} failed: exit code {process.returncode} of "
                         f"{' '.join(command)}")
    if kill_after_epochs:
        raise StepFailed(f"step {name!r} finished before the kill after {kill_after_epochs} "
                         "epoch(s): nothing to resume")


def _children(pid: int) -> list[int]:
    """The process ids whose parent is `pid` (Linux's /proc)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # the process ended meanwhile
        if parent == pid:
            children.append(int(stat.parent.name))
    return children


def _epochs_done(run_dir: Path) -> int:
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        return 0
    return sum(1 for line in metrics.read_text().splitlines() if '"epoch"' in line)


def bits_per_character(model, x, y) -> float:
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
    return loss.item() / math.log(2)


def train_densely(model, data, steps: int) -> None:
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        batch = torch.randint(len(data.x_train), (16,), generator=gen)
        optimizer.zero_grad()
        logits = model(data.x_train[batch])
        torch.nn.functional.cross_entropy(logits.flatten(0, 1),
                                          data.y_train[batch].flatten()).backward()
        optimizer.step()


def prune(model, pattern: str) -> dict[str, float]:
    """Zero the smaller weights of every decoder Linear: 50% per tensor by magnitude, or the
    2 smaller of every 4 along the input dimension; returns the sparsity per tensor."""
    named = [(n, p) for n, p in model.named_parameters() if fnmatch.fnmatchcase(n, PRUNED)]
    weights = [p.detach() for _, p in named]
    masks = (dk.nm_masks(weights, pattern) if pattern else dk.magnitude_masks(weights, 0.5))
    with torch.no_grad():
        for weight, mask in zip(weights, masks):
            weight.mul_(mask)
    return {n: (p == 0).float().mean().item() for n, p in named}


def zero_positions(state: dict) -> dict[str, torch.Tensor]:
    return {k: v == 0 for k, v in state.items() if fnmatch.fnmatchcase(k, PRUNED)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="working directory (default: a temporary one)")
    parser.add_argument("--pattern", choices=["", "2:4"], default="",
                        help="2:4: prune to the N:M pattern instead of 50%% by magnitude")
    parser.add_argument("--dense-steps", type=int, default=60)
    parser.add_argument("--processes", type=int, default=2)
    args = parser.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="sparse_llm-"))
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    try:
        name = step("1. the text and a small Llama")
        from pydoc_data.topics import topics
        text = out / "text.txt"
        text.write_text("".join(topics[k] for k in sorted(topics))[:TEXT_CHARACTERS])
        data = load_task("text", data=str(text), seq_len=SEQ_LEN)
        model_args = {"vocab_size": data.num_classes, **SIZES, "max_positions": SEQ_LEN}
        model = tiny_llama(**model_args)
        print(f"{sum(p.numel() for p in model.parameters()):,} parameters, vocabulary "
              f"{data.num_classes}, {len(data.x_train)} training sequences of {SEQ_LEN}")

        name = step(f"2. dense training, {args.dense_steps} steps")
        began = time.perf_counter()
        train_densely(model, data, args.dense_steps)
        bits = bits_per_character(model, data.x_val, data.y_val)
        print(f"validation bits per character {bits:.3f} ({time.perf_counter() - began:.0f} s)")

        name = step("3. prune " + (f"to {args.pattern}" if args.pattern else "50% per layer"))
        sparsity = prune(model, args.pattern)
        print(f"{len(sparsity)} tensors at {min(sparsity.values()):.1%} to "
              f"{max(sparsity.values()):.1%} zeros; validation bits per character "
              f"{bits_per_character(model, data.x_val, data.y_val):.3f}")
        pruned = out / "pruned"
        to_causal_lm(model.state_dict(), model.config).save_pretrained(pruned)
        print(f"saved {pruned} (save_pretrained)")

        name = step(f"4. fine-tune with its zeros kept, FSDP2 over {args.processes} "
                    "processes, killed after epoch 1")
        run_dir = out / "run"
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                    f"--nproc_per_node={args.processes}", "-m", "dsd.cli", "train"]
        run(name, torchrun + [
            "--task", "text", "--data", str(text), "--seq-len", str(SEQ_LEN),
            "--model", "dsd.integrations.llama:from_pretrained_config",
            "--model-args", json.dumps({"path": str(pruned)}), "--init", str(pruned),
            "--masks", "zeros", "--first-phase", "sparse", "--phases", "2",
            "--no-baseline", "--shard", "--quiet", "--out", str(run_dir)],
            kill_after_epochs=1, run_dir=run_dir)

        name = step("5. resume the killed run")
        run(name, torchrun + ["--resume", str(run_dir), "--quiet"])

        name = step("6. write it back as a Hugging Face checkpoint")
        finetuned = out / "finetuned"
        run(name, [sys.executable, "-m", "dsd.integrations.llama", str(run_dir / "model.pt"),
                   str(pruned), str(finetuned)])

        name = step("7. check: the zeros are exactly the pruned checkpoint's")
        before = load_file(pruned / "model.safetensors")
        after = load_file(finetuned / "model.safetensors")
        moved = [k for k, zero in zero_positions(before).items()
                 if not torch.equal(zero, after[k] == 0)]
        if moved:
            raise StepFailed(f"step {name!r} failed: the zeros moved in {', '.join(moved)}")
        if all(torch.equal(before[k], after[k]) for k in before):
            raise StepFailed(f"step {name!r} failed: fine-tuning changed no weight")
        back = transformers.LlamaForCausalLM.from_pretrained(finetuned)
        bits = bits_per_character(lambda x: back(x).logits, data.x_val, data.y_val)
        print(f"every zero kept in {len(zero_positions(before))} tensors; "
              f"validation bits per character {bits:.3f}; {finetuned} loads with "
              "transformers.LlamaForCausalLM.from_pretrained")
    except StepFailed as failure:
        sys.exit(str(failure))
    except Exception as error:
        sys.exit(f"step {name!r} failed: {type(error).__name__}: {error}")


if __name__ == "__main__":
    main()
