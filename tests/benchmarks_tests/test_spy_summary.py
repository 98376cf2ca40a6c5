"""benchmarks/spy_summary.py: shares of a flood by thread and frame from py-spy's collapsed stacks."""
from benchmarks import spy_summary

LOOP = "thread (101): AsyncIO Thread: default;Thread.run (threading.py:982);Replica.handle (replica.py:10)"
STACKS = (f"{LOOP};LLMServer.generate (replica.py:172) 30\n"
          f"{LOOP};_prepare (replica.py:90) 10\n"
          "thread (202): moeplex-core-reader;EngineCoreClient._read (core_client.py:132) 4\n")


def test_busy_shares_are_over_the_whole_run_by_leaf_and_by_frame_on_the_stack(tmp_path):
    (tmp_path / "base_hog_replica_7.txt").write_text(STACKS)
    (tmp_path / "base_hog_replica_7.log").write_text(
        "py-spy> Sampling process 20 times a second for 5 seconds. Press Control-C to exit.\n")
    (tmp_path / "slot_hog_replica_7.txt").write_text(STACKS)  # another flood's: left out
    text = spy_summary.summary(tmp_path, flood="base_hog", top=3)
    lines = text.splitlines()
    assert lines[0] == "== base_hog_replica_7: 44 samples on a CPU (a thread busy throughout: 100)"
    assert lines[1] == "  AsyncIO Thread: default: on a CPU 40% of the run"  # the busiest thread first
    assert "    self  30.0%  LLMServer.generate (replica.py:172)" in lines
    assert "    incl  40.0%  Replica.handle (replica.py:10)" in lines  # both leaves' caller
    assert not any("Thread.run" in line for line in lines)  # the thread's own start, no information
    assert "  moeplex-core-reader: on a CPU 4% of the run" in lines
    assert "slot_hog" not in text


def test_without_py_spys_log_shares_are_of_each_threads_own_samples(tmp_path):
    (tmp_path / "base_hog_ingress_9.txt").write_text(STACKS)
    lines = spy_summary.summary(tmp_path).splitlines()
    assert lines[0] == "== base_hog_ingress_9: 44 samples on a CPU"
    assert "  AsyncIO Thread: default: 40 samples" in lines
    assert "    self  75.0%  LLMServer.generate (replica.py:172)" in lines
