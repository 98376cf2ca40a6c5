"""LoRARequest names an adapter version; its owner is the tenant part of the name (a request's own
tenant is separate: an operator's shared adapter serves every tenant)."""
import pytest

from engine import InvalidRequestError, LoRARequest


def test_owner_is_the_part_before_the_slash():
    assert LoRARequest("acme/style@v1", "/x").owner == "acme"
    assert LoRARequest("style", "/x").owner == "style"
    assert not hasattr(LoRARequest("acme/style@v1", "/x"), "tenant")


def test_empty_name_or_path_is_refused():
    with pytest.raises(InvalidRequestError):
        LoRARequest("", "/x")
    with pytest.raises(InvalidRequestError):
        LoRARequest("acme/style@v1", "")
