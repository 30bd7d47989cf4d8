"""A tiny diffusers latent text-to-image snapshot built here (random weights, 8x8 latents, 16x16
pixels, cross_attention_dim 16): nothing is downloaded. Used by the diffusers-sd tests."""

from __future__ import annotations

from pathlib import Path

import torch

EMBED_DIM, LATENT, CHANNELS = 16, 8, 4


def tiny_sd_snapshot(d: Path, prediction_type: str = "epsilon", seed: int = 0, out_scale: float = 0.2) -> Path:
    """unet/ (UNet2DConditionModel), vae/ (AutoencoderKL), scheduler/ (SD's DDIM config) at ``d``.
    ``out_scale`` shrinks the UNet's last conv so the random network's predictions stay moderate."""
    import diffusers

    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(
        sample_size=LATENT, in_channels=CHANNELS, out_channels=CHANNELS, layers_per_block=1,
        block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=EMBED_DIM, norm_num_groups=8,
        attention_head_dim=4)
    with torch.no_grad():
        unet.conv_out.weight.mul_(out_scale)
        unet.conv_out.bias.mul_(out_scale)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                                  up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 16],
                                  latent_channels=CHANNELS, norm_num_groups=4, sample_size=2 * LATENT)
    sched = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                    clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                                    prediction_type=prediction_type)
    unet.save_pretrained(d / "unet")
    vae.save_pretrained(d / "vae")
    sched.save_pretrained(d / "scheduler")
    return d


def random_prompts(n: int, seq_len: int = 5, dim: int = EMBED_DIM, n_negative: int = 1, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, seq_len, dim, generator=g), torch.randn(n_negative, seq_len, dim, generator=g)


def add_tiny_text_encoder(d: Path, max_length: int = 8) -> Path:
    """text_encoder/ (a 1-layer CLIPTextModel, hidden size EMBED_DIM, safetensors) and tokenizer/ (a
    CLIP BPE tokenizer over single letters and a few words) into the snapshot ``d``, plus its
    model_index.json entries."""
    import json

    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab: dict[str, int] = {}
    for suffix in ("", "</w>"):
        for ch in "abcdefghijklmnopqrstuvwxyz":
            vocab[ch + suffix] = len(vocab)
    for w in ("a</w>", "cat</w>", "dog</w>", "fox</w>", "red</w>", "<|startoftext|>", "<|endoftext|>"):
        vocab.setdefault(w, len(vocab))
    raw = d / "_vocab"
    raw.mkdir(parents=True, exist_ok=True)
    (raw / "vocab.json").write_text(json.dumps(vocab))
    (raw / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(raw / "vocab.json"), str(raw / "merges.txt"), model_max_length=max_length,
                        pad_token="<|endoftext|>")
    tok.save_pretrained(d / "tokenizer")
    torch.manual_seed(3)
    cfg = CLIPTextConfig(vocab_size=len(vocab), hidden_size=EMBED_DIM, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=max_length, projection_dim=EMBED_DIM,
                         bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                         pad_token_id=vocab["<|endoftext|>"])
    CLIPTextModel(cfg).save_pretrained(d / "text_encoder", safe_serialization=True)
    (d / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline",
                                                    "text_encoder": ["transformers", "CLIPTextModel"],
                                                    "tokenizer": ["transformers", "CLIPTokenizer"]}))
    return d
