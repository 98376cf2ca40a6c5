"""The MoE layer and its LoRA over virtual experts (also the dense projections' LoRA, one expert
a slot), by role: routing (`router`), alignment of rows into blocks (`align`, `align_triton`,
`align_multi`), the grouped GEMMs, a kernel each for base, shrink and expand (`grouped_gemm`),
the expand by blocks (`expand`), the decode-size row path (`lora_rows`), the activation
(`activation`), the launchers that pick a path and chain them (`launch`, `dense_launch`), and the
public ops (`ops`, re-exported by `kernels`)."""
