"""Prompts to text states: Wan's prompt cleaning and tokenizers, the umT5 encoder."""

from causal_dit_jax.text.tokenizer import ByteTokenizer, PromptTokenizer, Tokens, clean_prompt
from causal_dit_jax.text.umt5 import T5Config, UMT5Encoder, get_t5_preset

__all__ = ["ByteTokenizer", "PromptTokenizer", "T5Config", "Tokens", "UMT5Encoder", "clean_prompt", "get_t5_preset"]
