"""deployments/prefix_router.py: the routing key of a payload, the replicas' order for a key,
and when the preferred replica is passed over for load (the router itself runs in the served
tests, tests/deployments/test_serve_app.py)."""

from deployments.args import AppArgs
from deployments.prefix_router import PREFIX_CHARS, affinity_key, rank, too_busy

SYSTEM = "You are a careful assistant. " * 60  # past PREFIX_CHARS


def test_requests_sharing_an_opening_share_a_key_and_tenants_part_them():
    a = affinity_key({"tenant": "acme", "prompt": SYSTEM + "first question"})
    assert a == affinity_key({"tenant": "acme", "prompt": SYSTEM + "another one"})
    assert a != affinity_key({"tenant": "globex", "prompt": SYSTEM + "first question"})
    assert affinity_key({"tenant": "acme", "prompt": SYSTEM}, per_tenant=False) == \
        affinity_key({"tenant": "globex", "prompt": SYSTEM}, per_tenant=False)
    short = [affinity_key({"tenant": "acme", "prompt": f"question {i}"}) for i in range(3)]
    assert len(set(short)) == 3  # shorter than PREFIX_CHARS: the whole prompt is the opening


def test_a_hot_adapters_request_has_no_key_it_spreads_by_load():
    assert affinity_key({"tenant": "acme", "adapter": "ops/hot@v1", "prompt": SYSTEM}) is None


def test_a_chats_key_is_its_first_message_which_every_later_turn_repeats():
    system = {"role": "system", "content": "Answer in French."}
    turn1 = [system, {"role": "user", "content": "hi"}]
    turn2 = turn1 + [{"role": "assistant", "content": "salut"}, {"role": "user", "content": "bye"}]
    assert affinity_key({"tenant": "t", "messages": turn1}) == affinity_key({"tenant": "t", "messages": turn2})
    other = [{"role": "system", "content": "Answer in German."}, turn1[1]]
    assert affinity_key({"tenant": "t", "messages": other}) != affinity_key({"tenant": "t", "messages": turn1})


def test_token_id_prompts_have_keys_and_payloads_without_a_prompt_none():
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
    assert too_busy(9, [None, 5], max_imbalance=8)  # a replica with no recent length counts as empty
    assert not too_busy(None, [3, 0], max_imbalance=0)  # the preferred one's not known: affinity


def test_the_engine_deployment_routes_with_it_unless_turned_off():
    options = AppArgs().replica_options(cluster_gpus=0)
    assert options["request_router_config"] == {
        "request_router_class": "deployments.prefix_router:PrefixAffinityRouter",
        "request_router_kwargs": {"max_imbalance": 8, "per_tenant": True}}
    shared = AppArgs(prefix_cache_scope="all", prefix_affinity_max_imbalance=3).replica_options(0)
    assert shared["request_router_config"]["request_router_kwargs"] == {"max_imbalance": 3, "per_tenant": False}
    assert "request_router_config" not in AppArgs(prefix_affinity_routing=False).replica_options(0)


# ---- the router in Ray's routing loop, on Serve's own fake replicas ---------------------
def router():
    from ray.serve._private.common import DeploymentHandleSource
    from ray.serve._private.test_utils import FAKE_REPLICA_DEPLOYMENT_ID

    from deployments.prefix_router import PrefixAffinityRouter
    made = PrefixAffinityRouter(deployment_id=FAKE_REPLICA_DEPLOYMENT_ID, handle_source=DeploymentHandleSource.REPLICA,
                                use_replica_queue_len_cache=True, create_replica_wrapper_func=None, self_node_id="n0")
    made.initialize_state(max_imbalance=8, per_tenant=True)
    return made


def pending(payload, model_id=""):
    import uuid

    from ray.serve._private.common import RequestMetadata
    from ray.serve._private.request_router.common import PendingRequest
    metadata = RequestMetadata(request_id=uuid.uuid4().hex, internal_request_id=uuid.uuid4().hex,
                               multiplexed_model_id=model_id)
    return PendingRequest(args=[payload], kwargs={}, metadata=metadata)


def payload_preferring(replica: str, replicas: list[str], stem: str) -> dict:
    return next(p for i in range(1000) if rank(affinity_key(p := {"tenant": "acme", "prompt": f"{stem} {i}"}),
                                               replicas)[0] == replica)


def test_a_keyed_request_tries_its_replica_then_its_second_and_backs_off_between_rounds():
    import asyncio

    from ray.serve._private.test_utils import FakeRunningReplica

    async def choose():
        made, replicas = router(), [FakeRunningReplica(f"r{i}") for i in range(4)]
        made.update_replicas(replicas)
        request = pending(payload_preferring("r2", [r.replica_id.unique_id for r in replicas], "q"))
        ranks = await made.choose_replicas(replicas, request)
        return [[r.replica_id.unique_id for r in rank_] for rank_ in ranks], request.routing_context.should_backoff
    ranks, backoff = asyncio.run(choose())
    assert ranks[0] == ["r2"] and len(ranks) == 2 and len(ranks[1]) == 1 and backoff


def test_a_request_for_an_adapter_or_a_hot_one_or_to_a_replica_too_far_ahead_goes_by_two_choices():
    import asyncio

    from ray.serve._private.test_utils import FakeRunningReplica

    async def choose():
        made, replicas = router(), [FakeRunningReplica(f"r{i}") for i in range(4)]
        made.update_replicas(replicas)
        ids = [r.replica_id.unique_id for r in replicas]
        busy = payload_preferring("r1", ids, "busy")
        made.replica_queue_len_cache.update(replicas[1].replica_id, 20)  # the others have no length: empty
        requests = [pending({"tenant": "acme", "prompt": "hi"}, "acme/style@v1"),
                    pending({"tenant": "acme", "adapter": "ops/hot@v1", "prompt": "hi"}), pending(busy)]
        return [await made.choose_replicas(replicas, r) for r in requests]
    for ranks in asyncio.run(choose()):
        assert len(ranks) == 1 and len(ranks[0]) == 2  # one rank of two replicas at random


def test_the_replica_chosen_for_a_keyed_request_goes_to_that_request_not_the_oldest_waiting():
    """Two requests, the older preferring ra, the newer rb; rb answers its probe first: each
    gets its own replica (FIFOMixin would give rb to the older one)."""
    import asyncio

    from ray.serve._private.test_utils import FakeRunningReplica

    async def route():
        made, ra, rb = router(), FakeRunningReplica("ra"), FakeRunningReplica("rb")
        made.update_replicas([ra, rb])
        await asyncio.sleep(0)
        a = pending(payload_preferring("ra", ["ra", "rb"], "A"))
        b = pending(payload_preferring("rb", ["ra", "rb"], "B"))
        routed_a = asyncio.ensure_future(made._choose_replica_for_request(a))
        await asyncio.sleep(0.01)
        routed_b = asyncio.ensure_future(made._choose_replica_for_request(b))
        await asyncio.sleep(0.01)
        rb.set_queue_len_response(0)
        await asyncio.sleep(0.01)
        ra.set_queue_len_response(0)
        return [(await asyncio.wait_for(t, 5)).replica_id.unique_id for t in (routed_a, routed_b)]
    assert asyncio.run(route()) == ["ra", "rb"]
