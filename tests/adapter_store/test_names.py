"""Names and references: one safe path segment each."""
import pytest

from adapter_store.errors import InvalidNameError
from adapter_store.names import AdapterRef, check_name, parse_ref


@pytest.mark.parametrize("name", ["a", "A-1", "my_adapter.v2", "x" * 64, "0day"])
def test_safe_names(name):
    assert check_name(name) == name


@pytest.mark.parametrize("name", ["", "..", "a..b", ".hidden", "-flag", "a/b", "a\\b", "a b", "a\tb",
                                  "a\x7fb", "é", "x" * 65, "a@b", None])
def test_unsafe_names(name):
    with pytest.raises(InvalidNameError):
        check_name(name)


@pytest.mark.parametrize("ref,want", [
    ("ad", AdapterRef(None, "ad", None)),
    ("ad@v1", AdapterRef(None, "ad", "v1")),
    ("acme/ad", AdapterRef("acme", "ad", None)),
    ("acme/ad@20261127T000000.000000Z-abc123", AdapterRef("acme", "ad", "20261127T000000.000000Z-abc123")),
])
def test_refs(ref, want):
    assert parse_ref(ref) == want


@pytest.mark.parametrize("ref", ["", "/ad", "a/b/c", "ad@", "ad@v@w", "../ad", "a/..", "ad@../x"])
def test_bad_refs(ref):
    with pytest.raises(InvalidNameError):
        parse_ref(ref)


def test_store_package_does_not_import_torch():
    import subprocess
    import sys

    code = ("import sys, adapter_store, adapter_store.cli, adapter_store.s3, adapter_store.local; "
            "print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def test_engine_and_local_store_import_without_boto3():
    """The GPU image has no boto3: the engine and a local store must not need it."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['boto3'] = None; import engine, adapter_store; "
            "from adapter_store import open_store; import tempfile; "
            "print(type(open_store(tempfile.mkdtemp())).__name__)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "LocalStore"
