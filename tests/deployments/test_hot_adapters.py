"""HotAdapters: an adapter above its share of an ingress's recent completions is balanced over the
engine replicas; others keep their adapter affinity; nothing spreads with one replica."""
from deployments.args import AppArgs
from deployments.hot_adapters import HotAdapters


def test_an_adapter_above_its_share_is_hot_and_cools_down_as_traffic_moves_on():
    hot = HotAdapters(share=0.25, max_replicas=2, window=40, min_requests=20)
    seen = [hot.is_hot("t/a@v1") if k % 2 == 0 else hot.is_hot(f"t/other{k}@v1") for k in range(40)]
    assert not any(seen[:19])  # fewer than min_requests seen: nothing is hot yet
    assert seen[20] and seen[38]  # t/a@v1 takes half the traffic
    assert not any(seen[k] for k in range(1, 40, 2))  # each other adapter once
    for k in range(40):  # t/a@v1 leaves the window
        assert not hot.is_hot(f"t/b{k % 8}@v1")  # 5 of 40 each: 12.5%
    assert hot.share_of("t/a@v1") == 0.0


def test_nothing_spreads_with_one_replica_or_share_one():
    for hot in (HotAdapters(share=0.25, max_replicas=1, min_requests=1),
                HotAdapters(share=1.0, max_replicas=4, min_requests=1)):
        assert not any(hot.is_hot("t/a@v1") for _ in range(100))


def test_max_engine_replicas_from_replicas_or_autoscaling():
    assert AppArgs().max_engine_replicas() == 1
    assert AppArgs(num_replicas=3).max_engine_replicas() == 3
    assert AppArgs(autoscaling_config={"min_replicas": 1, "max_replicas": 5}).max_engine_replicas() == 5
    assert AppArgs(autoscaling_config='{"min_replicas": 0}').max_engine_replicas() == 1  # no max_replicas: the floor of 1


def test_a_batch_weighs_as_many_requests_as_it_makes():
    """lm-eval's batches of 32 prompts make 32 engine requests each: an adapter sent so is as hot as
    one sent in 32 requests, not 32 times colder."""
    hot = HotAdapters(share=0.5, max_replicas=2, window=64, min_requests=8)
    for k in range(16):
        hot.is_hot(f"t/other{k}@v1")
    assert hot.is_hot("t/a@v1", count=32) and hot.share_of("t/a@v1") == 32 / 48
