"""The probability records of a completion: each generated token with the model's probability of it and the
most probable alternatives, as JSON records for any front end (the app's API and MCP tool, the OpenAI-style
logprobs, the page's HTML in webapp/probability_html.py)."""

from __future__ import annotations

from model.sampling import TokenProbability
from model.tokenizer import TextEncoding


def token_text(tokenizer: TextEncoding, token: int) -> str:
    """One token's text (a token that ends inside a UTF-8 character shows the replacement character)."""
    return tokenizer.decode_single_token_bytes(token).decode("utf-8", errors="replace")


def record(choice: TokenProbability, tokenizer: TextEncoding) -> dict:
    """A generated token's JSON record: {"token", "id", "p", "top": [{"token", "id", "p"}, ...]}."""
    return {
        "token": token_text(tokenizer, choice.id),
        "id": choice.id,
        "p": choice.p,
        "top": [{"token": token_text(tokenizer, token), "id": token, "p": p} for token, p in choice.top],
    }


class Records:
    """The records of a completion as it grows: each token's record is made once, as it arrives."""

    def __init__(self, tokenizer: TextEncoding) -> None:
        self.tokenizer = tokenizer
        self.records: list[dict] = []

    def update(self, probabilities: list[TokenProbability]) -> list[dict]:
        """Take in the tokens of probabilities not seen yet (the list a completion's stats grow); returns the
        records made now."""
        new = [record(choice, self.tokenizer) for choice in probabilities[len(self.records) :]]
        self.records.extend(new)
        return new
