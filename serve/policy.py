"""What an app offers its visitors: the narrower ranges of the sampling settings it serves, the settings it
starts from, and the example prompts. The app's sliders, its request check and the trainer's sample text
all read them here."""

from __future__ import annotations

from model import SamplingParams
from model.sampling import checked_number

EXAMPLE_PROMPTS = ("First Citizen:", "ROMEO:", "To be or not")
FIRST_PROMPT = "ROMEO:"  # in the prompt box when the page opens, so the first click on Generate runs
DEFAULT_NEW_TOKENS = 200
DEFAULT_TOP_K = 50  # what visitors start from (the Python API's default, 0, keeps the whole distribution)
# (low, high) of each setting a served request may ask for
SERVED_RANGES: dict[str, tuple[float, float]] = {
    "temperature": (0.0, 2.0),
    "top_k": (0, 200),
    "top_p": (0.05, 1.0),
}
RANDOM_SEED = -1  # what a visitor sends (or sees) for "draw a random seed"; None means the same


def new_tokens(context: int) -> int:
    """How many tokens a visitor asks for first: DEFAULT_NEW_TOKENS, or the model's context if shorter."""
    return min(DEFAULT_NEW_TOKENS, context)


def default_params(seed: int | None = None) -> SamplingParams:
    """The settings a visitor starts from: SamplingParams' defaults with top-k DEFAULT_TOP_K."""
    return SamplingParams(top_k=DEFAULT_TOP_K, seed=seed)


def params_from_request(temperature, top_k, top_p, seed) -> SamplingParams:
    """Settings as a visitor of an app may send them (any JSON value): each within SERVED_RANGES, else
    SamplingError saying what is allowed; a seed of None or -1 is random."""
    (t_low, t_high), (k_low, k_high), (p_low, p_high) = SERVED_RANGES.values()
    temperature = checked_number(
        "temperature", temperature, t_low, t_high, f"a number from {t_low:g} to {t_high:g} (0 = greedy)"
    )
    top_k = checked_number(
        "top_k", top_k, k_low, k_high, f"a whole number from {k_low} to {k_high} (0 = off)", whole=True
    )
    top_p = checked_number("top_p", top_p, p_low, p_high, f"a number from {p_low:g} to {p_high:g} (1 = off)")
    random = seed is None or (not isinstance(seed, bool) and isinstance(seed, (int, float)) and seed == RANDOM_SEED)
    return SamplingParams(temperature, top_k, top_p, None if random else seed)
