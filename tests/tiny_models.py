"""Tiny random models built from a config with a local tokenizer: the mechanics of training without a hub.

`build_tiny_qwen3(dir)` writes a 2-layer Qwen3 causal LM (about 100k parameters) and a byte-level BPE
tokenizer trained here on a small word list, with Qwen's special tokens (`<|endoftext|>`, `<|im_start|>`,
`<|im_end|>`) and single-token `yes` / `no` so the reranker's yes/no scoring works as with Qwen3-Reranker.
Deterministic for a seed. Nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

WORDS = (
    "the a an of to in is was for on with as by at from that this it be are or not and but which what who "
    "how why when where query document passage answer question relevant yes no instruct judge search web "
    "retrieve system user assistant think cat dog bird fish tree river mountain city car train plane music "
    "art science math physics chemistry biology history sport football tennis cooking food water fire "
    "earth moon sun star planet computer network data model learning deep neural language text embedding "
    "similar different good bad big small fast slow red blue green black white man woman child people"
).split()


def _train_tokenizer(vocab_size: int = 600):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))] * 4
    corpus += ["yes", "no", " yes", " no"] * 50
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
    )
    for word in ("yes", "no"):
        assert len(fast.encode(word, add_special_tokens=False)) == 1, word
    return fast


def build_tiny_qwen3(path: str | Path, seed: int = 0) -> Path:
    """Write a tiny random Qwen3ForCausalLM + tokenizer to `path` and return it."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    path = Path(path)
    tokenizer = _train_tokenizer()
    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    model = Qwen3ForCausalLM(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


VISION_TOKENS = ["<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>"]


def _vision_tokenizer():
    """The tiny tokenizer plus Qwen-VL's vision tokens (each one token, as in the real tokenizers)."""
    tokenizer = _train_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", *VISION_TOKENS]})
    return tokenizer


def build_tiny_qwen2_vl(path: str | Path, seed: int = 0) -> Path:
    """A tiny random Qwen2-VL (GME's architecture: 2 text layers, a 2-block vision tower with 14-pixel patches)
    + tokenizer + image processor (min 4, max 64 merged patches per image) written to `path`."""
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessorPil

    path = Path(path)
    tokenizer = _vision_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in VISION_TOKENS}
    torch.manual_seed(seed)
    config = Qwen2VLConfig(
        text_config={
            "vocab_size": len(tokenizer), "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 2048,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
            "tie_word_embeddings": True, "pad_token_id": tokenizer.pad_token_id, "bos_token_id": None,
            "eos_token_id": tokenizer.eos_token_id,
        },
        vision_config={"depth": 2, "embed_dim": 32, "hidden_size": 64, "num_heads": 2, "mlp_ratio": 2,
                       "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "in_chans": 3},
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )  # fmt: skip
    Qwen2VLForConditionalGeneration(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    Qwen2VLImageProcessorPil(min_pixels=4 * 28 * 28, max_pixels=64 * 28 * 28).save_pretrained(path)
    return path


def build_tiny_qwen3_vl(path: str | Path, seed: int = 0) -> Path:
    """A tiny random Qwen3-VL (Qwen3-VL-Embedding's architecture: 16-pixel patches, deepstack) + tokenizer +
    image processor written to `path`."""
    import torch
    from transformers import Qwen2VLImageProcessorPil, Qwen3VLConfig, Qwen3VLForConditionalGeneration

    path = Path(path)
    tokenizer = _vision_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in VISION_TOKENS}
    torch.manual_seed(seed)
    config = Qwen3VLConfig(
        text_config={
            "vocab_size": len(tokenizer), "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 2048,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3],
                                "mrope_interleaved": True},
            "pad_token_id": tokenizer.pad_token_id, "bos_token_id": None, "eos_token_id": tokenizer.eos_token_id,
        },
        vision_config={"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "patch_size": 16,
                       "spatial_merge_size": 2, "temporal_patch_size": 2, "out_hidden_size": 64,
                       "num_position_embeddings": 64, "deepstack_visual_indexes": [0]},
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )  # fmt: skip
    Qwen3VLForConditionalGeneration(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    Qwen2VLImageProcessorPil(
        patch_size=16, merge_size=2, min_pixels=4 * 32 * 32, max_pixels=64 * 32 * 32,
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
    ).save_pretrained(path)  # fmt: skip
    return path
