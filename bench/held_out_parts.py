"""Where a model's held-out loss goes: the tokens the training split uses, and those it never does.

    python bench/held_out_parts.py [MODEL ...]   (default: assets)

The held-out split is the trainer's (the last 10% of the shipped Tiny Shakespeare, or --data), scored in
non-overlapping windows of the model's context, as the trainer scores it. For each model it prints the mean
loss, the mean loss of held-out tokens the training split uses and of those it never uses, the share of
the mean those unused tokens make, and the probability the model gives all unused tokens together.
"""

from __future__ import annotations

import argparse

import torch

from model import GPT
from train.config import TrainConfig
from train.data import load_tokens, split_held_out


@torch.inference_mode()
def parts(model: GPT, held_out: torch.Tensor, used: torch.Tensor) -> dict[str, float]:
    block, losses, targets, unused_mass = model.config.block_size, [], [], []
    for start in range(0, len(held_out) - block, block):
        window = held_out[start : start + block + 1]
        log_probs = model(window[None, :-1])[0][0].float().log_softmax(-1)
        losses.append(-log_probs.gather(-1, window[1:, None])[:, 0])
        targets.append(window[1:])
        unused_mass.append(log_probs[:, ~used].exp().sum(-1))
    loss, target = torch.cat(losses), torch.cat(targets)
    unused = ~used[target]
    return {
        "mean": float(loss.mean()),
        "used": float(loss[~unused].mean()),
        "unused": float(loss[unused].mean()),
        "unused share": float(loss[unused].sum() / len(loss)),
        "unused tokens": int(unused.sum()),
        "mass on unused": float(torch.cat(unused_mass).mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", default=["assets"])
    parser.add_argument("--data", default="", help="the training text (default: the trainer's)")
    args = parser.parse_args()
    config = TrainConfig(data=args.data)
    train_split, held_out = split_held_out(load_tokens(config.data, config.cache_dir), config.val_fraction)
    held_out = torch.from_numpy(held_out.astype("int64"))
    for source in args.models:
        model = GPT.from_pretrained(source).eval()
        used = torch.zeros(model.config.vocab_size, dtype=torch.bool)
        used[torch.from_numpy(train_split.astype("int64"))] = True
        p = parts(model, held_out, used)
        print(
            f"{source}: held-out {p['mean']:.4f} = used tokens {p['used']:.3f} nats each, plus "
            f"{p['unused tokens']} of {len(held_out) - 1} tokens the training split never uses at "
            f"{p['unused']:.2f} nats each ({p['unused share']:.3f} of the mean); "
            f"{int(used.sum())} of {len(used)} tokens used; mass on the unused {p['mass on unused']:.2%}"
        )


if __name__ == "__main__":
    main()
