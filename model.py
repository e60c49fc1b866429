"""
A Diffusion Transformer (DiT) conditioned on the noise level t, the step size d and a text feature y.

Reads top-down like facebookresearch/DiT's models.py:
embedders (t, d, text) -> DiTBlock (adaLN-Zero) -> FinalLayer -> DiT -> sin-cos pos-embed -> DiT_models registry,
then loading a checkpoint and the precision of the forward passes (autocast).

    python model.py            # shape smoke test: builds every preset, prints parameter counts

Conventions (as in the paper and the official code): t = 0 is pure noise x0, t = 1 is data x1,
the model returns the velocity v = x1 - x0, and d in [0, 1] is the size of the step the caller will take with it:
d = 1 is the one-step jump, and flow matching is d -> 0 (the shortcut objective's smallest level 1/128; MeanFlow
trains d = 0 itself). Its last layer predicts v itself (the paper) or, with predict="x", the clean image x1, from
which v follows (see DiT.forward).

Where this differs from the official code (kvfrans/shortcut-models, JAX; README "Ours vs official"):
  t       ours: t x time_scale (1000 by default, facebookresearch/DiT's range of integer timesteps); official
          model.py's TimestepEmbedder takes t raw in [0, 1] (its x1000 line is commented out). --time-scale 1 = raw.
  d       ours: d itself, x time_scale, through its own sinusoidal MLP; official: the level index log2(1/d)
          (0 ... 7) through a second TimestepEmbedder: d_embedding="level" (not for MeanFlow: d = 0 has no level).
  adaLN   ours: adaLN-Zero, every block's modulation zeroed at init (facebookresearch/DiT models.py,
          initialize_weights); official: only the final layer zeroed.
  text    ours: a frozen CLIP feature, or (train.py --unconditional) the learned null embedding in every row, which
          is the official CelebA-HQ run (class_dropout_prob 1, num_classes 1: the label is always the null class).
"""

import contextlib
import math
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def modulate(x, shift, scale):
    # x: (B, T, C), shift/scale: (B, C) -> broadcast over tokens
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


# -----------------------------------------------------------------------------
# Embedders: t, d and the text feature each become a vector of the model width; their sum is the condition c.

class ScalarEmbedder(nn.Module):
    """Embeds a scalar per row (t or d) with sinusoidal frequencies followed by an MLP."""

    def __init__(self, hidden_size, scale, frequency_size=256):
        super().__init__()
        self.scale = scale  # maps the scalar's range onto the frequencies (DiT: t in [0, 1000]; official shortcut: 1)
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, s):
        # s: (B,) float -> (B, hidden)
        half = self.frequency_size // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=s.device, dtype=torch.float32) / half)
        args = (s.float() * self.scale)[:, None] * freqs[None]                  # (B, half)
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


class TextEmbedder(nn.Module):
    """Projects a frozen text feature to the model width; an all-zero row asks for the learned null embedding.

    Zero rows mean "no caption": train.py zeroes 10% of the captions (caption dropout), every caption with
    --unconditional (then `null` is the only text parameter that learns, as the official CelebA-HQ run's null class),
    and sample.py passes zeros for the unconditional half of classifier-free guidance. Real text features are never
    exactly zero.
    """

    def __init__(self, feature_dim, hidden_size):
        super().__init__()
        self.proj = nn.Sequential(nn.Linear(feature_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))
        self.null = nn.Parameter(torch.zeros(hidden_size))
        # Per-dimension statistics of the training captions (train.py sets them, checkpoints keep them).
        # Frozen text features share a large common component; standardising them makes the differences
        # between captions, the part that matters, visible to the MLP from the first step.
        self.register_buffer("feature_mean", torch.zeros(feature_dim))
        self.register_buffer("feature_std", torch.ones(feature_dim))

    def set_feature_stats(self, features):
        # features: (K, D) the text features of the training captions
        self.feature_mean.copy_(features.mean(0))
        self.feature_std.copy_(features.std(0).clamp_min(1e-6))

    def forward(self, y):
        # y: (B, D) -> (B, hidden)
        is_null = (y == 0).all(dim=1, keepdim=True)                               # (B, 1)
        y_std = (y - self.feature_mean) / self.feature_std
        return torch.where(is_null, self.null.to(y.dtype), self.proj(y_std))


# -----------------------------------------------------------------------------
# Transformer blocks

class Attention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)  # (B, nh, T, hs)
        x = F.scaled_dot_product_attention(q, k, v)                                # fused kernel where available
        return self.proj(x.transpose(1, 2).reshape(B, T, C))


class DiTBlock(nn.Module):
    """A transformer block whose LayerNorms are modulated by c (adaLN), with zero-initialised gates (adaLN-Zero)."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        hidden_mlp = int(hidden_size * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(hidden_size, hidden_mlp), nn.GELU(approximate="tanh"),
                                 nn.Linear(hidden_mlp, hidden_size))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x, c):
        # x: (B, T, C), c: (B, C)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm, then a linear map from each token back to its patch of pixels/latents."""

    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


# -----------------------------------------------------------------------------
# The model

class DiT(nn.Module):
    def __init__(self, input_size=32, in_channels=4, feature_dim=512,
                 hidden_size=768, depth=12, num_heads=12, patch_size=2, mlp_ratio=4.0, predict="v", time_scale=1000.0, x_floor=0.25,
                 d_embedding="value"):
        super().__init__()
        assert predict in ("v", "x") and d_embedding in ("value", "level"), (predict, d_embedding)
        self.input_size, self.in_channels, self.feature_dim = input_size, in_channels, feature_dim
        self.predict = predict  # what the last layer outputs: the velocity (the paper, official) or the clean image x1
        self.x_floor = x_floor  # predict="x": the floor on 1 - t, set by the objective (objectives.SETTINGS)
        self.patch_size, self.num_heads = patch_size, num_heads
        self.x_embedder = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)
        # time_scale multiplies t and d before the sinusoids: 1000 (ours, DiT's) or 1 (the official code's t; needed
        # by MeanFlow, whose target contains d/dt and d/dd of the model output, which a scale of 1000 makes ~1000x
        # larger). d_embedding="level" embeds d as the official code does: its level log2(1/d) = 0 ... 7, unscaled.
        self.time_scale, self.d_embedding = time_scale, d_embedding
        self.t_embedder = ScalarEmbedder(hidden_size, scale=time_scale)  # t in [0, 1]
        self.d_embedder = ScalarEmbedder(hidden_size, scale=time_scale if d_embedding == "value" else 1.0)
        self.y_embedder = TextEmbedder(feature_dim, hidden_size)
        num_patches = (input_size // patch_size) ** 2
        # fixed (not learned) sin-cos position embedding, as in DiT
        pos = get_2d_sincos_pos_embed(hidden_size, input_size // patch_size)
        self.register_buffer("pos_embed", torch.from_numpy(pos).float().unsqueeze(0), persistent=False)  # (1, T, C)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, in_channels)
        self.initialize_weights()
        assert num_patches == self.pos_embed.shape[1]

    def initialize_weights(self):
        def _basic_init(module):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        self.apply(_basic_init)
        w = self.x_embedder.weight.data  # initialise the patch embedding like a linear layer
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        for mlp in (self.t_embedder.mlp, self.d_embedder.mlp, self.y_embedder.proj):
            nn.init.normal_(mlp[0].weight, std=0.02)
            nn.init.normal_(mlp[2].weight, std=0.02)
        # adaLN-Zero (Meta's DiT; ours: the official shortcut code zeroes only the final layer): every block starts
        # as the identity and the output at zero, so an untrained model predicts v = 0 (or x1 = 0 with
        # predict="x"): a stable start for the bootstrap teacher too.
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def unpatchify(self, x):
        # x: (B, T, p*p*C) -> (B, C, H, W)
        p, c = self.patch_size, self.in_channels
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, h * p, w * p)

    def forward(self, x_t, t, d, y):
        """x_t: (B, C, H, W); t: (B,) in [0, 1]; d: (B,) step size in [1/128, 1]; y: (B, D), zero rows = null.
        Returns the predicted velocity (B, C, H, W), whatever the last layer predicts."""
        x = self.x_embedder(x_t).flatten(2).transpose(1, 2) + self.pos_embed   # (B, T, C), T = (H/p)*(W/p)
        d_in = d if self.d_embedding == "value" else -torch.log2(d)             # d in [1/128, 1] or level 0 ... 7
        c = self.t_embedder(t) + self.d_embedder(d_in) + self.y_embedder(y)    # (B, C)
        for block in self.blocks:
            x = block(x, c)                                                      # (B, T, C)
        x = self.final_layer(x, c)                                               # (B, T, p*p*C_in)
        out = self.unpatchify(x)                                                 # (B, C_in, H, W)
        if self.predict == "v":
            return out
        # x-prediction: out is the clean image x1, and the velocity follows from x_t = t*x1 + (1 - t)*x0:
        # v = x1 - x0 = (x1 - x_t) / (1 - t). The noise in x_t bypasses the network, so a 1-step sample
        # x0 + v = out is as clean as the image the network draws, instead of x0 minus an imperfect copy of x0
        # (grain). 1 - t is floored at x_floor so the loss, still taken on v, stays bounded near t = 1 (Li & He
        # 2025, "Back to Basics: Let Denoising Generative Models Denoise", floor at 0.05).
        return (out - x_t) / (1 - t).clamp(min=self.x_floor).view(-1, 1, 1, 1)

    def flops_per_image(self):
        """FLOPs of one forward pass for one image, a multiply-add counted as 2 FLOPs (for MFU).

        The DiT paper's "Gflops" count multiply-adds: its 23.0 for DiT-B/2 are 46.0 GFLOPs here. Counted: every
        matmul (the patch convolution is one too) and the attention scores and mixing; not counted: norms,
        activations, softmax (under 1% of the FLOPs, left out of MFU by convention). test_bench.py checks this against
        torch.utils.flop_counter. A training step costs ~3x this (the backward pass is two matmuls per forward one).
        """
        T, C = self.pos_embed.shape[1:]                                          # tokens, width
        weights = {m: m.weight.numel() for m in self.modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
        per_token = [self.x_embedder, self.final_layer.linear] + [
            m for b in self.blocks for m in (b.attn.qkv, b.attn.proj, b.mlp[0], b.mlp[2])]
        macs = T * sum(weights.pop(m) for m in per_token)                       # applied to each of the T tokens
        macs += sum(weights.values())                                            # embedders, adaLN: once per image
        macs += len(self.blocks) * 2 * T * T * C                                 # q @ k^T and attn @ v
        return 2 * macs


# -----------------------------------------------------------------------------
# Sine/cosine position embeddings (from MAE / DiT)

def get_2d_sincos_pos_embed(embed_dim, grid_size):
    """Returns (grid_size*grid_size, embed_dim): half the channels encode the row, half the column."""
    grid_h, grid_w = np.meshgrid(np.arange(grid_size, dtype=np.float32), np.arange(grid_size, dtype=np.float32),
                                 indexing="ij")
    return np.concatenate([get_1d_sincos_pos_embed(embed_dim // 2, grid_w.reshape(-1)),
                           get_1d_sincos_pos_embed(embed_dim // 2, grid_h.reshape(-1))], axis=1)


def get_1d_sincos_pos_embed(embed_dim, pos):
    """pos: (M,) -> (M, embed_dim)"""
    omega = 1.0 / 10000 ** (np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0))
    out = np.outer(pos, omega)                                                   # (M, D/2)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


# -----------------------------------------------------------------------------
# Model sizes: DiT(**DiT_models[name], input_size=..., in_channels=..., feature_dim=...). DiT-B/2 is the paper's.
# DiT-T (tiny) is ours: small enough to train in minutes on a laptop CPU.

def _size(hidden_size, depth, num_heads, patch_size):
    return dict(hidden_size=hidden_size, depth=depth, num_heads=num_heads, patch_size=patch_size)


DiT_models = {
    "DiT-XL/2": _size(1152, 28, 16, 2), "DiT-L/2": _size(1024, 24, 16, 2),
    "DiT-B/2": _size(768, 12, 12, 2), "DiT-B/4": _size(768, 12, 12, 4),
    "DiT-S/2": _size(384, 12, 6, 2), "DiT-S/4": _size(384, 12, 6, 4),
    "DiT-T/2": _size(128, 4, 4, 2), "DiT-T/4": _size(128, 4, 4, 4),
}


# -----------------------------------------------------------------------------
# Checkpoints (train.py writes them) and the precision of the forward passes

def read_checkpoint(path, device):
    """The checkpoint dict of train.py, loaded with weights_only=True: tensors, dicts, lists, strings and numbers
    only, never pickled code. A missing, truncated or foreign file is one clear line (SystemExit)."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: checkpoint {path} not found: train one first with `python train.py`")
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        raise SystemExit(f"error: cannot load checkpoint {path}: {str(e).splitlines()[0]}")


def load_checkpoint(path, device, weights="ema"):
    """Returns (model in eval mode, checkpoint dict). weights="ema": the EMA weights (DiT's habit and ours);
    "online": the weights the optimiser trained, which the official code samples and evaluates with (use_ema=0).
    Any problem is one clear line (SystemExit)."""
    ckpt = read_checkpoint(path, device)
    try:
        meta, args = ckpt["meta"], ckpt["args"]
        model = DiT(**DiT_models[args["model"]], input_size=meta["shape"][1], in_channels=meta["shape"][0],
                    feature_dim=meta["feature_dim"], predict=args.get("predict", "v"),
                    time_scale=args.get("time_scale", 1000.0), x_floor=args.get("x_floor", 0.25),
                    d_embedding=args.get("d_embedding", "value")).to(device)
        model.load_state_dict(ckpt[{"ema": "ema", "online": "model"}[weights]])
    except Exception as e:  # missing keys, shape mismatch ...
        raise SystemExit(f"error: cannot load checkpoint {path}: {str(e).splitlines()[0]}")
    return model.eval(), ckpt


AMP = ["auto", "bf16", "fp32"]  # --amp of train.py and sample.py


def autocast(device, amp="auto"):
    """The precision of the model's forward passes: bf16 autocast (tensor cores; weights, optimizer, EMA and Euler
    updates stay fp32) or plain fp32. "auto": bf16 on CUDA, fp32 on a CPU, where bf16 matmuls are slow (hundreds of
    times on one without AMX). A CPU's bf16 autocast applies CUDA's casting rules, so --amp bf16 on a CPU runs the
    GPU's dtype path (test_amp.py)."""
    device_type = torch.device(device).type
    if amp == "bf16" or (amp == "auto" and device_type == "cuda"):
        return torch.autocast(device_type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def is_unconditional(ckpt):
    """A model trained with train.py --unconditional: every row had the null caption (the paper's CelebA-HQ run)."""
    return ckpt["args"].get("unconditional", False)


if __name__ == "__main__":
    for name, size in DiT_models.items():
        model = DiT(**size, input_size=32, in_channels=4, feature_dim=512)
        n = sum(p.numel() for p in model.parameters())
        x = torch.randn(2, 4, 32, 32)
        with torch.no_grad():
            v = model(x, torch.rand(2), torch.tensor([1.0, 1 / 128]), torch.randn(2, 512))
        print(f"{name:9s} {n / 1e6:7.1f}M params {model.flops_per_image() / 1e9:6.1f} GFLOPs/image  "
              f"x {tuple(x.shape)} -> v {tuple(v.shape)}")
