"""The decoding engine: `Decoder(sft_model, tokenizer, reward, baseline_model, settings).decode(prompts)`."""

from .engine import Decoder, Generation
from .settings import DecoderSettings

__all__ = ["Decoder", "DecoderSettings", "Generation"]
