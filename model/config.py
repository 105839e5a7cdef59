"""The GPT configuration: GPT-2 small by default, plus named presets."""

from dataclasses import asdict, dataclass

# Named shapes. "gpt2" is GPT-2 small (124M); "cpu-small" is what the shipped model
# in assets/ is trained with (fits 2 CPU cores in under an hour and a 32 MiB file);
# "tiny" is for tests.
SHAPES: dict[str, dict] = {
    "gpt2": {},
    "cpu-small": dict(block_size=256, n_layer=6, n_head=4, n_embd=128),
    "tiny": dict(block_size=64, n_layer=2, n_head=2, n_embd=32),
}


@dataclass(frozen=True)
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True

    def __post_init__(self) -> None:
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"GPTConfig.n_embd ({self.n_embd}) must be divisible by GPTConfig.n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout!r}")

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "GPTConfig":
        """The named preset, with any field overridden (None values are ignored)."""
        if name not in SHAPES:
            raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(SHAPES)}")
        fields = {**SHAPES[name], **{k: v for k, v in overrides.items() if v is not None}}
        return cls(**fields)

    def to_dict(self) -> dict:
        return asdict(self)
