"""The page's probability view: a completion's token records (serve.probability_view) as HTML, each token
coloured by the model's probability of it, its alternatives shown on hover or tap."""

from __future__ import annotations

from html import escape

from model.sampling import TokenProbability
from model.tokenizer import TextEncoding
from serve.probability_view import Records


def colour(p: float) -> str:
    """Red for a token the model thought unlikely, through yellow, to green for a sure one (translucent, so
    the text reads in light and dark themes). The hue follows sqrt(p): a small model gives most tokens well
    under 50%, and a linear scale would paint nearly all of them the same red."""
    return f"hsla({round(120 * p**0.5)}, 85%, 50%, 0.35)"


def shown(text: str) -> str:
    """A token as a line of the alternatives list: whitespace made visible."""
    return text.replace("\n", "\u21b5").replace(" ", "\u2423") or "\u2205"


def span(token: dict) -> str:
    """A token record as a coloured span holding its probability and the alternatives, shown on hover or focus
    (a tap focuses it on a phone)."""
    alternatives = "".join(f"<li>{escape(shown(alt['token']))} {alt['p']:.1%}</li>" for alt in token["top"])
    return (
        f'<span class="token" tabindex="0" style="background:{colour(token["p"])}" data-p="{token["p"]:.4f}">'
        f'{escape(token["token"])}<span class="alternatives" role="tooltip">'
        f"<b>{escape(shown(token['token']))} {token['p']:.1%}</b><ol>{alternatives}</ol></span></span>"
    )


class View:
    """The HTML of a completion's records as it grows: each token is rendered once, as it arrives."""

    def __init__(self, tokenizer: TextEncoding) -> None:
        self.records = Records(tokenizer)
        self._spans: list[str] = []

    def update(self, probabilities: list[TokenProbability]) -> View:
        """Take in the tokens of probabilities not seen yet (the list a completion's stats grow)."""
        self._spans.extend(span(token) for token in self.records.update(probabilities))
        return self

    def html(self) -> str:
        return f'<div class="probabilities">{"".join(self._spans)}</div>'


CSS = """
.probabilities { white-space: pre-wrap; line-height: 1.9; font-family: var(--font-mono); }
.probabilities .token { position: relative; border-radius: 3px; cursor: help; }
.probabilities .alternatives { display: none; position: absolute; left: 0; top: 1.7em; z-index: 20;
  background: var(--background-fill-primary); border: 1px solid var(--border-color-primary); border-radius: 6px;
  padding: 4px 10px; white-space: pre; font-size: 12px; line-height: 1.4; box-shadow: var(--shadow-drop-lg); }
.probabilities .alternatives ol { margin: 2px 0 0 0; padding-left: 1.4em; }
.probabilities .token:hover .alternatives, .probabilities .token:focus .alternatives { display: block; }
"""
