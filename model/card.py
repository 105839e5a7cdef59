"""The model card of a saved model: its losses as a Hub `model-index`, the run's facts, usage snippets."""

from __future__ import annotations

from pathlib import Path

from .config import GPTConfig

CARD_NAME = "README.md"
# the prompts a model card shows samples of (the trainer writes them) and the app offers as examples
EXAMPLE_PROMPTS = ("First Citizen:", "ROMEO:", "To be or not")


class CardError(ValueError):
    """A model card that cannot be read."""


DATASET = ("karpathy/tiny_shakespeare", "Tiny Shakespeare")
# card results: (key in the metrics, the split it was measured on, the metric's name on the Hub)
LOSS_RESULTS = (
    ("train_loss", "train", "train loss (nats/token)"),
    ("val_loss", "validation", "held-out loss (nats/token)"),
)


def usage(model_id: str, sampling: dict | None = None) -> str:
    """How to use a model folder or Hub repo, sampling with these settings (e.g. {"temperature": 0.8,
    "top_k": 50}; none: each library's defaults): this project's API, and transformers."""
    settings = "".join(f", {name}={value}" for name, value in (sampling or {}).items())
    return f"""## Usage

With `transformers` (the tokenizer files are in the folder):

```python
from transformers import AutoTokenizer, pipeline

tokenizer = AutoTokenizer.from_pretrained("{model_id}")
generator = pipeline("text-generation", model="{model_id}")
print(generator("ROMEO:", max_new_tokens=100, do_sample=True{settings})[0]["generated_text"])
```

With the `model` package of the ShakespeareGPT project that trained it:

```python
from model import GPT, generate, load_tokenizer, stream_text

model = GPT.from_pretrained("{model_id}")
tokenizer = load_tokenizer("{model_id}")      # a local folder's own vocab.json + merges.txt
ids = generate(model, tokenizer.encode("ROMEO:"), max_new_tokens=100{settings}, seed=42)
print("ROMEO:" + "".join(stream_text(ids, tokenizer)))
```

Or serve it: `python app.py --model {model_id}`.
"""


def render_model_card(
    config: GPTConfig,
    metrics: dict | None = None,
    body: str = "",
    model_id: str = ".",
    sampling: dict | None = None,
) -> str:
    """A Hub model card: the losses in metrics (`train_loss`, `val_loss`) as a `model-index` of eval
    results, the other run facts under `training`, usage snippets for model_id that sample as sampling says
    (a dict of generate()'s settings; none: the libraries' defaults), and body."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    metrics = dict(metrics or {})
    results = [
        EvalResult(
            task_type="text-generation",
            dataset_type=DATASET[0],
            dataset_name=DATASET[1],
            dataset_split=split,
            metric_type="loss",
            metric_name=name,
            metric_value=metrics.pop(key),
        )
        for key, split, name in LOSS_RESULTS
        if isinstance(metrics.get(key), (int, float))
    ]
    data = ModelCardData(
        model_name="ShakespeareGPT",
        license="mit",
        library_name="transformers",
        tags=["gpt2", "text-generation", "shakespeare", "safetensors"],
        datasets=[DATASET[0]],
        pipeline_tag="text-generation",
        language="en",
        eval_results=results or None,
        training={k: v for k, v in metrics.items() if v is not None} or None,
    )
    shape = ", ".join(f"{k} {v}" for k, v in config.to_dict().items())
    text = (
        f"---\n{data.to_yaml()}\n---\n\n# ShakespeareGPT\n\n"
        "A GPT-2 style language model trained on Tiny Shakespeare, in the Hugging Face GPT-2 layout with its "
        "tokenizer files (GPT-2's byte-level BPE), so it loads with `transformers` and with "
        "`model.GPT.from_pretrained`, offline.\n\n"
        f"Shape: {shape}.\n"
    )
    if results or metrics:
        text += "\n## Training\n\n| metric | value |\n| --- | --- |\n"
        text += "".join(f"| {r.metric_name} | {r.metric_value} |\n" for r in results)
        text += "".join(f"| {k.replace('_', ' ')} | {v} |\n" for k, v in metrics.items() if v is not None)
    return str(ModelCard(text + "\n" + usage(model_id, sampling) + body))


def read_model_card_metrics(folder: str | Path) -> dict:
    """The losses (`train_loss`, `val_loss`) of a folder's model card, from its `model-index`, and
    the run facts under `training` ({} when there is no card)."""
    from huggingface_hub import ModelCard

    card = Path(folder) / CARD_NAME
    if not card.is_file():
        return {}
    try:
        data = ModelCard.load(card).data
    except Exception as err:  # the YAML parser's errors, a hand-edited card
        raise CardError(f"{card} is not a readable model card: {err}") from err
    training = getattr(data, "training", None)
    metrics = dict(training) if isinstance(training, dict) else {}
    keys = {split: key for key, split, _ in LOSS_RESULTS}
    for result in data.eval_results or []:
        if result.metric_type == "loss" and result.dataset_split in keys:
            metrics[keys[result.dataset_split]] = result.metric_value
    return metrics
