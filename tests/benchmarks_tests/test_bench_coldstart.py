"""benchmarks/bench_coldstart.py --tiny: the whole path on the CPU, checked against the files."""
import json

from safetensors import safe_open

from benchmarks import bench_coldstart


def test_tiny_run_writes_a_checkpoint_the_engine_starts_on_and_reports_every_part(tmp_path):
    out = tmp_path / "cold.json"
    argv = ["--tiny", "--no-drop-caches", "--keep", "--dir", str(tmp_path / "ckpt"),
            "--out", str(out)]
    assert bench_coldstart.main(argv) == 0
    results = json.loads(out.read_text())
    shards = sorted((tmp_path / "ckpt" / "tiny").glob("*.safetensors"))
    assert results["checkpoint"]["files"] == len(shards) >= 1
    assert results["checkpoint"]["bytes"] == sum(f.stat().st_size for f in shards)
    with safe_open(str(shards[0]), "pt") as f:  # transformers' own layout, bf16
        assert any(k.startswith("model.layers.0.") for k in f.keys())
    disk = results["disk_read"]
    assert disk["method"] == "fadvise_dontneed" and disk["bytes"] == results["checkpoint"]["bytes"]
    engine = results["engine_start"]
    assert engine["total_s"] > 0 and "weights" in engine["parts_s"]
    assert results["weights_vs_disk"]["weights_s"] == engine["parts_s"]["weights"]
    assert results["provenance"]["argv"] == argv
