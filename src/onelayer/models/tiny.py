"""Built-in tiny models and the character-level tokenizer they use.

The tiny models are ordinary Hugging Face models (Qwen3 / Qwen2 architecture) built from configs, so
every code path that serves them also serves a real checkpoint. The tokenizer is a
`PreTrainedTokenizerFast` over single characters (printable ASCII plus newline) that the project builds
itself: no hub, no download, and `save_pretrained` / `AutoTokenizer.from_pretrained` round-trip it.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen3Config

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
CHARS = "\n" + "".join(chr(c) for c in range(32, 127))

# Shapes: hidden 128 × 8 blocks (≈2 M parameters) for the default; "bench-large" is the bigger
# tiny config that the speed benchmark also measures.
TINY_SHAPES: dict[str, dict] = {
    "tiny-qwen3": dict(arch="qwen3", hidden_size=128, num_hidden_layers=8, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=32, intermediate_size=512),
    "tiny-qwen2": dict(arch="qwen2", hidden_size=128, num_hidden_layers=8, num_attention_heads=4,
                       num_key_value_heads=2, intermediate_size=512),
    "tiny-qwen3-large": dict(arch="qwen3", hidden_size=256, num_hidden_layers=12, num_attention_heads=4,
                             num_key_value_heads=2, head_dim=64, intermediate_size=1024),
}


def char_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level fast tokenizer: ids 0-2 are <pad>, <eos>, <unk>, then one id per character."""
    vocab = {PAD: 0, EOS: 1, UNK: 2}
    for ch in CHARS:
        vocab[ch] = len(vocab)
    # BPE with no merges splits text into single characters; Fuse joins them back without spaces.
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, eos_token=EOS, unk_token=UNK,
        padding_side="left", clean_up_tokenization_spaces=False,
    )


def tiny_config(name: str, vocab_size: int):
    """The HF config of a built-in tiny model (random init happens in `from_config`)."""
    shape = dict(TINY_SHAPES[name])
    cls = {"qwen3": Qwen3Config, "qwen2": Qwen2Config}[shape.pop("arch")]
    return cls(
        vocab_size=vocab_size, max_position_embeddings=512, tie_word_embeddings=True,
        pad_token_id=0, eos_token_id=1, bos_token_id=None, rope_theta=10000.0, **shape,
    )
