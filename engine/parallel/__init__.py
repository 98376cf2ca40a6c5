"""Replicas over several GPUs: which part of the model each rank holds (`shard`, `slicing`) and
how rank 0's engine drives the other ranks (`group`, `worker`)."""
