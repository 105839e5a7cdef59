"""The held-out loss of several training runs on one plot, against the tokens each has trained on.

    python bench/compare_runs.py LABEL=RUN_FOLDER [LABEL=RUN_FOLDER ...] [--line LABEL=LOSS ...] --out FILE.png

Each RUN_FOLDER is a trainer --out-dir (its metrics.jsonl is read); a run that fine-tuned another model
may start later on the axis with LABEL=RUN_FOLDER@TOKENS. --line draws a horizontal reference (a model whose
run left no metrics, or a goal). It also prints each run's best held-out loss and where it was reached.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def held_out_rows(folder: Path) -> list[dict]:
    """The held-out rows of a run, the last one kept where a resumed run scored a step twice."""
    rows = {}
    for line in (folder / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row.get("val_loss") is not None:
            rows[row["step"]] = row
    return [rows[step] for step in sorted(rows)]


def tokens_per_step(folder: Path) -> int:
    batch, seq_len = json.loads((folder / "summary.json").read_text())["batch"].split(" x ")
    return int(batch) * int(seq_len)


def pair(text: str) -> tuple[str, str]:
    label, _, value = text.partition("=")
    if not value:
        raise argparse.ArgumentTypeError(f"expected LABEL=VALUE, got {text!r}")
    return label, value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=pair, help="LABEL=RUN_FOLDER or LABEL=RUN_FOLDER@START_TOKENS")
    parser.add_argument("--line", action="append", type=pair, default=[], help="LABEL=LOSS, a horizontal line")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4))
    for label, where in args.runs:
        folder, _, start = where.partition("@")
        rows, step_tokens = held_out_rows(Path(folder)), tokens_per_step(Path(folder))
        x = [(int(start or 0) + row["step"] * step_tokens) / 1e6 for row in rows]
        axes.plot(x, [row["val_loss"] for row in rows], marker="o", markersize=3, label=label)
        best = min(rows, key=lambda row: row["val_loss"])
        print(f"{label}: best held-out loss {best['val_loss']:.4f} at step {best['step']}")
    for label, loss in args.line:
        axes.axhline(float(loss), linestyle="--", linewidth=1, color="grey")
        axes.annotate(label, (0, float(loss)), textcoords="offset points", xytext=(4, 3), fontsize=8)
    axes.set(xlabel="tokens trained on (millions)", ylabel="held-out loss (nats/token)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
