"""Model FLOPs per byte and MFU, by one documented rule (BLT_NOTES section 3).

Convention (torchtitan / picotron): a matmul of (m x k) by (k x n) is 2mkn FLOPs; attention
scores count QK^T and AV over the whole visible context with no causal halving
(4 x context x dim per layer); embedding lookups, norms and activations count zero; training is
3 x forward. Per byte, with average patch length a and S = cross_attn_k slots per patch:

- local encoder and decoder layers: 2 x layer parameters + 4 x min(window, seq_len) x local_dim;
- cross-attention: projections applied per byte count once per byte, those applied per slot
  count S / a per byte; scores 4 x local_dim x S per byte (every byte meets S slots);
- patch-to-slot projections and the global transformer count once per patch, so / a; the
  global context is seq_len / a patches;
- the output head 2 x local_dim x vocab.

The byte LM (arch entropy, bytelm) counts per byte like a local layer with its own window; the
BPE LM (tokenlm) counts the same per token, over a context of seq_len / (bytes per token) tokens,
and divides by the bytes per token it measured: FLOPs per byte for every model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bltdist.config import BLTConfig, EntropyModelConfig

# Dense bf16 peak TFLOP/s by a substring of torch.cuda.get_device_name(); first match wins.
PEAK_TFLOPS = (
    ("H200", 989.5),
    ("H100", 989.5),
    ("A100", 312.0),
)


def _block_params(dim: int, heads: int, kv_heads: int | None, ffn_dim: int | None) -> int:
    kv_dim = (kv_heads or heads) * (dim // heads)
    ffn = ffn_dim or int(8 * dim / 3)
    return 2 * dim * dim + 2 * dim * kv_dim + 3 * dim * ffn


def blt_forward_flops_per_byte(cfg: BLTConfig, seq_len: int, avg_patch_len: float,
                               avg_super_patch_len: float | None = None) -> float:  # fmt: skip
    """``avg_super_patch_len``: patches per super-patch on average (model.blt.super_patch), measured
    where the patcher groups them (mode entropy); None = patches_per_super_patch (mode static)."""
    d, slots, a = cfg.local_dim, cfg.cross_attn_k, avg_patch_len
    kv_dim = (cfg.local_kv_heads or cfg.local_heads) * (d // cfg.local_heads)
    local_context = min(cfg.local_window or seq_len, seq_len)

    encoder = cfg.encoder_layers * (
        2 * _block_params(d, cfg.local_heads, cfg.local_kv_heads, cfg.encoder_ffn_dim) + 4 * local_context * d
    )
    decoder = cfg.decoder_layers * (
        2 * _block_params(d, cfg.local_heads, cfg.local_kv_heads, cfg.decoder_ffn_dim) + 4 * local_context * d
    )
    encoder_cross_layers = cfg.encoder_layers if cfg.encoder_cross_attn_all_layers else 1
    decoder_cross_layers = cfg.decoder_layers if cfg.decoder_cross_attn_all_layers else 1
    # Encoder: keys/values from bytes, queries/outputs per slot. Decoder: the other way round.
    encoder_cross = encoder_cross_layers * (2 * 2 * d * kv_dim + 2 * 2 * d * d * slots / a + 4 * d * slots)
    decoder_cross = decoder_cross_layers * (2 * 2 * d * d + 2 * 2 * d * kv_dim * slots / a + 4 * d * slots)
    slot_projections = (2 * d * slots * d + 2 * cfg.global_dim * slots * d) / a

    global_in = slots * d * cfg.global_dim if slots * d != cfg.global_dim else 0
    global_params = global_in + cfg.global_layers * _block_params(
        cfg.global_dim, cfg.global_heads, cfg.global_kv_heads, cfg.global_ffn_dim
    )
    global_context = seq_len / a
    global_model = (2 * global_params + 4 * global_context * cfg.global_dim * cfg.global_layers) / a
    if cfg.super_patch.enabled:
        per_patch = super_patch_forward_flops_per_patch(cfg, global_context, avg_super_patch_len)
        global_model = (2 * global_in + per_patch) / a

    head = 2 * d * cfg.vocab_size
    return encoder + decoder + encoder_cross + decoder_cross + slot_projections + global_model + head


def super_patch_forward_flops_per_patch(cfg: BLTConfig, patch_context: float,
                                        avg_super_patch_len: float | None = None) -> float:  # fmt: skip
    """The two-level global model (model.blt.super_patch) per patch, by the byte level's rules one
    level up: patch-level layers and cross-attention per patch or per slot, with n patches per
    super-patch (``avg_super_patch_len``, else patches_per_super_patch, fewer where documents start),
    and the super-patch transformer per super-patch (/ n), over a context of patch_context / n."""
    g, sp = cfg.global_dim, cfg.super_patch
    n, slots = avg_super_patch_len or sp.patches_per_super_patch, sp.cross_attn_k
    kv_dim = (cfg.global_kv_heads or cfg.global_heads) * (g // cfg.global_heads)
    block = 2 * _block_params(g, cfg.global_heads, cfg.global_kv_heads, cfg.global_ffn_dim)
    patch_layers = (sp.encoder_layers + sp.decoder_layers) * (block + 4 * patch_context * g)
    encoder_cross = 2 * 2 * g * kv_dim + 2 * 2 * g * g * slots / n + 4 * g * slots
    decoder_cross = 2 * 2 * g * g + 2 * 2 * g * kv_dim * slots / n + 4 * g * slots
    slot_projections = 2 * 2 * g * slots * g / n
    super_in = 2 * slots * g * g / n if slots != 1 else 0
    super_layers = cfg.global_layers * (block + 4 * patch_context / n * g) / n
    return patch_layers + encoder_cross + decoder_cross + slot_projections + super_in + super_layers


def byte_lm_forward_flops_per_byte(cfg: EntropyModelConfig, seq_len: int) -> float:
    context = min(cfg.window or seq_len, seq_len)
    per_layer = 2 * _block_params(cfg.dim, cfg.heads, cfg.kv_heads, cfg.ffn_dim) + 4 * context * cfg.dim
    return cfg.layers * per_layer + 2 * cfg.dim * cfg.vocab_size


def token_lm_forward_flops_per_byte(cfg: EntropyModelConfig, seq_len: int, bytes_per_token: float) -> float:
    """The plain transformer over tokens of ``bytes_per_token`` bytes on average: per token as over
    bytes, with a context of seq_len / bytes_per_token tokens, then / bytes_per_token."""
    return byte_lm_forward_flops_per_byte(cfg, max(1, round(seq_len / bytes_per_token))) / bytes_per_token


def training_flops_per_byte(model_cfg, seq_len: int, avg_patch_len: float,
                            avg_super_patch_len: float | None = None) -> float:  # fmt: skip
    """3 x forward FLOPs per byte for ``model_cfg`` (a ModelConfig of any arch). ``avg_patch_len``:
    bytes per patch for blt, bytes per BPE token for tokenlm (its tokens are its patches);
    ``avg_super_patch_len``: see ``blt_forward_flops_per_byte``."""
    if model_cfg.arch in ("entropy", "bytelm"):
        return 3 * byte_lm_forward_flops_per_byte(model_cfg.entropy, seq_len)
    if model_cfg.arch == "tokenlm":
        return 3 * token_lm_forward_flops_per_byte(model_cfg.plain_lm(), seq_len, avg_patch_len)
    return 3 * blt_forward_flops_per_byte(model_cfg.blt, seq_len, avg_patch_len, avg_super_patch_len)


def peak_tflops(device_name: str, override: float | None) -> float | None:
    """Peak dense bf16 TFLOP/s of one device; None when unknown (CPU without an override)."""
    if override is not None:
        return override
    for key, peak in PEAK_TFLOPS:
        if key in device_name:
            return peak
    return None
