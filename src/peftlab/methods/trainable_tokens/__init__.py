"""Trainable tokens: a few trained rows of an embedding table (``trainable_tokens.py``: config, the row
adapters, their tied views on output heads, registration; also used by LoRA's ``trainable_token_indices``)."""

from peftlab.methods.trainable_tokens.trainable_tokens import (
    LoraTokenRows,
    TiedTokenRows,
    TokenRows,
    TrainableTokensConfig,
    add_token_rows,
    check_token_indices,
    tie_output_heads,
)

__all__ = ["LoraTokenRows", "TiedTokenRows", "TokenRows", "TrainableTokensConfig", "add_token_rows", "check_token_indices", "tie_output_heads"]
