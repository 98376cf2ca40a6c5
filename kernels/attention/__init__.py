"""Attention kernels: paged decode attention (`paged_attention`), paged prefill attention
(`prefill_attention`) and the fused norms and rotary embedding (`norm_rope`)."""
