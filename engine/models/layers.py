"""Building blocks of the MoE decoder, in our own torch modules.

T = tokens, D = hidden, E = experts, K = experts per token, I = expert intermediate,
H = query heads, G = KV heads, Dh = head dim.
"""
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import kernels
from engine.attention import ForwardBatch, paged_attention, write_kv
from engine.models.spec import ModelSpec
from engine.parallel.shard import SINGLE, Shard
from kernels.attention.norm_rope import fused_add_rms_norm, qkv_rope_write_, rms_norm, rotary_ref
from kernels.moe.router import route_topk


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size), requires_grad=False)
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)  # its torch twin off the Triton path

    def add_forward(self, x: Tensor, residual: Tensor) -> tuple[Tensor, Tensor]:
        """(norm(residual + x), residual + x): one launch on Triton, which updates residual in place."""
        if kernels.use_triton(x):
            return fused_add_rms_norm(x, residual, self.weight, self.eps), residual
        residual = residual + x
        return self(residual), residual


class SplitRMSNorm(RMSNorm):
    """RMSNorm over a vector split across ranks (OLMoE's q/k norm over all heads under tensor
    parallelism): the mean of squares is summed over the ranks, so each rank normalises its
    heads exactly as the whole vector would be."""

    def __init__(self, size: int, eps: float, full_size: int, shard: Shard):
        super().__init__(size, eps)
        self.full_size, self.shard = full_size, shard

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        squares = self.shard.all_reduce_(x32.pow(2).sum(-1, keepdim=True), across_tp=True)
        return (self.weight * (x32 * torch.rsqrt(squares / self.full_size + self.eps)).to(x.dtype)).to(x.dtype)


class LoRALinear(nn.Module):
    """y = x W^T (+ b), plus each token's adapter delta from the slot pool `lora` (if any)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        self.lora: kernels.DenseLoRAWeights | None = None

    def forward(self, x: Tensor, slot_ids: Tensor | None, layout=None) -> Tensor:
        """layout: the step's kernels.dense_lora_layout of slot_ids, or None to align here."""
        return kernels.linear_lora(x, self.weight, self.bias, self.lora, slot_ids, layout)


class Rotary(nn.Module):
    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: Tensor, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        """positions [T]; q [T, H, Dh], k [T, G, Dh] -> rotated copies (torch path)."""
        return rotary_ref(positions, self.inv_freq, q, k)


class Attention(nn.Module):
    """Self-attention over this rank's heads (all of them on one rank); o's output is summed
    over the ranks (engine.parallel.shard)."""

    def __init__(self, spec: ModelSpec, shard: Shard = SINGLE):
        super().__init__()
        h, g = shard.heads(spec.num_heads)[1], shard.heads(spec.num_kv_heads)[1]
        dh, d = spec.head_dim, spec.hidden_size
        self.shard = shard
        self.num_heads, self.num_kv_heads, self.head_dim = h, g, dh
        self.q_proj = LoRALinear(d, h * dh, spec.attention_bias)
        self.k_proj = LoRALinear(d, g * dh, spec.attention_bias)
        self.v_proj = LoRALinear(d, g * dh, spec.attention_bias)
        self.o_proj = LoRALinear(h * dh, d, spec.attention_bias)
        self.qk_norm = spec.qk_norm
        if spec.qk_norm == "head":
            self.q_norm, self.k_norm = RMSNorm(dh, spec.rms_norm_eps), RMSNorm(dh, spec.rms_norm_eps)
        elif spec.qk_norm == "full" and shard.tp > 1:
            self.q_norm = SplitRMSNorm(h * dh, spec.rms_norm_eps, spec.num_heads * dh, shard)
            self.k_norm = SplitRMSNorm(g * dh, spec.rms_norm_eps, spec.num_kv_heads * dh, shard)
        elif spec.qk_norm == "full":
            self.q_norm, self.k_norm = RMSNorm(h * dh, spec.rms_norm_eps), RMSNorm(g * dh, spec.rms_norm_eps)
        self.clip_qkv = spec.clip_qkv
        self.sliding_window = spec.sliding_window
        self.rotary = Rotary(dh, spec.rope_theta)
        self.k_cache: Tensor | None = None  # [N, S, G, Dh], bound by ModelRunner
        self.v_cache: Tensor | None = None
        # q/k/v run as one GEMM over qkv_weight, which fuse_qkv builds once the weights are in
        # (load_model calls it); their LoRA runs as one group (SlotPools sets qkv_lora)
        self.qkv_weight: Tensor | None = None  # [H*Dh + 2*G*Dh, D]
        self.qkv_bias: Tensor | None = None
        self.qkv_lora: kernels.DenseLoRAGroup | None = None

    @torch.no_grad()
    def fuse_qkv(self) -> None:
        """Concatenate the loaded q/k/v weights into one [H*Dh + 2*G*Dh, D] matrix; the three
        projections' weights become views of it (no second copy)."""
        projections = (self.q_proj, self.k_proj, self.v_proj)
        self.qkv_weight = torch.cat([p.weight for p in projections])
        if self.q_proj.bias is not None:
            self.qkv_bias = torch.cat([p.bias for p in projections])
        start = 0
        for p in projections:
            n = p.weight.shape[0]
            p.weight = nn.Parameter(self.qkv_weight[start:start + n], requires_grad=False)
            if self.qkv_bias is not None:
                p.bias = nn.Parameter(self.qkv_bias[start:start + n], requires_grad=False)
            start += n

    def _project_qkv(self, x: Tensor, batch: ForwardBatch) -> tuple[Tensor, Tensor, Tensor]:
        """[T, H*Dh], [T, G*Dh], [T, G*Dh]: column views of the one fused output."""
        out = kernels.linear_lora(x, self.qkv_weight, self.qkv_bias, self.qkv_lora, batch.lora_slot_ids,
                                  batch.lora_layout)
        nq, nkv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return out[:, :nq], out[:, nq:nq + nkv], out[:, nq + nkv:]

    def _qkv(self, x: Tensor, batch: ForwardBatch, head_norm: bool = True) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v = self._project_qkv(x, batch)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip_qkv is not None:
            q, k, v = (t.clamp(-self.clip_qkv, self.clip_qkv) for t in (q, k, v))
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.qk_norm == "head" and head_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v

    def _fused_qkv_rope_write(self, x: Tensor, batch: ForwardBatch) -> Tensor:
        """Triton path: per-head norm (Qwen3) and rotary of q and k, and k and v into the KV
        cache, in one launch; returns q."""
        q, k, v = self._qkv(x, batch, head_norm=False)
        weights = (self.q_norm.weight, self.k_norm.weight) if self.qk_norm == "head" else (None, None)
        eps = self.q_norm.eps if self.qk_norm == "head" else 0.0
        return qkv_rope_write_(batch.positions, self.rotary.inv_freq, q, k, v, self.k_cache, self.v_cache,
                               batch.slot_mapping, *weights, eps)

    def forward(self, x: Tensor, batch: ForwardBatch) -> Tensor:
        if kernels.use_triton(x):
            q = self._fused_qkv_rope_write(x, batch)
        else:
            q, k, v = self._qkv(x, batch)
            q, k = self.rotary(batch.positions, q, k)
            write_kv(self.k_cache, self.v_cache, k, v, batch)
        out = paged_attention(q, self.k_cache, self.v_cache, batch, self.head_dim ** -0.5,
                              self.sliding_window)
        out = self.o_proj(out.reshape(x.shape[0], -1), batch.lora_slot_ids, batch.lora_layout)
        return self.shard.all_reduce_(out, across_tp=True)


class DenseMLP(nn.Module):
    def __init__(self, hidden: int, inter: int, shard: Shard = SINGLE):
        super().__init__()
        inter = shard.dense_inter(inter)[1]
        self.shard = shard
        self.gate_proj, self.up_proj = LoRALinear(hidden, inter), LoRALinear(hidden, inter)
        self.down_proj = LoRALinear(inter, hidden)

    def forward(self, x: Tensor, slots: Tensor | None) -> Tensor:
        out = self.down_proj(F.silu(self.gate_proj(x, slots)) * self.up_proj(x, slots), slots)
        return self.shard.all_reduce_(out, across_tp=True)


class SparseMoE(nn.Module):
    """Router + experts stacked [E, 2I, D] / [E, D, I]; LoRA through virtual experts.

    On a rank of a multi-GPU replica the router stays whole and the stacks hold the rank's
    experts [E/N, ..] (expert parallel) or each expert's intermediate span [E, 2I/N, D] /
    [E, D, I/N] (tensor parallel); the output is summed over the ranks."""

    def __init__(self, spec: ModelSpec, shard: Shard = SINGLE):
        super().__init__()
        d = spec.hidden_size
        self.first_expert, e = shard.experts(spec.num_experts)
        i = shard.expert_inter(spec.moe_intermediate_size)[1]
        self.shard = shard
        self.top_k, self.norm_topk_prob = spec.top_k, spec.norm_topk_prob
        self.router = nn.Parameter(torch.empty(spec.num_experts, d), requires_grad=False)
        self.w_gate_up = nn.Parameter(torch.empty(e, 2 * i, d), requires_grad=False)
        self.w_down = nn.Parameter(torch.empty(e, d, i), requires_grad=False)
        self.lora: kernels.MoELoRAWeights | None = None
        self.per_adapter_loop = False  # benchmark baseline: one fused_moe per adapter in the batch

    def route(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(weights [T, K] in x's dtype, expert ids [T, K]): fp32 softmax over the router logits,
        top-k, renormalised when the family says so; one launch on Triton."""
        return route_topk(F.linear(x, self.router), self.top_k, self.norm_topk_prob, x.dtype)

    def forward(self, x: Tensor, slots: Tensor | None) -> Tensor:
        weights, ids = self.route(x)
        if self.shard.experts_split:
            weights, ids = self._local_routes(weights, ids)
        if self.lora is None or slots is None:
            out = kernels.fused_moe(x, self.w_gate_up, self.w_down, weights, ids)
        elif self.per_adapter_loop:
            out = self._loop_over_adapters(x, weights, ids, slots)
        else:
            out = kernels.fused_moe(x, self.w_gate_up, self.w_down, weights, ids, self.lora, slots)
        return self.shard.all_reduce_(out)

    def _local_routes(self, weights: Tensor, ids: Tensor) -> tuple[Tensor, Tensor]:
        """Routes to this rank's experts as local ids; a route to another rank's expert becomes
        a zero-weight route to local expert 0 (no shape depends on routing, so a decode step
        stays one CUDA graph; the cost is that every rank computes every route)."""
        local = ids - self.first_expert
        mine = (local >= 0) & (local < self.w_down.shape[0])
        return torch.where(mine, weights, torch.zeros_like(weights)), torch.where(mine, local, torch.zeros_like(local))

    def _loop_over_adapters(self, x: Tensor, weights: Tensor, ids: Tensor, slots: Tensor) -> Tensor:
        """Baseline the virtual experts replace: one MoE call for base tokens, one per adapter."""
        out = torch.empty_like(x)
        for slot in torch.unique(slots).tolist():  # a host sync per layer, as such loops have
            rows = (slots == slot).nonzero().squeeze(1)
            lora = None if slot < 0 else self.lora
            slot_ids = None if slot < 0 else slots[rows]
            out[rows] = kernels.fused_moe(x[rows], self.w_gate_up, self.w_down, weights[rows],
                                          ids[rows], lora, slot_ids)
        return out
