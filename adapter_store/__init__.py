"""moeplex adapter store: tenant LoRA adapters in S3 or a local directory.

    store = open_store("s3://bucket/prefix" | "/dir" | "file:///dir")
    info = store.put(tenant, name, src_dir, base_model_dir)   # validated, new immutable version
    path = DiskCache(cache_dir, max_bytes).fetch(store, store.resolve(tenant, "name"))
"""
from adapter_store.backends import open_store
from adapter_store.cache import DiskCache
from adapter_store.store import AdapterStore
from adapter_store.validate import StoreLimits
from adapter_store.versions import AdapterInfo

__all__ = ["AdapterInfo", "AdapterStore", "DiskCache", "StoreLimits", "open_store"]
