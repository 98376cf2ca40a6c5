"""MoECausalLM: one decoder for Qwen3-MoE, Mixtral and OLMoE (differences live in ModelSpec)."""
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import kernels
from engine.attention import ForwardBatch
from engine.models.layers import Attention, DenseMLP, RMSNorm, SparseMoE
from engine.models.spec import ModelSpec
from engine.parallel.shard import SINGLE, Shard


class DecoderLayer(nn.Module):
    def __init__(self, spec: ModelSpec, layer: int, shard: Shard = SINGLE):
        super().__init__()
        self.self_attn = Attention(spec, shard)
        if spec.is_moe_layer(layer):
            self.mlp = SparseMoE(spec, shard)
        else:
            self.mlp = DenseMLP(spec.hidden_size, spec.intermediate_size, shard)
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)

    def forward(self, h: Tensor, residual: Tensor, batch: ForwardBatch,
                next_norm: RMSNorm) -> tuple[Tensor, Tensor]:
        """h = input_layernorm(residual) on entry; returns (next_norm(residual'), residual').

        Each residual add is fused with the norm after it (one launch on Triton), so the next
        layer's input_layernorm (or the final norm) runs here as `next_norm`.
        """
        h, residual = self.post_attention_layernorm.add_forward(self.self_attn(h, batch), residual)
        return next_norm.add_forward(self.mlp(h, batch.lora_slot_ids), residual)


class MoECausalLM(nn.Module):
    """The whole model, or one rank's part of it (`shard`, engine.parallel.shard): its heads,
    its experts, its rows of lm_head; embeddings and norms whole on every rank."""

    def __init__(self, spec: ModelSpec, shard: Shard = SINGLE):
        super().__init__()
        self.spec, self.shard = spec, shard
        self.vocab_start, self.vocab_rows = shard.vocab(spec.vocab_size)
        self.embed_tokens = nn.Parameter(torch.empty(spec.vocab_size, spec.hidden_size), requires_grad=False)
        self.layers = nn.ModuleList(DecoderLayer(spec, i, shard) for i in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.lm_head = None if spec.tie_word_embeddings else nn.Parameter(
            torch.empty(self.vocab_rows, spec.hidden_size), requires_grad=False)

    def forward(self, input_ids: Tensor, batch: ForwardBatch) -> Tensor:
        """input_ids [T] -> final hidden states [T, D]."""
        h, residual = self.embed(input_ids, batch)
        return self.run_layers(h, residual, batch, 0, len(self.layers))[0]

    def embed(self, input_ids: Tensor, batch: ForwardBatch) -> tuple[Tensor, Tensor]:
        """(input_layernorm of layer 0 (or the final norm), residual) of input_ids [T]; sets the
        step's shared dense LoRA layout on batch."""
        residual = F.embedding(input_ids, self.embed_tokens)  # [T, D], updated in place on Triton
        batch.kv_index = None  # this step's, from its slot_mapping (write_kv): a batch object can serve many steps
        if not self.layers:
            return self.norm(residual), residual
        pool = self.layers[0].self_attn.o_proj.lora
        if batch.lora_slot_ids is not None and pool is not None:  # one alignment for every q/k/v/o
            batch.lora_layout = kernels.dense_lora_layout(batch.lora_slot_ids, pool.num_slots, pool.a.stacked)
        return self.layers[0].input_layernorm(residual), residual

    def run_layers(self, h: Tensor, residual: Tensor, batch: ForwardBatch, start: int,
                   end: int) -> tuple[Tensor, Tensor]:
        """Layers [start, end) on (h, residual) as `embed` or an earlier call left them; after
        the last layer h is the final norm's output."""
        for i in range(start, end):
            next_norm = self.layers[i + 1].input_layernorm if i + 1 < len(self.layers) else self.norm
            h, residual = self.layers[i](h, residual, batch, next_norm)
        return h, residual

    def compute_logits(self, hidden: Tensor) -> Tensor:
        """hidden [B, D] -> logits [B, V] in float32 (on every rank: each computes its
        vocabulary rows, then they are gathered)."""
        head = self.lm_head
        if head is None:  # tied: this rank's rows of the embeddings
            head = self.embed_tokens[self.vocab_start:self.vocab_start + self.vocab_rows]
        return self.shard.gather_vocab(F.linear(hidden, head), self.spec.vocab_size).float()

    def attention_layers(self) -> list[Attention]:
        return [layer.self_attn for layer in self.layers]

    def moe_layers(self) -> list[SparseMoE]:
        return [layer.mlp for layer in self.layers if isinstance(layer.mlp, SparseMoE)]
