"""ensure_model: local checkpoints as given, s3:// prefixes fetched once into the cache."""
import filecmp

import pytest

from deployments.args import AppArgs
from deployments.model_files import ModelFilesError, ensure_model


@pytest.fixture
def s3_checkpoint(tiny_checkpoint, monkeypatch):
    """(s3 client, the tiny checkpoint's files) with the files under s3://models/ckpts/tiny,
    moto's S3 in this process."""
    import boto3
    from moto import mock_aws

    for key, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                       "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    files = sorted(p for p in tiny_checkpoint().iterdir() if p.is_file())
    with mock_aws():
        s3 = boto3.client("s3", region_name="us-east-1")
        s3.create_bucket(Bucket="models")
        for path in files:
            s3.upload_file(str(path), "models", f"ckpts/tiny/{path.name}")
        yield s3, files


def test_s3_checkpoint_is_downloaded_once_into_the_cache(tmp_path, s3_checkpoint):
    s3, files = s3_checkpoint
    args = AppArgs(model="s3://models/ckpts/tiny", cache_dir=str(tmp_path))
    local = ensure_model(args)
    assert sorted(p.name for p in local.iterdir() if p.name != ".complete") == [p.name for p in files]
    assert all(filecmp.cmp(local / p.name, p, shallow=False) for p in files)
    s3.delete_object(Bucket="models", Key="ckpts/tiny/config.json")
    assert ensure_model(args) == local  # cached: no second download
    with pytest.raises(ModelFilesError, match="config.json"):
        ensure_model(AppArgs(model="s3://models/nothing-here", cache_dir=str(tmp_path)))


def test_the_ingress_fetches_only_the_config_of_an_s3_checkpoint(tmp_path, tiny_checkpoint, s3_checkpoint):
    args = AppArgs(model="s3://models/ckpts/tiny", cache_dir=str(tmp_path))
    config_dir = ensure_model(args, config_only=True)
    assert sorted(p.name for p in config_dir.iterdir()) == [".complete", "config.json"]
    assert config_dir.name == "tiny"  # the base model's fingerprint carries the name
    assert filecmp.cmp(config_dir / "config.json", tiny_checkpoint() / "config.json", shallow=False)
    full = ensure_model(args)
    assert full != config_dir and len(list(full.iterdir())) > 2  # the weights too
    assert ensure_model(args, config_only=True) == full  # once the weights are here, them


def test_local_checkpoint_must_hold_a_config(tmp_path, tiny_checkpoint):
    assert ensure_model(AppArgs(model=str(tiny_checkpoint()))) == tiny_checkpoint()
    with pytest.raises(ModelFilesError, match="no config.json"):
        ensure_model(AppArgs(model=str(tmp_path)))
