"""Which Triton specialisations a piece of code would compile, found without a GPU.

`JitKeyRecorder` replaces `JITFunction.run` while it is active: each launch records the key
Triton would look its compiled kernel up by, and runs nothing (outputs stay as allocated, so
what follows a launch computes on garbage; shapes and control flow are what matter here).
The key follows Triton's rules: constexpr values; an int argument's width (i32/i64/u64), and
its being == 1 and divisible by 16 unless the kernel lists it in do_not_specialize; a tensor's
dtype and its address being 16-byte aligned; launch options (num_warps, num_stages). Caveat: a
view at a token-count offset is aligned or not depending on the element size, so a CPU run in
fp32 can miss what bf16 on the GPU specialises (none such is known).
"""
from contextlib import contextmanager

import torch


def launch_key(fn, args: tuple, kwargs: dict) -> tuple:
    names = [p.name for p in fn.params]
    bound = dict(zip(names, args))
    bound.update({k: v for k, v in kwargs.items() if k in bound or k in names})
    options = tuple(sorted((k, v) for k, v in kwargs.items() if k not in names))
    parts = []
    for p in fn.params:
        v = bound.get(p.name)
        if p.is_constexpr:
            parts.append((p.name, type(v).__name__, v))
        elif isinstance(v, torch.Tensor):
            parts.append((p.name, str(v.dtype), v.data_ptr() % 16 == 0))
        elif isinstance(v, bool) or not isinstance(v, int):
            parts.append((p.name, type(v).__name__))
        else:  # the width is part of the key even where the value is not
            width = "i32" if -2**31 <= v < 2**31 else "i64" if -2**63 <= v < 2**63 else "u64"
            parts.append((p.name, width) if p.do_not_specialize else (p.name, width, v == 1, v % 16 == 0))
    return fn.fn.__name__, tuple(parts), options


class JitKeyRecorder:
    def __init__(self):
        self.keys: set[tuple] = set()

    @contextmanager
    def recording(self):
        from triton.runtime.jit import JITFunction
        original = JITFunction.run

        def run(fn, *args, grid, warmup, **kwargs):
            self.keys.add(launch_key(fn, args, kwargs))
        JITFunction.run = run
        try:
            yield self
        finally:
            JITFunction.run = original

    def take(self) -> set[tuple]:
        keys, self.keys = self.keys, set()
        return keys
