"""Per-step weight averaging (an EMA of the weights), scored beside the weights it averages, in one run.

    python bench/weight_averaging.py [--decays 0.8,0.9,0.95] -- TRAIN_FLAGS

TRAIN_FLAGS are train/train.py's. The real trainer runs them, and an exponential moving average of the
weights at each decay is updated after every optimizer step (torch.optim.swa_utils). The run folder gets
what train/train.py leaves in it. At the end, the run's last weights and each average are scored on the
held-out split the trainer scores, and each average is saved as OUT_DIR/ema-DECAY (a model folder that
GPT.from_pretrained and app.py load). The averages are scored only at the end, so the run's minutes stay
its own.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's packages, not an installed copy

from model.saving import save_folder  # noqa: E402
from train import outputs, publish  # noqa: E402
from train.config import parse_config  # noqa: E402
from train.machine import setup_machine  # noqa: E402
from train.trainer import Trainer  # noqa: E402


class AveragingTrainer(Trainer):
    """The trainer, with an EMA of the weights per decay, updated after every optimizer step."""

    def __init__(self, *args, decays: list[float], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.averages = {
            decay: AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
            for decay in decays
        }

    def optimizer_step(self, inputs, targets):
        result = super().optimizer_step(inputs, targets)
        for average in self.averages.values():
            average.update_parameters(self.model)
        return result

    def score_averages(self) -> dict[float, float]:
        """Each average's held-out loss, scored by the trainer's own val_loss on the model's weights swapped
        for the average's; the run's weights are put back after."""
        own = {name: tensor.clone() for name, tensor in self.model.state_dict().items()}
        scores = {}
        for decay, average in self.averages.items():
            self.model.load_state_dict(average.module.state_dict())
            scores[decay] = self.val_loss()
        self.model.load_state_dict(own)
        return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--decays", default="0.8,0.9,0.95", help="comma-separated EMA decays, each in (0, 1)")
    parser.add_argument("train_flags", nargs="+", help="train/train.py's flags, after --")
    args = parser.parse_args()
    try:
        decays = [float(text) for text in args.decays.split(",")]
    except ValueError:
        decays = []
    if not decays or not all(0 < decay < 1 for decay in decays):
        parser.error(f"--decays {args.decays}: each decay must be in (0, 1)")
    config = parse_config(args.train_flags)
    out_dir, checkpoint_dir, _ = outputs.out_dirs(config.out_dir, config.checkpoint_dir)
    for folder in (out_dir, checkpoint_dir):
        outputs.check_writable(folder)
    trainer = AveragingTrainer(config, setup_machine(config), decays=decays)
    summary = trainer.train()
    # summary.json (and --push-to-hub), as train/train.py ends a run
    publish.finish(config, trainer.out_dir, trainer.checkpoint_dir, summary, trainer.progress)
    print(f"steps {summary['steps']}, {summary['train_minutes']} minutes")
    print(f"{'weights':<22} {'held-out loss':>14}")
    print(f"{'the run, last step':<22} {summary['val_loss']:>14.4f}")  # scored by the run's last evaluation
    for decay, score in trainer.score_averages().items():
        folder = save_folder(trainer.averages[decay].module, out_dir / f"ema-{decay:g}")
        print(f"{f'EMA {decay:g}':<22} {score:>14.4f}   saved in {folder}")


if __name__ == "__main__":
    main()
