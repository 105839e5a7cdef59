"""What an app offers its visitors besides the sampling settings (whose served ranges and starting values are
model.sampling.SETTINGS'): how many tokens a visitor asks for first and the prompt the page opens with."""

from __future__ import annotations

FIRST_PROMPT = "ROMEO:"  # in the prompt box when the page opens, so the first click on Generate runs
DEFAULT_NEW_TOKENS = 200


def new_tokens(context: int) -> int:
    """How many tokens a visitor asks for first: DEFAULT_NEW_TOKENS, or the model's context if shorter."""
    return min(DEFAULT_NEW_TOKENS, context)
