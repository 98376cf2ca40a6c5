"""Helpers of the adapter-store tests: copy an adapter and break it in one way."""
import json
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


def copy_adapter(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def edit_tensors(adapter_dir: Path, edit) -> Path:
    """Apply `edit(dict[str, Tensor]) -> None` to the adapter's weights, in place."""
    tensors = load_file(str(adapter_dir / WEIGHTS))
    edit(tensors)
    save_file(tensors, str(adapter_dir / WEIGHTS))
    return adapter_dir


def edit_config(adapter_dir: Path, **changes) -> Path:
    config = json.loads((adapter_dir / CONFIG).read_text())
    config.update(changes)
    (adapter_dir / CONFIG).write_text(json.dumps(config))
    return adapter_dir


def first_key(adapter_dir: Path, contains: str) -> str:
    return next(k for k in sorted(load_file(str(adapter_dir / WEIGHTS))) if contains in k)


def same_files(a: Path, b: Path) -> bool:
    return all((a / f).read_bytes() == (b / f).read_bytes() for f in (CONFIG, WEIGHTS))


def stored_keys(store) -> list[str]:
    """Every tenant object in the store, whatever the backend (for "nothing stored" checks)."""
    found = []
    for tenant in store._list_children("tenants"):
        for name in store._list_children(f"tenants/{tenant}/adapters"):
            found += [f"{tenant}/{name}/{v}" for v in
                      store._list_children(f"tenants/{tenant}/adapters/{name}/versions")]
    return found
