"""A small DeepSeek-Sparse-Attention (DSA) causal language model in plain PyTorch.

Per layer, as in DeepSeek-V3.2 but small:

- MLA attention in the absorbed / MQA form: every token writes one shared latent row
  ``[c | k_rope]`` (``d_latent + d_rope`` values); every query head scores ``q_h . row`` and reads
  ``V = c`` (the sparse MLA kernels' layout: 576 = 512 latent + 64 rope in the real model).
- A lightning indexer: ``H_idx`` heads of ``D_idx`` dims (the ops accept H in {32, 64} and D in
  {64, 128}), per-token head weights,
  ``I[t, s] = sum_h w[t, h] H^-1/2 D^-1/2 relu(q[t, h] . k[s])``.
  Its input is detached, as in DeepSeek-V3.2: the indexer learns only from its KL loss.
- Top-k selection on the FP8 path of the real model: Hadamard-rotated q and k quantised to e4m3
  (one power-of-two scale per (token, head) for q, per token for k) with
  :mod:`indexcache_ops.quant`, the q scale folded into the head weights, then this package's
  ``indexer_topk`` op; see :func:`select_topk`.
- Sparse attention over the selected keys in differentiable torch (the package's attention ops
  are forward-only), so the model trains.
- IndexCache: an :class:`~indexcache_ops.reuse.IndexCacheConfig` decides per layer whether it
  runs its own indexer (Full) or reuses the indices of its source layer (Shared, no indexer run).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn
from torch import Tensor

from indexcache_ops import ops, quant
from indexcache_ops.reuse import IndexCacheConfig

__all__ = ["DSAConfig", "MAIN", "TINY", "TinyDSA", "Trace", "select_topk", "sparse_attention"]


@dataclass(frozen=True)
class DSAConfig:
    """Shapes of :class:`TinyDSA`. ``context`` is the training sequence length; ``topk`` keys per
    query are attended to in sparse mode (queries with fewer visible keys attend to all)."""

    n_layers: int = 16
    d_model: int = 256
    n_heads: int = 4
    d_latent: int = 128
    d_rope: int = 32
    d_ff: int = 1024
    idx_heads: int = 32
    idx_dim: int = 64
    idx_rope: int = 32
    topk: int = 128
    context: int = 1024
    vocab: int = 256


# Main config: one H100, a few minutes. 16 layers rather than 8 so that 1/8 retention keeps two
# Full layers and the greedy search has a choice to make there (with 8, 1/8 is layer 0 alone).
MAIN = DSAConfig()
# CPU config: a handful of steps in seconds. The indexer shape stays at the ops' smallest
# supported one (32 heads x 64 dims).
TINY = DSAConfig(n_layers=4, d_model=64, n_heads=2, d_latent=32, d_rope=16, d_ff=256, topk=16,
                 context=128)


def rope_tables(length: int, dim: int, base: float = 10000.0) -> tuple[Tensor, Tensor]:
    """cos, sin ``[length, dim / 2]`` of rotary embeddings (rotate-half convention)."""
    inv_freq = base ** (-torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    angles = torch.arange(length, dtype=torch.float32)[:, None] * inv_freq[None, :]
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x`` ``[B, L, ..., dim]`` by position ``l`` (cos/sin ``[>= L, dim / 2]``)."""
    length = x.shape[1]
    shape = (length,) + (1,) * (x.dim() - 3) + (-1,)
    cos, sin = cos[:length].view(shape), sin[:length].view(shape)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


# ---- selection --------------------------------------------------------------------------------

# (q_fp8, k_fp8, k_scale, weights, topk) -> indices, the signature of select_topk.
Selector = Callable[[Tensor, Tensor, Tensor, Tensor, int], Tensor]


def select_topk(q_fp8: Tensor, k_fp8: Tensor, k_scale: Tensor, weights: Tensor,
                topk: int) -> Tensor:
    """Causal top-k per sequence through ``ops.indexer_topk``: q ``[B, L, H, D]`` e4m3, k
    ``[B, L, D]`` e4m3, k_scale ``[B, L]``, folded weights ``[B, L, H]`` -> ``[B, L, topk]`` int32
    positions, -1 padded."""
    length = q_fp8.shape[1]
    ks = torch.zeros(length, dtype=torch.int32, device=q_fp8.device)
    ke = torch.arange(1, length + 1, dtype=torch.int32, device=q_fp8.device)
    # One op call per sequence: a flattened batch would score [B*L, B*L] keys of which only the
    # B diagonal blocks are visible.
    return torch.stack([ops.indexer_topk(q_fp8[b], k_fp8[b], k_scale[b], weights[b], ks, ke, topk)
                        for b in range(q_fp8.shape[0])])


# ---- attention --------------------------------------------------------------------------------

def selection_mask(indices: Tensor, num_keys: int) -> Tensor:
    """``[B, S, k]`` key indices (-1 = none) -> ``[B, S, N]`` bool, True at the selected keys."""
    # Padding scatters into an extra column that is cut off, so -1 marks nothing.
    target = torch.where(indices >= 0, indices, num_keys).long()
    mask = torch.zeros(*indices.shape[:2], num_keys + 1, dtype=torch.bool, device=indices.device)
    return mask.scatter_(2, target, True)[..., :num_keys]


def sparse_attention(q: Tensor, kv: Tensor, indices: Optional[Tensor], sm_scale: float,
                     d_v: int) -> tuple[Tensor, Tensor]:
    """MLA attention, absorbed/MQA form, over the selected keys (``sparse_mla_prefill``'s math).

    ``out[b, s, h] = sum_n softmax_n(sm_scale * q[b, s, h] . kv[b, n]) * kv[b, n, :d_v]`` over the
    keys in ``indices[b, s]`` (-1 skipped; distinct indices, as top-k gives), or over the causal
    keys ``n <= s`` when ``indices`` is None (dense attention, S == N). Computed as a masked dense
    product: at this size (N <= 2048) it is cheaper than gathering k rows per query, its backward
    needs no scatter-add, and the softmax over the selected keys is the same.

    Args:
        q: ``[B, S, H, Dqk]``; kv: ``[B, N, Dqk]``, its first ``d_v`` dims are also V.
        indices: ``[B, S, k]`` integer key indices, every row with at least one valid one, or None.
    Returns:
        ``out [B, S, H, d_v]`` and the float32 probabilities ``[B, H, S, N]``.
    """
    num_q, num_keys = q.shape[1], kv.shape[1]
    scores = torch.einsum("bshd,bnd->bhsn", q, kv).float() * sm_scale
    if indices is None:
        visible = torch.ones(num_q, num_keys, dtype=torch.bool, device=q.device).tril()
    else:
        visible = selection_mask(indices, num_keys)[:, None]
    probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
    out = torch.einsum("bhsn,bnd->bshd", probs.to(kv.dtype), kv[..., :d_v])
    return out, probs


class MLAttention(nn.Module):
    def __init__(self, cfg: DSAConfig):
        super().__init__()
        self.cfg = cfg
        self.d_qk = cfg.d_latent + cfg.d_rope
        self.wq = nn.Linear(cfg.d_model, cfg.n_heads * self.d_qk, bias=False)
        self.wkv = nn.Linear(cfg.d_model, self.d_qk, bias=False)
        self.kv_norm = nn.RMSNorm(cfg.d_latent)
        self.wo = nn.Linear(cfg.n_heads * cfg.d_latent, cfg.d_model, bias=False)

    def forward(self, h: Tensor, rope: tuple[Tensor, Tensor], indices: Optional[Tensor],
                teacher: Optional[str]) -> tuple[Tensor, Optional[Tensor]]:
        """Attention output and, when ``teacher`` is "used" (the distribution applied) or "dense"
        (over every visible key), the head-summed detached probabilities ``[B * L, L]``."""
        cfg, (B, L, _) = self.cfg, h.shape
        q = self.wq(h).view(B, L, cfg.n_heads, self.d_qk)
        q = torch.cat((q[..., :cfg.d_latent], apply_rope(q[..., cfg.d_latent:], *rope)), dim=-1)
        c, k_rope = self.wkv(h).split((cfg.d_latent, cfg.d_rope), dim=-1)
        kv = torch.cat((self.kv_norm(c), apply_rope(k_rope, *rope)), dim=-1)
        scale = self.d_qk ** -0.5
        out, probs = sparse_attention(q, kv, indices, scale, cfg.d_latent)
        attention = None
        if teacher == "dense" and indices is not None:
            with torch.no_grad():
                attention = sparse_attention(q, kv, None, scale, cfg.d_latent)[1].sum(1)
        elif teacher is not None:
            attention = probs.detach().sum(1)
        if attention is not None:
            attention = attention.reshape(B * L, L)
        return self.wo(out.reshape(B, L, -1)), attention


class Indexer(nn.Module):
    """Lightning indexer: ``I[t, s] = sum_h w[t, h] H^-1/2 D^-1/2 relu(q[t, h] . k[s])``."""

    def __init__(self, cfg: DSAConfig):
        super().__init__()
        self.cfg = cfg
        self.wq = nn.Linear(cfg.d_model, cfg.idx_heads * cfg.idx_dim, bias=False)
        self.wk = nn.Linear(cfg.d_model, cfg.idx_dim, bias=False)
        self.k_norm = nn.LayerNorm(cfg.idx_dim)
        self.weights_proj = nn.Linear(cfg.d_model, cfg.idx_heads, bias=False)

    def project(self, h: Tensor, rope: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """q ``[B, L, H, D]``, k ``[B, L, D]`` (rope on their first ``idx_rope`` dims) and the head
        weights w ``[B, L, H]``."""
        cfg, (B, L, _) = self.cfg, h.shape
        r = cfg.idx_rope
        q = self.wq(h).view(B, L, cfg.idx_heads, cfg.idx_dim)
        k = self.k_norm(self.wk(h))
        q = torch.cat((apply_rope(q[..., :r], *rope), q[..., r:]), dim=-1)
        k = torch.cat((apply_rope(k[..., :r], *rope), k[..., r:]), dim=-1)
        return q, k, self.weights_proj(h)

    def scores(self, q: Tensor, k: Tensor, w: Tensor) -> Tensor:
        """Differentiable scores ``[B * L, L]`` (all key columns; callers mask) for the KL loss."""
        B, L, H, D = q.shape
        dots = torch.einsum("bthd,bsd->bths", q, k).relu()
        # [1, H] @ [H, L] per query: the head sum without an einsum's permuted copy of `dots`,
        # the largest tensor of the step ([B, L, H, L]).
        return ((w.unsqueeze(2) @ dots).squeeze(2) * (H * D) ** -0.5).reshape(B * L, L)

    @torch.no_grad()
    def select(self, q: Tensor, k: Tensor, w: Tensor, topk: int, selector: Selector) -> Tensor:
        """The FP8 selection path: ``[B, L, topk]`` int32 positions, -1 padded."""
        H, D = self.cfg.idx_heads, self.cfg.idx_dim
        with torch.autocast(q.device.type, enabled=False):
            # Hadamard rotation spreads outliers across the block before e4m3 quantisation;
            # power-of-two scales as in DeepSeek-V3.2.
            q_fp8, q_scale = quant.quantize_fp8_per_block(quant.hadamard(q.float()), D, True)
            k_fp8, k_scale = quant.quantize_fp8_per_block(quant.hadamard(k.float()), D, True)
            weights = quant.fold_indexer_weights(w.float(), q_scale, H, D)
            return selector(q_fp8, k_fp8, k_scale.squeeze(-1).contiguous(), weights, topk)


class Block(nn.Module):
    def __init__(self, cfg: DSAConfig):
        super().__init__()
        self.norm1 = nn.RMSNorm(cfg.d_model)
        self.attn = MLAttention(cfg)
        self.indexer = Indexer(cfg)
        self.norm2 = nn.RMSNorm(cfg.d_model)
        self.mlp = nn.Sequential(nn.Linear(cfg.d_model, cfg.d_ff, bias=False), nn.GELU(),
                                 nn.Linear(cfg.d_ff, cfg.d_model, bias=False))


@dataclass
class Trace:
    """What one forward pass produced, per layer.

    Attributes:
        logits: ``[B, L, vocab]``.
        indices: ``[B, L, topk]`` int32 selected positions (a Shared layer holds its source
            layer's tensor); None in dense mode.
        indexer_scores: differentiable ``[B * L, L]`` scores of the layers that ran their indexer,
            when asked for; else None.
        attention: detached head-summed ``[B * L, L]`` attention (the KL teacher), when asked for.
    """

    logits: Tensor
    indices: list[Optional[Tensor]]
    indexer_scores: list[Optional[Tensor]]
    attention: list[Optional[Tensor]]


class TinyDSA(nn.Module):
    def __init__(self, cfg: DSAConfig, selector: Optional[Selector] = None):
        super().__init__()
        self.cfg = cfg
        # Top-k selection of the Full layers: select_topk unless another callable of its signature
        # is given (or assigned later, e.g. to count calls).
        self.selector: Selector = selector or select_topk
        self.embed = nn.Embedding(cfg.vocab, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab, bias=False)
        self.head.weight = self.embed.weight
        for name, cos_sin in (("attn", rope_tables(cfg.context, cfg.d_rope)),
                              ("idx", rope_tables(cfg.context, cfg.idx_rope))):
            self.register_buffer(f"{name}_cos", cos_sin[0], persistent=False)
            self.register_buffer(f"{name}_sin", cos_sin[1], persistent=False)
        self.apply(self._init)
        # Residual branches start small (GPT-2's depth scaling) so deep stacks train stably.
        for block in self.blocks:
            for proj in (block.attn.wo, block.mlp[2]):
                nn.init.normal_(proj.weight, std=0.02 / math.sqrt(2 * cfg.n_layers))

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)

    def indexer_parameters(self, layers=None) -> list[nn.Parameter]:
        layers = range(self.cfg.n_layers) if layers is None else layers
        return [p for layer in layers for p in self.blocks[layer].indexer.parameters()]

    def forward(self, tokens: Tensor, index_config: Optional[IndexCacheConfig] = None, *,
                indexer_scores: bool = False, teacher: Optional[str] = None) -> Trace:
        """Run the model.

        Args:
            tokens: ``[B, L]`` int64 bytes, ``L <= cfg.context``.
            index_config: None: dense causal attention everywhere (the indexers run only to give
                scores when ``indexer_scores``). Else sparse top-k attention; Full layers run their
                indexer and select, Shared layers reuse their source layer's indices and run none.
            indexer_scores: also return the differentiable indexer scores of the layers that run
                their indexer (every layer in dense mode).
            teacher: None, "used" or "dense": return each layer's head-summed attention, the one
                applied or the one over every visible key.
        """
        if index_config is not None and index_config.num_hidden_layers != self.cfg.n_layers:
            raise ValueError(f"index_config: expected {self.cfg.n_layers} layers, got "
                             f"{index_config.num_hidden_layers}")
        attn_rope = (self.attn_cos, self.attn_sin)
        idx_rope = (self.idx_cos, self.idx_sin)
        x = self.embed(tokens)
        trace = Trace(None, [], [], [])
        selected: dict[int, Tensor] = {}
        for layer, block in enumerate(self.blocks):
            h = block.norm1(x)
            runs_indexer = (index_config.needs_indexer(layer) if index_config is not None
                            else indexer_scores)
            scores = None
            if runs_indexer:
                q, k, w = block.indexer.project(h.detach(), idx_rope)
                if index_config is not None:
                    selected[layer] = block.indexer.select(q, k, w, self.cfg.topk, self.selector)
                if indexer_scores:
                    scores = block.indexer.scores(q, k, w)
            indices = (selected[index_config.source_layer(layer)] if index_config is not None
                       else None)
            out, attention = block.attn(h, attn_rope, indices, teacher)
            x = x + out
            x = x + block.mlp(block.norm2(x))
            trace.indices.append(indices)
            trace.indexer_scores.append(scores)
            trace.attention.append(attention)
        trace.logits = self.head(self.norm(x))
        return trace
