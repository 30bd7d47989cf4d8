"""A compact UNet (Ho et al. 2020 / improved DDPM shape) with patching (Luhman & Luhman 2022).

The image (B, C, H, W) goes through pixel_unshuffle by P to (B, C P^2, H/P, W/P); every layer
then runs on the P-times smaller grid, and pixel_shuffle restores the output. Widths per level
are the same for every P (only the input and output convolutions see C P^2 channels), so the
parameter counts of P = 1 and P > 1 nets are comparable while the cost of a step falls by about
P^2 for the convolutions and P^4 for attention. ``attn_resolutions`` are feature-map sizes on the
patched grid (number of tokens per side).

``pos_emb`` adds the PDM release's fixed 2-D sinusoidal position embedding to the features after the
first convolution (:func:`position_embedding_2d`). It is off by default (the project's nets have
none) and, when off, absent from the config dict, so cards written before it existed load unchanged
and the default nets' cards are byte for byte what they were.

``num_classes`` makes the net class-conditional (issue 17): a learned embedding of the label,
``nn.Embedding(num_classes + 1, emb)`` as diffusers' ``UNet2DModel(num_class_embeds=...)``, is added
to the time embedding, so every ResBlock's FiLM sees it. Index ``num_classes`` is the null label
(Ho & Salimans 2022, classifier-free guidance): the teacher is trained with labels dropped to it
(train.teacher, ``p_uncond``) and a forward without labels is the net's unconditional model. Off
by default (None) and then absent from the config dict and the state dict, as ``pos_emb``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn


PatchSize = Literal[1, 2, 4, 8]  # the patch sizes the UNet supports (fewstep.config imports them)
PATCH_SIZES: tuple[int, ...] = get_args(PatchSize)


@dataclass(frozen=True)
class UNetConfig:
    image_size: int = 32
    in_channels: int = 3
    patch_size: int = 1
    channels: int = 64
    channel_mult: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (8,)
    head_dim: int = 32
    dropout: float = 0.1
    emb_mult: int = 4
    pos_emb: bool = False  # PDM: fixed 2-D sinusoidal position embedding after the first conv
    num_classes: int | None = None  # class-conditional: labels 0..num_classes-1, num_classes = null

    def __post_init__(self) -> None:
        object.__setattr__(self, "channel_mult", tuple(self.channel_mult))
        object.__setattr__(self, "attn_resolutions", tuple(self.attn_resolutions))
        P = self.patch_size
        if P not in PATCH_SIZES:
            raise ValueError(f"patch_size must be one of {PATCH_SIZES}, got {P}")
        if self.image_size % P:
            raise ValueError(f"image_size {self.image_size} is not divisible by patch_size {P}")
        grid = self.image_size // P
        if grid % (2 ** (len(self.channel_mult) - 1)):
            raise ValueError(
                f"grid {grid} (image_size/patch_size) cannot be halved {len(self.channel_mult) - 1} times; "
                "use fewer channel_mult levels"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.pos_emb and (self.channels % 2 or self.channels < 4):
            raise ValueError(f"pos_emb needs an even channel count >= 4 (half per axis), got {self.channels}")
        if self.num_classes is not None and (isinstance(self.num_classes, bool) or int(self.num_classes) < 1):
            raise ValueError(f"num_classes must be a positive class count or None, got {self.num_classes!r}")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    def to_dict(self) -> dict:
        d = asdict(self)
        d["channel_mult"] = list(self.channel_mult)
        d["attn_resolutions"] = list(self.attn_resolutions)
        if not self.pos_emb:  # format-compatible: only a net that has one says so
            del d["pos_emb"]
        if self.num_classes is None:  # likewise: only a conditional net has the key
            del d["num_classes"]
        return d

    @property
    def null_label(self) -> int | None:
        """The label index of "no class" (classifier-free guidance's unconditional model)."""
        return self.num_classes


def _norm(ch: int) -> nn.GroupNorm:
    """GroupNorm with the most groups (<= 32) that divide ch and keep >= 4 channels per group."""
    groups = max(g for g in range(1, 33) if ch % g == 0 and (ch // g >= 4 or g == 1))
    return nn.GroupNorm(groups, ch, eps=1e-6)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of continuous t in [0, 1] (scaled by 1000 as in DDPM)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = 1000.0 * t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


def position_embedding_2d(channels: int, grid: int) -> torch.Tensor:
    """The PDM release's fixed 2-D position embedding, (1, channels, grid, grid) float32.

    Half the channels encode the column j, half the row i, each as sin(omega f_k pos) with
    f_k = 10000^(-k / (channels/2 - 1)), k = 0 .. channels/2 - 1, and omega = 64 / grid (a coarser
    grid gets shorter wavelengths). Sine only, so position 0 is all zeros, as in the release
    (Luhman & Luhman 2022; distill_pdm.md B.3).
    """
    half = channels // 2
    k = torch.arange(half, dtype=torch.float64)
    freq = torch.exp(-math.log(10000.0) * k / max(half - 1, 1))
    pos = torch.arange(grid, dtype=torch.float64)
    axis = torch.sin((64.0 / grid) * pos[:, None] * freq[None, :])  # (grid, half): position x frequency
    cols = axis.T[:, None, :].expand(half, grid, grid)  # channel k at (i, j) depends on j
    rows = axis.T[:, :, None].expand(half, grid, grid)  # ... on i
    return torch.cat([cols, rows])[None].float()


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, FiLM (scale, shift) from the time embedding, zero-init output."""

    def __init__(self, cin: int, cout: int, emb: int, dropout: float):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb, 2 * cout)
        self.norm2, self.drop = _norm(cout), nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.drop(F.silu(h)))
        return self.skip(x) + h


class Attention(nn.Module):
    """Multi-head self-attention over the feature map (fused scaled_dot_product_attention)."""

    def __init__(self, ch: int, head_dim: int):
        super().__init__()
        self.heads = max(1, ch // head_dim)
        self.norm = _norm(ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.out = nn.Conv2d(ch, ch, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, self.heads, C // self.heads, H * W).unbind(1)
        h = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        return x + self.out(h.transpose(-1, -2).reshape(B, C, H, W))


class UNet(nn.Module):
    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        P, ch = cfg.patch_size, cfg.channels
        emb = ch * cfg.emb_mult
        self.time_mlp = nn.Sequential(nn.Linear(ch, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.conv_in = nn.Conv2d(cfg.in_channels * P * P, ch, 3, padding=1)
        # fixed, not learned: rebuilt from the config, so it is not in the state dict (weights unchanged)
        self.register_buffer("pos", position_embedding_2d(ch, cfg.grid) if cfg.pos_emb else None, persistent=False)

        self.down = nn.ModuleList()
        skips, cur, res = [ch], ch, cfg.grid
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                blocks = [ResBlock(cur, ch * mult, emb, cfg.dropout)]
                cur = ch * mult
                if res in cfg.attn_resolutions:
                    blocks.append(Attention(cur, cfg.head_dim))
                self.down.append(nn.ModuleList(blocks))
                skips.append(cur)
            if level < len(cfg.channel_mult) - 1:
                self.down.append(nn.ModuleList([nn.Conv2d(cur, cur, 3, stride=2, padding=1)]))
                skips.append(cur)
                res //= 2

        self.mid = nn.ModuleList(
            [ResBlock(cur, cur, emb, cfg.dropout), Attention(cur, cfg.head_dim), ResBlock(cur, cur, emb, cfg.dropout)]
        )

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for _ in range(cfg.num_res_blocks + 1):
                blocks = [ResBlock(cur + skips.pop(), ch * mult, emb, cfg.dropout)]
                cur = ch * mult
                if res in cfg.attn_resolutions:
                    blocks.append(Attention(cur, cfg.head_dim))
                self.up.append(nn.ModuleList(blocks))
            if level > 0:
                self.up.append(nn.ModuleList([_Upsample(cur)]))
                res *= 2

        self.norm_out = _norm(cur)
        self.conv_out = nn.Conv2d(cur, cfg.in_channels * P * P, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)
        # built last, so the other layers draw the same initial weights as the unconditional net's;
        # row num_classes is the null label; the attribute is None on an unconditional net
        self.class_emb = nn.Embedding(cfg.num_classes + 1, emb) if cfg.num_classes is not None else None

    @property
    def num_classes(self) -> int | None:
        """The class count of a class-conditional net (None: unconditional)."""
        return self.cfg.num_classes

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, C, H, W) noisy image; t: (B,) continuous time in [0, 1]; y: (B,) long class labels
        of a conditional net (index num_classes = null label; None = all null: the unconditional
        model). Labels are not range-checked here (math.guidance checks them once per sampler)."""
        P = self.cfg.patch_size
        emb = self.time_mlp(timestep_embedding(t, self.cfg.channels).to(x.dtype))
        if self.class_emb is not None:
            if y is None:
                y = torch.full((x.shape[0],), self.cfg.num_classes, dtype=torch.long, device=x.device)
            emb = emb + self.class_emb(y.long()).to(emb.dtype)
        elif y is not None:
            raise ValueError("class labels given to an unconditional UNet (its config has no num_classes)")
        h = F.pixel_unshuffle(x, P) if P > 1 else x
        h = self.conv_in(h)
        if self.pos is not None:
            h = h + self.pos.to(h.dtype)
        hs = [h]
        for blocks in self.down:
            h = _run(blocks, h, emb)
            hs.append(h)
        h = _run(self.mid, h, emb)
        for blocks in self.up:
            if isinstance(blocks[0], _Upsample):
                h = blocks[0](h)
            else:
                h = _run(blocks, torch.cat([h, hs.pop()], dim=1), emb)
        h = self.conv_out(F.silu(self.norm_out(h)))
        return F.pixel_shuffle(h, P) if P > 1 else h


class _Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _run(blocks: nn.ModuleList, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    for b in blocks:
        h = b(h, emb) if isinstance(b, (ResBlock, Attention)) else b(h)
    return h


def count_params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())
