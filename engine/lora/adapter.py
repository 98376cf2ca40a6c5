"""Read a PEFT LoRA directory into compact per-module factors, scaling folded into B.

Every format of DESIGN.md: attention q/k/v/o, per-expert keys (incl. Mixtral w1/w3/w2),
fused 3-D experts (PEFT `target_parameters`), shared-outer experts (gate/up A and down B
shared by a layer's experts; stacked per expert here and marked `shared`, so the adapter heap
keeps them once), rsLoRA,
rank_pattern / alpha_pattern.
E = experts, r = rank, D = hidden, I = expert intermediate.
"""
import gc
import json
import math
import os
import struct
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import Tensor

from adapter_store.cache import files_signature
from adapter_store.formats import (LoRAKey, ModelShape, UnknownKeyError, expected_shape, lora_scale,
                                   parse_lora_key, pattern_module_name, pattern_value)
from adapter_store.limits import MAX_SERVED_WEIGHT
from adapter_store.safetensors_io import MAX_HEADER_BYTES
from engine.errors import AdapterFilesError, AdapterLoadError
from engine.models.spec import ModelSpec

_PICKLED = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")


@dataclass(slots=True)
class LoRAFactors:
    """delta(x) = (x @ a.T) @ b.T; a [.., r, IN], b [.., OUT, r] (per expert when 3-D).
    shared: "A" or "B" when that factor is one matrix for every expert (the shared-outer
    format; every expert's slice then holds the same values), else ""."""
    a: Tensor
    b: Tensor
    shared: str = ""

    @property
    def rank(self) -> int:
        return self.a.shape[-2]


@dataclass(slots=True)
class LoRAAdapter:
    """One adapter on the host: dense[(layer, "q_proj")] and moe[(layer, "gate"|"up"|"down")].

    In the host tier it is packed (`SlotPools.pack`): `packed` is its image in the device heap's
    layout (its own bytes: its targets at its ranks), `packed_ranks` int32 its per-pool ranks (and
    in the heap its shareable factors' signed ranks: SlotPools.ranks' column) and `packed_offsets`
    [F] int64 where each factor starts in the image; the factor dicts are then empty.
    """
    name: str
    dense: dict[tuple[int, str], LoRAFactors] = field(default_factory=dict)
    moe: dict[tuple[int, str], LoRAFactors] = field(default_factory=dict)
    packed: Tensor | None = None
    packed_ranks: Tensor | None = None
    packed_offsets: Tensor | None = None
    # on rank 0 of a replica over several GPUs: ranks 1..N-1's parts, packed (engine.parallel.pools)
    parts: list["LoRAAdapter"] = field(default_factory=list)

    @property
    def max_rank(self) -> int:
        if self.packed_ranks is not None:
            return int(self.packed_ranks.max()) if self.packed_ranks.numel() else 0
        return max((f.rank for f in (*self.dense.values(), *self.moe.values())), default=0)

    @property
    def num_bytes(self) -> int:
        """Host bytes of the adapter (= bytes one slot load copies, once packed)."""
        own = self.packed.nbytes + self.packed_ranks.nbytes + self.packed_offsets.nbytes if self.packed is not None \
            else sum(f.a.nbytes + f.b.nbytes for f in (*self.dense.values(), *self.moe.values()))
        return own + sum(part.num_bytes for part in self.parts)

    def renamed(self, name: str) -> "LoRAAdapter":
        """The same adapter under another name, sharing its tensors (no copy)."""
        return LoRAAdapter(name, self.dense, self.moe, self.packed, self.packed_ranks, self.packed_offsets, self.parts)


def model_shape(spec: ModelSpec) -> ModelShape:
    return ModelShape(family=spec.family, num_layers=spec.num_layers, hidden_size=spec.hidden_size,
                      intermediate_size=spec.moe_intermediate_size, num_experts=spec.num_experts,
                      num_heads=spec.num_heads, num_kv_heads=spec.num_kv_heads, head_dim=spec.head_dim)


YIELD_EVERY = 4  # tensors between two yields of the GIL (_yielding)


def _yielding(items):
    """`items`, giving the GIL up every YIELD_EVERY of them. Loads run in threads of the engine's
    process, and an adapter on every expert is thousands of small Python steps (a tensor each):
    without a yield, each time the step loop's thread wants the GIL back (after every op that
    released it) it waits until the loader is forced off, up to the 5 ms switch interval. On
    the dev box (8 layers of Qwen3-30B-A3B, one loading thread), a host-bound stand-in for the
    step loop took p99 5.0-5.2 ms an iteration beside loads without the yields, 0.83-0.86 ms
    with them, 0.30-0.34 ms alone (`bench_adapter_load.py --step-loop`, RESULTS.md)."""
    for i, item in enumerate(items):
        if i % YIELD_EVERY == 0:
            time.sleep(0)  # releases the GIL, and a waiting thread takes it
        yield item


def _read_dir(path: Path) -> tuple[dict, dict[str, Tensor]]:
    files = files_signature(path)  # before the read: what failed, if it fails
    if not path.is_dir():
        raise AdapterFilesError(f"adapter directory {path} does not exist", str(path), files)
    if any((path / name).exists() for name in _PICKLED) and not (path / "adapter_model.safetensors").exists():
        raise AdapterLoadError(f"{path} holds pickled weights; only adapter_model.safetensors is accepted")
    try:
        config = json.loads((path / "adapter_config.json").read_text())
        tensors = _read_tensors(path / "adapter_model.safetensors")
    except (OSError, ValueError) as exc:
        raise AdapterFilesError(f"cannot read adapter in {path}: {type(exc).__name__}: {exc}", str(path),
                                files) from exc
    if config.get("peft_type", "LORA").upper() != "LORA":
        raise AdapterLoadError(f"{path}: peft_type {config.get('peft_type')!r} is not LORA")
    return config, tensors


_TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _parse_header(raw: bytes):
    """The header's JSON, the collector paused meanwhile: the parse makes ~7 objects a tensor at
    once (a quarter of a million for an adapter on every expert), enough to start full
    collections that hold the GIL from the step loop for as long again."""
    paused = gc.isenabled()
    gc.disable()
    try:
        return json.loads(raw)
    finally:
        if paused:
            gc.enable()


def _read_tensors(file: Path) -> dict[str, Tensor]:
    """Every tensor of a safetensors file, as views of one buffer its data is read into (one
    read, out of the GIL), the entries made with the loader's GIL yields (an adapter on every
    expert has tens of thousands). Not through safetensors' `safe_open(framework="pt")`: it
    keeps ~56 bytes per tensor for good (0.8.0, torch 2.13), ~2 MB per host load of an adapter
    on every expert, without bound under churn. The store validated the file at upload; what is
    checked here is what reading it needs (a header that parses, ranges inside the data)."""
    with open(file, "rb", buffering=0) as f:
        head, size = f.read(8), os.fstat(f.fileno()).st_size
        (n,) = struct.unpack("<Q", head) if len(head) == 8 else (size,)
        if n > min(size - 8, MAX_HEADER_BYTES):
            raise ValueError(f"{file} is not a safetensors file (header of {n} bytes in {size})")
        header = _parse_header(f.read(n))
        data = torch.empty(size - 8 - n, dtype=torch.uint8)
        view, got = memoryview(data.numpy()), 0
        while got < len(view):
            read = f.readinto(view[got:])
            if not read:
                raise ValueError(f"{file} ends {len(view) - got} bytes short (cut short since it was stored?)")
            got += read
    if not isinstance(header, dict):
        raise ValueError(f"{file}: the safetensors header is not an object")
    header.pop("__metadata__", None)
    tensors, nbytes = {}, data.numel()
    for key, meta in _yielding(header.items()):
        try:
            dtype, shape, (begin, end) = _TORCH_DTYPES[meta["dtype"]], tuple(meta["shape"]), meta["data_offsets"]
            ok = (all(type(v) is int and v >= 0 for v in (*shape, begin, end)) and begin <= end <= nbytes
                  and end - begin == math.prod(shape) * dtype.itemsize)
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise ValueError(f"{file}: tensor {key!r} has a header entry this loader cannot read")
        raw = data[begin:end]
        if begin % dtype.itemsize:  # a writer that did not align it: a copy of its own
            raw = raw.clone()
        tensors[key] = raw.view(dtype).view(shape)
    return tensors


def _scale(config: dict, module_name: str, rank: int) -> float:
    expected = pattern_value(module_name, config.get("rank_pattern") or {}, config["r"])
    if int(expected) != rank:
        raise AdapterLoadError(f"{module_name}: tensors have rank {rank} but adapter_config says {expected}")
    alpha = pattern_value(module_name, config.get("alpha_pattern") or {}, config["lora_alpha"])
    scale = lora_scale(alpha, rank, bool(config.get("use_rslora")))
    if not abs(scale) <= MAX_SERVED_WEIGHT:  # NaN too
        raise AdapterLoadError(f"{module_name}: lora_alpha / r = {scale:.3g} is past {MAX_SERVED_WEIGHT:g}, the "
                               "largest value fp16 holds: its weights would overflow (the store refuses such uploads)")
    return scale


def _split_fused(key: LoRAKey, a: Tensor, b: Tensor, num_experts: int, inter: int) -> dict[str, LoRAFactors]:
    """PEFT 3-D experts: a [r*E, IN] expert-major rows, b [OUT, r*E] rank-major columns."""
    rank = a.shape[0] // num_experts
    a_e = a.reshape(num_experts, rank, a.shape[1])                    # [E, r, IN]
    b_e = b.reshape(b.shape[0], rank, num_experts).permute(2, 0, 1)   # [E, OUT, r]
    if key.module == "down":
        return {"down": LoRAFactors(a_e.contiguous(), b_e.contiguous())}
    # gate and up share A in this format; B's rows [0, I) are gate's, [I, 2I) up's
    return {"gate": LoRAFactors(a_e.contiguous(), b_e[:, :inter].contiguous()),
            "up": LoRAFactors(a_e.clone(), b_e[:, inter:].contiguous())}


def _group_pairs(tensors: dict[str, Tensor], shape: ModelShape) -> dict[tuple, dict]:
    """{(layer, module, expert, fused): {"key", "name", "A", "B"}}; in the shared-outer layout
    each expert's entry gets the layer's shared half (one tensor, not a copy per expert)."""
    pairs: dict[tuple, dict] = {}
    shared: dict[tuple[int, str], tuple[LoRAKey, str, Tensor]] = {}
    for key, tensor in _yielding(tensors.items()):
        try:
            parsed = parse_lora_key(key, tuple(tensor.shape), shape)
        except UnknownKeyError as exc:
            raise AdapterLoadError(str(exc)) from exc
        if parsed.shared:
            shared[(parsed.layer, parsed.module)] = (parsed, pattern_module_name(key, parsed), tensor)
            continue
        entry = pairs.setdefault((*parsed.target, parsed.fused), {"key": parsed})
        entry[parsed.which] = _as_loaded(parsed.which, tensor)
        entry["name"] = pattern_module_name(key, parsed)
    experts_of: dict[tuple[int, str], list[dict]] = {}  # (layer, module) -> its experts' entries
    for target, entry in pairs.items():
        if target[2] is not None:
            experts_of.setdefault(target[:2], []).append(entry)
    for (layer, module), (parsed, name, tensor) in shared.items():
        if tensor.dim() != 3 or tensor.shape[0] != 1:
            raise AdapterLoadError(f"{name}: a shared lora_{parsed.which} must be [1, ...], "
                                   f"got {list(tensor.shape)}")
        experts = experts_of.get((layer, module), [])
        if not experts:
            raise AdapterLoadError(f"{name}: a shared lora_{parsed.which} without any expert's other half")
        for entry in experts:
            if parsed.which in entry:
                raise AdapterLoadError(f"{entry['name']}: has its own lora_{parsed.which} next to the "
                                       "shared one")
            entry[parsed.which] = _as_loaded(parsed.which, tensor[0])
            entry["shared"] = parsed.which
    return pairs


def _as_loaded(which: str, tensor: Tensor) -> Tensor:
    """B in fp32, where the scaling is folded into it and rounded once; A as the file holds it
    (no arithmetic touches A, so an fp32 round trip would only cost a pass over its bytes)."""
    return tensor.float() if which == "B" else tensor


def load_adapter(name: str, path: str | Path, spec: ModelSpec, dtype: torch.dtype,
                 max_rank: int) -> LoRAAdapter:
    """Parse, validate and scale the PEFT adapter in `path` for the model `spec`."""
    config, tensors = _read_dir(Path(path))
    shape = model_shape(spec)
    adapter = LoRAAdapter(name)
    b_scales: dict[tuple[int, str], float] = {}  # (layer, module) -> its first expert's scale
    for target, entry in _yielding(_group_pairs(tensors, shape).items()):
        key: LoRAKey = entry["key"]
        if "A" not in entry or "B" not in entry:
            raise AdapterLoadError(f"{entry['name']}: lora_A or lora_B is missing")
        a, b = entry["A"], entry["B"]
        rank = a.shape[0] // spec.num_experts if key.fused else a.shape[0]
        _check_shapes(entry, key, rank, shape)
        scale = _scale(config, entry["name"], rank)
        if rank > max_rank:
            raise AdapterLoadError(f"adapter {name!r} has rank {rank} > max_lora_rank {max_rank}; "
                                   "raise EngineConfig.max_lora_rank or retrain with a lower rank")
        if key.fused:
            parts = _split_fused(key, a, b * scale, spec.num_experts, spec.moe_intermediate_size)
            for module, factors in parts.items():
                adapter.moe[(key.layer, module)] = factors
        elif key.expert is not None:
            _put_expert(adapter, key, a, b * scale, spec, dtype, entry.get("shared", ""))
            # the scale is folded into B: an alpha_pattern naming one expert makes the shared B
            # differ by expert, so the heap must keep it per expert
            factors = adapter.moe[(key.layer, key.module)]
            if factors.shared == "B" and scale != b_scales.setdefault((key.layer, key.module), scale):
                factors.shared = ""
        else:
            adapter.dense[(key.layer, key.module)] = LoRAFactors(a, b * scale)
    _check_experts_complete(adapter, spec)
    return _cast(adapter, dtype)


def _check_shapes(entry: dict, key: LoRAKey, rank: int, shape: ModelShape) -> None:
    """Refuse tensors that do not fit the base model here, in the loader, rather than in the
    slot copy of a step (where the error would fail every request of the batch)."""
    if rank < 1:
        raise AdapterLoadError(f"{entry['name']}: lora_A has no rows (rank 0)")
    for which in ("A", "B"):
        want, got = expected_shape(replace(key, which=which), rank, shape), tuple(entry[which].shape)
        if got != want:
            raise AdapterLoadError(f"{entry['name']}: lora_{which} has shape {got}, but this base "
                                   f"model needs {want} for rank {rank}")


def _put_expert(adapter: LoRAAdapter, key: LoRAKey, a: Tensor, b: Tensor, spec: ModelSpec,
                dtype: torch.dtype, shared: str) -> None:
    """Stack one expert's factors into its layer's [E, ...] tensors, made in the final dtype: the
    fp32 product b * scale is rounded once, on assignment. shared: the factor ("A"/"B") that
    came as the layer's one shared tensor, or ""."""
    slot = (key.layer, key.module)
    if slot not in adapter.moe:
        e = spec.num_experts
        adapter.moe[slot] = LoRAFactors(a.new_zeros(e, *a.shape, dtype=dtype), b.new_zeros(e, *b.shape, dtype=dtype),
                                        shared)
    factors = adapter.moe[slot]
    if factors.a.shape[1:] != a.shape or factors.b.shape[1:] != b.shape:
        raise AdapterLoadError(f"layer {key.layer} {key.module}: experts have different ranks")
    factors.a[key.expert], factors.b[key.expert] = a, b


def _check_experts_complete(adapter: LoRAAdapter, spec: ModelSpec) -> None:
    for (layer, module), factors in adapter.moe.items():
        if not spec.is_moe_layer(layer):
            raise AdapterLoadError(f"layer {layer} is a dense MLP layer; its {module} has no experts")


def _cast(adapter: LoRAAdapter, dtype: torch.dtype) -> LoRAAdapter:
    for f in (*adapter.dense.values(), *adapter.moe.values()):
        f.a, f.b = f.a.to(dtype), f.b.to(dtype)
    return adapter
