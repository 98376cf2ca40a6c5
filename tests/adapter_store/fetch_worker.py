"""A separate process that fetches one adapter into a shared disk cache and reports.

Run as `python -m tests.adapter_store.fetch_worker '<json args>'` from the repo root;
prints one JSON line: downloads and hits of its DiskCache, GetObject requests sent
(S3 only) and the path it got.
"""
import json
import sys
import time

from adapter_store import DiskCache, open_store


def main(args: dict) -> None:
    options = {"chunk_bytes": args["chunk_bytes"]}
    if args["uri"].startswith("s3://"):
        options.update(concurrency=1, max_attempts=2)
    store = open_store(args["uri"], endpoint_url=args.get("endpoint_url"), region="us-east-1", **options)
    get_objects = []
    if hasattr(store, "client"):
        store.client.meta.events.register("before-send.s3.GetObject", lambda **kw: get_objects.append(1))
    info = store.resolve(args["tenant"], args["ref"])
    get_objects.clear()  # count the fetch only
    cache = DiskCache(args["cache_dir"], 1 << 30)
    time.sleep(max(0.0, args["start_at"] - time.time()))
    path = cache.fetch(store, info, progress=lambda n: time.sleep(0.01))  # a slow link
    print(json.dumps({"downloads": cache.downloads, "hits": cache.hits,
                      "get_objects": len(get_objects), "path": str(path)}))


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
