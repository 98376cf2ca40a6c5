"""Which Triton specialisations a piece of code would compile, found without a GPU.

`JitKeyRecorder` replaces `JITFunction.run` while it is active: each launch records the key
Triton would look its compiled kernel up by, and runs nothing (outputs stay as allocated, so
what follows a launch computes on garbage; shapes and control flow are what matter here).
The key follows Triton's rules: constexpr values; an int argument is specialised on == 1 and
on divisibility by 16 unless the kernel lists it in do_not_specialize; a tensor on its dtype
and on its address being 16-byte aligned; launch options (num_warps, num_stages).
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
            parts.append((p.name, v))
        elif isinstance(v, torch.Tensor):
            parts.append((p.name, str(v.dtype), v.data_ptr() % 16 == 0))
        elif isinstance(v, bool) or not isinstance(v, int):
            parts.append((p.name, type(v).__name__))
        elif p.do_not_specialize:
            parts.append((p.name, "int"))
        else:
            parts.append((p.name, v == 1, v % 16 == 0))
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
