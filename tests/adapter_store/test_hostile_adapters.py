"""What one hostile tenant's adapter files can do: each is a typed refusal, cheap to reach.

Config: too many or too slow rank_pattern keys, JSON nested past the recursion limit or
holding integers of thousands of digits. Weights: a header larger than the base model
could need, a `__metadata__` that safetensors itself refuses, shapes of many dimensions.
"""
import json
import re
import struct

import pytest
import regex
from safetensors import safe_open

from adapter_store import formats, safetensors_io
from adapter_store.cli import main as cli_main
from adapter_store.errors import ValidationError
from adapter_store.formats import ModelShape, PatternTable, PatternTimeoutError
from adapter_store.limits import max_header_bytes
from adapter_store.safetensors_io import read_header
from adapter_store.validate import MAX_PATTERN_KEYS, StoreLimits, validate_adapter
from tests.adapter_store.helpers import CONFIG, WEIGHTS, copy_adapter, edit_config

NO_MATCH_KEYS = {f"nomatch_{i}": 2 for i in range(MAX_PATTERN_KEYS)}


def _refused(src, base_model, code: str) -> str:
    with pytest.raises(ValidationError) as caught:
        validate_adapter(src, base_model, StoreLimits())
    assert caught.value.code == code, str(caught.value)
    return str(caught.value)


def _rewrite_header(path, edit) -> None:
    """Apply `edit(header dict) -> bytes | dict` to a safetensors file, keeping its data."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = edit(json.loads(raw[8:8 + n]))
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])


# ---- rank_pattern / alpha_pattern --------------------------------------------------

@pytest.mark.parametrize("field", ["rank_pattern", "alpha_pattern"])
def test_pattern_keys_over_the_cap_are_refused(adapter, base_model, tmp_path, field):
    keys = {**NO_MATCH_KEYS, "one_too_many": 2}
    src = edit_config(copy_adapter(adapter, tmp_path / "a"), **{field: keys})
    message = _refused(src, base_model, "bad_config")
    assert field in message and str(MAX_PATTERN_KEYS) in message


def test_pattern_keys_at_the_cap_are_accepted(adapter, base_model, tmp_path):
    src = edit_config(copy_adapter(adapter, tmp_path / "a"), rank_pattern=NO_MATCH_KEYS,
                      alpha_pattern=NO_MATCH_KEYS)
    assert validate_adapter(src, base_model, StoreLimits()).rank == 4


def test_each_module_name_is_matched_once_by_a_compiled_pattern(adapter, base_model, tmp_path,
                                                                monkeypatch):
    """Cost is patterns x distinct module names, with no recompiling: `regex` caches only
    500 patterns, and lora_A/lora_B of one module share its name."""
    keys = {f"nomatch_{i}": 2 for i in range(40)}
    src = edit_config(copy_adapter(adapter, tmp_path / "a"), rank_pattern=keys)
    calls, real = [], regex.fullmatch

    def spy(pattern, string, *args, **kwargs):
        calls.append((pattern, string))
        return real(pattern, string, *args, **kwargs)

    monkeypatch.setattr(regex, "fullmatch", spy)
    summary = validate_adapter(src, base_model, StoreLimits())
    assert all(isinstance(p, regex.Pattern) for p, _ in calls)
    assert len(calls) == len(set(calls)) == len(keys) * summary.num_tensors // 2


def test_patterns_share_one_time_budget(adapter, base_model, tmp_path, monkeypatch):
    monkeypatch.setattr(formats, "PATTERN_BUDGET_S", 0.0)
    src = edit_config(copy_adapter(adapter, tmp_path / "a"), rank_pattern={"q_proj": 4})
    assert "too long to match in total" in _refused(src, base_model, "bad_config")
    with pytest.raises(PatternTimeoutError):
        PatternTable({"q_proj": 4}, 8, budget_s=0.0).value("model.layers.0.self_attn.q_proj")


def test_pattern_table_picks_the_first_matching_key_like_peft():
    """Against PEFT's rule written with `re`: the first key matching the end of the path wins."""
    patterns = {r"layers\.1\..*q_proj": 1, "q_proj": 2, r"experts\.\d+\.up_proj": 3, "(gate|down)_proj": 5}
    names = [f"model.layers.{layer}.{module}" for layer in range(3) for module in
             ("self_attn.q_proj", "self_attn.k_proj", "mlp.experts.7.up_proj", "mlp.experts.0.down_proj",
              "mlp.experts.3.gate_proj", "mlp.experts.gate_up_proj")]
    table = PatternTable(patterns, 9)
    for name in names:
        want = next((v for p, v in patterns.items() if re.fullmatch(rf"(.*\.)?({p})", name)), 9)
        assert table.value(name) == want == formats.pattern_value(name, patterns, 9), name


def test_target_modules_naming_every_module_path_are_matched_by_suffix(adapter, base_model, tmp_path):
    """A list target_modules entry covers a module whose dotted path ends with it."""
    paths = sorted({k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] for k in
                    _header_keys(adapter / WEIGHTS)})
    src = edit_config(copy_adapter(adapter, tmp_path / "a"), target_modules=paths)
    assert validate_adapter(src, base_model, StoreLimits()).num_tensors == 2 * len(paths)
    partial = [p.split(".", 1)[1] for p in paths[1:]]  # drop one module, and "model." of the others
    src = edit_config(copy_adapter(adapter, tmp_path / "b"), target_modules=partial)
    assert paths[0] in _refused(src, base_model, "untargeted_key")


def _header_keys(path) -> list[str]:
    with safe_open(str(path), framework="np") as f:
        return list(f.keys())


# ---- JSON a parser chokes on ---------------------------------------------------------

@pytest.mark.parametrize("text", [
    "[" * 100_000 + "]" * 100_000,  # past the recursion limit
    '{"peft_type": "LORA", "r": 1' + "0" * 5000 + "}",  # past int()'s 4300-digit limit
    '{"peft_type": "LORA", "r": 4, "lora_alpha": 1' + "0" * 400 + ', "target_modules": ["q_proj"]}',
])
def test_config_json_a_parser_chokes_on_is_a_config_error(adapter, base_model, tmp_path, text):
    src = copy_adapter(adapter, tmp_path / "a")
    (src / CONFIG).write_text(text)
    _refused(src, base_model, "bad_config")


@pytest.mark.parametrize("header", [
    b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    b'{"t": {"dtype": "F32", "shape": [1' + b"0" * 5000 + b'], "data_offsets": [0, 4]}}',
    b'{"t": {"dtype": "F32", "shape": [' + b",".join([b"1"] * 100_000) + b'], "data_offsets": [0, 4]}}',
])
def test_weights_header_a_parser_chokes_on_is_refused(adapter, base_model, tmp_path, header):
    src = copy_adapter(adapter, tmp_path / "a")
    (src / WEIGHTS).write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4)
    _refused(src, base_model, "bad_safetensors")


def test_cli_reports_a_hostile_config_without_a_traceback(adapter, base_model, tmp_path, capsys):
    src = copy_adapter(adapter, tmp_path / "a")
    (src / CONFIG).write_text("[" * 100_000 + "]" * 100_000)
    code = cli_main(["upload", str(src), "--tenant", "acme", "--name", "ad", "--base-model",
                     str(base_model), "--store", str(tmp_path / "store"), "--json"])
    out, err = capsys.readouterr()
    assert code == 3 and json.loads(out)["error"]["code"] == "bad_config"
    assert err.startswith("error: ") and "Traceback" not in err


# ---- header size ---------------------------------------------------------------------

class _NoJSON:
    @staticmethod
    def loads(*args, **kwargs):
        raise AssertionError("the header was parsed")


def test_header_over_the_base_models_bound_is_refused_unparsed(adapter, base_model, tmp_path,
                                                               monkeypatch):
    src = copy_adapter(adapter, tmp_path / "a")
    shape = ModelShape.from_config(json.loads((base_model / "config.json").read_text()))
    padding = max_header_bytes(shape)  # valid JSON, padded with spaces past the bound
    _rewrite_header(src / WEIGHTS, lambda h: json.dumps(h).encode() + b" " * padding)
    monkeypatch.setattr(safetensors_io, "json", _NoJSON)
    assert "is over" in _refused(src, base_model, "bad_safetensors")


def test_header_over_the_global_cap_is_refused_unparsed(tmp_path, monkeypatch):
    path = tmp_path / WEIGHTS
    n = safetensors_io.MAX_HEADER_BYTES + 1
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", n))
        f.truncate(8 + n + 8)  # sparse: nothing is written past the length
    monkeypatch.setattr(safetensors_io, "json", _NoJSON)
    with pytest.raises(ValidationError, match="is over"):
        read_header(path)


def test_a_full_adapter_of_the_largest_models_fits_the_header_bound():
    """Every module of a 94-layer, 128-expert model (Qwen3-235B-A22B) as safetensors writes it."""
    shape = ModelShape("qwen3_moe", 94, 4096, 1536, 128, 64, 4, 128)
    key = "base_model.model.model.layers.93.mlp.experts.127.gate_proj.lora_A.weight"
    entry = {"dtype": "BF16", "shape": [1536, 256], "data_offsets": [123456789012, 123456789012]}
    per_tensor = len(json.dumps({key: entry}, separators=(",", ":")))
    tensors = 94 * (4 + 3 * 128) * 2
    assert tensors * per_tensor < max_header_bytes(shape) <= safetensors_io.MAX_HEADER_BYTES


# ---- what safetensors itself refuses -------------------------------------------------

@pytest.mark.parametrize("edit", [
    lambda h: {**h, "__metadata__": "not an object"},
    lambda h: {**h, "__metadata__": {"format": 1}},
    lambda h: {**h, "__metadata__": ["format"]},
    lambda h: {**h, "__metadata__": None},
    lambda h: {**h, "__metadata__": {"format": "pt", "note": "ok"}},
    lambda h: json.dumps(h).replace("{", '{"__x": NaN, ', 1).encode(),
    lambda h: json.dumps(h).encode("utf-16-le"),
    lambda h: {k: ({**v, "shape": [*v["shape"], True]} if k != "__metadata__" else v) for k, v in h.items()},
], ids=["meta_str", "meta_int_value", "meta_list", "meta_null", "meta_ok", "nan", "utf16", "bool_dim"])
def test_header_verdict_agrees_with_the_safetensors_library(adapter, tmp_path, edit):
    """An adapter accepted at upload is one every replica can open: the library's own
    parser decides which headers are acceptable."""
    src = copy_adapter(adapter, tmp_path / "a")
    _rewrite_header(src / WEIGHTS, edit)
    try:
        with safe_open(str(src / WEIGHTS), framework="np") as f:
            library_accepts = bool(list(f.keys()))
    except Exception:  # noqa: BLE001 - the library's errors are untyped (SafetensorError, ValueError)
        library_accepts = False
    try:
        read_header(src / WEIGHTS)
        we_accept = True
    except ValidationError as exc:
        assert exc.code == "bad_safetensors"
        we_accept = False
    assert we_accept == library_accepts
