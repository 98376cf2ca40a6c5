"""deployments/prefix_router.py: the routing key of a payload, the replicas' order for a key,
and when the preferred replica is passed over for load (the router itself runs in the served
tests, tests/deployments/test_serve_app.py)."""

from deployments.args import AppArgs
from deployments.prefix_router import PREFIX_CHARS, affinity_key, rank, too_busy

SYSTEM = "You are a careful assistant. " * 60  # past PREFIX_CHARS


def test_requests_sharing_an_opening_share_a_key_and_tenants_or_hot_adapters_part_them():
    a = affinity_key({"tenant": "acme", "prompt": SYSTEM + "first question"})
    assert a == affinity_key({"tenant": "acme", "prompt": SYSTEM + "another one"})
    assert a != affinity_key({"tenant": "globex", "prompt": SYSTEM + "first question"})
    assert a != affinity_key({"tenant": "acme", "adapter": "ops/hot@v1", "prompt": SYSTEM})
    assert affinity_key({"tenant": "acme", "prompt": SYSTEM}, per_tenant=False) == \
        affinity_key({"tenant": "globex", "prompt": SYSTEM}, per_tenant=False)
    short = [affinity_key({"tenant": "acme", "prompt": f"question {i}"}) for i in range(3)]
    assert len(set(short)) == 3  # shorter than PREFIX_CHARS: the whole prompt is the opening


def test_chats_and_token_id_prompts_have_keys_and_other_payloads_none():
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "hi"}]
    chat = affinity_key({"tenant": "t", "messages": messages})
    assert chat == affinity_key({"tenant": "t", "messages": [messages[0], {"role": "user", "content": "bye"}]})
    ids = list(range(PREFIX_CHARS))
    assert affinity_key({"tenant": "t", "prompt": ids}) == affinity_key({"tenant": "t", "prompt": ids + [7]})
    assert affinity_key({"tenant": "t"}) is None and affinity_key("not a payload") is None


def test_a_key_prefers_one_replica_spreads_keys_over_all_and_a_leaving_replica_moves_only_its_own():
    replicas = [f"replica-{i}" for i in range(4)]
    keys = [f"key {i}" for i in range(400)]
    first = {key: rank(key, replicas)[0] for key in keys}
    assert first == {key: rank(key, list(reversed(replicas)))[0] for key in keys}  # not the list's order
    counts = [list(first.values()).count(r) for r in replicas]
    assert min(counts) > 60  # ~100 each
    after = {key: rank(key, replicas[1:])[0] for key in keys}
    assert all(after[key] == first[key] for key in keys if first[key] != "replica-0")


def test_the_preferred_replica_is_passed_over_only_when_too_far_ahead_of_the_shortest_queue():
    assert not too_busy(10, [10, 2], max_imbalance=8)
    assert too_busy(11, [11, 2], max_imbalance=8)
    assert not too_busy(None, [3, 0], max_imbalance=0)  # not known yet: affinity
    assert not too_busy(5, [5], max_imbalance=0)


def test_the_engine_deployment_routes_with_it_unless_turned_off():
    options = AppArgs().replica_options(cluster_gpus=0)
    assert options["request_router_config"] == {
        "request_router_class": "deployments.prefix_router:PrefixAffinityRouter",
        "request_router_kwargs": {"max_imbalance": 8, "per_tenant": True}}
    shared = AppArgs(prefix_cache_scope="all", prefix_affinity_max_imbalance=3).replica_options(0)
    assert shared["request_router_config"]["request_router_kwargs"] == {"max_imbalance": 3, "per_tenant": False}
    assert "request_router_config" not in AppArgs(prefix_affinity_routing=False).replica_options(0)
