"""ReferenceStats files from strangers: schema, tables and data checksum are checked at load."""

import hashlib
import json
import random
import warnings
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import torch_dmc as dmc
from torch_dmc import ReferenceStats, StatsMismatchError

ROOT = Path(__file__).resolve().parents[1]
SITES = {"a": 4, "b.bn": 3, "c": 5}  # site → channels
LEVELS = 9
DAMAGED = "is damaged: its tensor data do not match the checksum stored at save"


def _table(channels: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(channels, LEVELS, generator=g).sort(dim=1).values


def _stats(per_sample: bool = True) -> ReferenceStats:
    return ReferenceStats(
        quantiles={s: _table(c, i) for i, (s, c) in enumerate(SITES.items())},
        channel_axes={"a": 1, "b.bn": 1, "c": -1},
        module_types={"a": "BatchNorm2d", "b.bn": "BatchNorm2d", "c": "LayerNorm"},
        fingerprint="f" * 64,
        info={"images": 10, "note": "test"},
        per_sample={"a": _table(4, 10), "c": _table(5, 12)} if per_sample else {},
    )


def _model(width: int = 0) -> nn.Module:
    """A model whose named modules are the test sites (``check`` only reads module names/types)."""
    return nn.Sequential(OrderedDict(
        a=nn.BatchNorm2d(4 + width), b=nn.Sequential(OrderedDict(bn=nn.BatchNorm2d(3))),
        c=nn.LayerNorm(5)))


def _sha(tensors: dict[str, torch.Tensor]) -> str:
    """The data checksum as `save`'s docstring specifies it (an independent implementation)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        h.update((json.dumps([name, str(t.dtype).split(".")[-1], list(t.shape)]) + "\n").encode())
        h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _read(path: Path) -> tuple[dict, bytes]:
    """The safetensors header (JSON) and data region of ``path``."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _write(path: Path, header: dict, data: bytes) -> None:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + data)


def _edit_meta(path: Path, edit) -> None:
    """Rewrite the torch-dmc metadata of ``path``: ``edit(meta)`` edits it, or returns raw text."""
    header, data = _read(path)
    meta = json.loads(header["__metadata__"]["torch_dmc"])
    text = edit(meta)
    header["__metadata__"]["torch_dmc"] = text if isinstance(text, str) else json.dumps(meta)
    _write(path, header, data)


def _meta(stats: ReferenceStats) -> dict:
    return stats._metadata()


def _tensors(stats: ReferenceStats) -> dict[str, torch.Tensor]:
    out = {f"quantiles/{s}": q for s, q in stats.quantiles.items()}
    out.update({f"per_sample/{s}": q for s, q in stats.per_sample.items()})
    return out


def _craft(path: Path, tensors: dict, meta: dict, checksum: bool = True) -> Path:
    """A file as a stranger could write it, with a correct data checksum unless not asked."""
    meta = dict(meta)
    if checksum:
        meta["data_sha256"] = _sha(tensors)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path),
              metadata={"torch_dmc": json.dumps(meta)})
    return path


@pytest.fixture
def saved(tmp_path) -> Path:
    path = tmp_path / "s.safetensors"
    _stats().save(path)
    return path


def _load(path: Path) -> ReferenceStats:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a file written by save loads without any warning
        return ReferenceStats.load(path)


# -- valid files --------------------------------------------------------------------------------


def test_round_trip_is_exact_and_carries_the_specified_checksum(saved):
    stats = _stats()
    loaded = _load(saved)
    assert loaded.sites == stats.sites and list(loaded.per_sample) == ["a", "c"]
    for s in stats.sites:
        assert torch.equal(loaded.quantiles[s], stats.quantiles[s])
        assert loaded.quantiles[s].dtype == torch.float32
    assert all(torch.equal(loaded.per_sample[s], stats.per_sample[s]) for s in stats.per_sample)
    assert (loaded.channel_axes, loaded.module_types) == (stats.channel_axes, stats.module_types)
    assert (loaded.fingerprint, loaded.info) == (stats.fingerprint, stats.info)
    assert loaded.checksum() == stats.checksum()
    header, _ = _read(saved)
    meta = json.loads(header["__metadata__"]["torch_dmc"])
    assert meta["data_sha256"] == _sha(_tensors(stats))
    assert "data_sha256" not in stats._metadata()  # not part of the provenance checksum()
    loaded.check(_model())
    loaded.check_output("c", torch.zeros(2, 7, 5))


def test_stats_without_per_sample_round_trip(tmp_path):
    stats = _stats(per_sample=False)
    stats.save(tmp_path / "p.safetensors")
    loaded = _load(tmp_path / "p.safetensors")
    assert loaded.per_sample == {} and loaded.checksum() == stats.checksum()


def test_a_committed_file_loads_with_a_warning_and_its_recorded_checksum(tmp_path):
    run = "fmnist-c"  # results/fmnist-c-small (with per-sample tables) behaves the same
    path = ROOT / "results" / run / "stats.safetensors"
    recorded = json.loads((ROOT / "results" / run / "config.json").read_text())["stats"]["checksum"]
    with pytest.warns(UserWarning, match="no data checksum.*load.*save") as record:
        stats = ReferenceStats.load(path)
    assert len(record) == 1
    assert stats.checksum() == recorded
    stats.save(tmp_path / "again.safetensors")  # saving again adds the data checksum ...
    again = _load(tmp_path / "again.safetensors")
    assert again.checksum() == recorded  # ... and leaves the provenance checksum as it was


def test_fit_output_passes_validate_and_saves(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 3, 3),
                          nn.BatchNorm2d(3))
    stats = dmc.fit(model, [torch.randn(4, 1, 8, 8) for _ in range(3)], levels=17,
                    progress=False, per_sample=True)
    stats.validate()
    stats.save(tmp_path / "fit.safetensors")
    assert _load(tmp_path / "fit.safetensors").checksum() == stats.checksum()


# -- the data checksum ---------------------------------------------------------------------------


def test_any_flipped_byte_in_the_data_is_detected(saved):
    header, data = _read(saved)
    rng = random.Random(0)
    for pos in [0, len(data) - 1, *rng.sample(range(len(data)), 6)]:
        bit = 1 << rng.randrange(8)
        flipped = bytearray(data)
        flipped[pos] ^= bit
        _write(saved, header, bytes(flipped))
        with pytest.raises(ValueError, match=DAMAGED):
            ReferenceStats.load(saved)
    _write(saved, header, data)
    _load(saved)  # the untouched data load again


def test_a_table_rewritten_without_the_checksum_is_damaged(tmp_path):
    stats = _stats()
    tensors = _tensors(stats)
    meta = {**_meta(stats), "data_sha256": _sha(tensors)}
    tensors["quantiles/a"] = tensors["quantiles/a"] + 1  # still valid values, stale checksum
    with pytest.raises(ValueError, match=DAMAGED):
        ReferenceStats.load(_craft(tmp_path / "x.safetensors", tensors, meta, checksum=False))


def test_a_file_without_checksum_warns_once_and_its_tables_are_still_checked(tmp_path):
    stats = _stats()
    path = _craft(tmp_path / "old.safetensors", _tensors(stats), _meta(stats), checksum=False)
    with pytest.warns(UserWarning, match="has no data checksum") as record:
        assert ReferenceStats.load(path).checksum() == stats.checksum()
    assert len(record) == 1
    tensors = _tensors(stats)
    tensors["quantiles/c"][2, 3] = float("nan")
    path = _craft(tmp_path / "old-nan.safetensors", tensors, _meta(stats), checksum=False)
    with pytest.warns(UserWarning, match="no data checksum"), \
            pytest.raises(ValueError, match=r"site 'c' \(quantiles table\), channel 2: level 3 is nan"):
        ReferenceStats.load(path)


@pytest.mark.parametrize("value", ["abc", 5, "A" * 64])
def test_a_malformed_checksum_field_is_refused(saved, value):
    _edit_meta(saved, lambda m: m.update(data_sha256=value))
    with pytest.raises(ValueError, match="field 'data_sha256' must be a SHA-256 hex digest"):
        ReferenceStats.load(saved)


# -- the metadata schema -------------------------------------------------------------------------


@pytest.mark.parametrize("text, match", [
    ("{not json", "metadata is not valid JSON"),
    ("[" * 100_000, "metadata is not valid JSON"),
    ("[1, 2]", r"metadata must be a JSON object, found \[1, 2\] \(array\)"),
    ('"stats"', "metadata must be a JSON object"),
    ("null", "metadata must be a JSON object"),
])
def test_metadata_that_is_not_a_json_object_is_refused(saved, text, match):
    _edit_meta(saved, lambda m: text)
    with pytest.raises(ValueError, match=match) as err:
        ReferenceStats.load(saved)
    assert str(saved) in str(err.value)


@pytest.mark.parametrize("name", ["format_version", "sites", "channel_axes", "module_types",
                                  "levels", "fingerprint"])
def test_a_missing_required_field_is_named(saved, name):
    def drop(meta):
        del meta[name]

    _edit_meta(saved, drop)
    with pytest.raises(ValueError, match=f"field '{name}' must be .*, found nothing "
                                         r"\(the field is missing\)") as err:
        ReferenceStats.load(saved)
    assert str(saved) in str(err.value)


@pytest.mark.parametrize("name, value, match", [
    ("format_version", "1", r"'format_version' must be a positive integer, found \"1\" \(string\)"),
    ("format_version", 0, "'format_version' must be a positive integer"),
    ("sites", "a", r"'sites' must be a non-empty list.*found \"a\" \(string\)"),
    ("sites", [], "'sites' must be a non-empty list"),
    ("sites", ["a", "b.bn", "a"], "'sites' must be .*unique.*found 'a' twice"),
    ("sites", ["a", "", "c"], r"'sites' must be .*non-empty strings.*item 1 = \"\""),
    ("sites", ["a", 3, "c"], r"'sites' .*item 1 = 3 \(integer\)"),
    ("channel_axes", [1, 1, 1], r"'channel_axes' must be an object.*\(array\)"),
    ("channel_axes", {"a": 1, "b.bn": 1}, "'channel_axes' .*no entry for site 'c'"),
    ("channel_axes", {"a": 1, "b.bn": "1", "c": 1}, r"'channel_axes' .*site 'b.bn' → \"1\""),
    ("channel_axes", {"a": 1, "b.bn": True, "c": 1}, r"'channel_axes' .*true \(boolean\)"),
    ("channel_axes", {"a": 1, "b.bn": 1, "c": 1, "z": 1}, r"'channel_axes' .*\['z'\]"),
    ("module_types", {"a": "X", "b.bn": "X"}, "'module_types' .*no entry for site 'c'"),
    ("module_types", {"a": "X", "b.bn": 3, "c": "X"}, "'module_types' .*site 'b.bn' → 3"),
    ("levels", 1, r"'levels' must be an integer >= 2 .*found 1 \(integer\)"),
    ("levels", 9.0, r"'levels' must be an integer >= 2.*found 9.0 \(number\)"),
    ("levels", True, "'levels' must be an integer >= 2"),
    ("fingerprint", None, r"'fingerprint' must be a string.*found null"),
    ("info", [1], r"'info' must be an object.*\(array\)"),
    ("per_sample_sites", "a", "'per_sample_sites' must be a list"),
    ("per_sample_sites", ["a", "z"], "'per_sample_sites' .*'z', which is not in 'sites'"),
    ("per_sample_sites", ["a", "a"], "'per_sample_sites' .*'a' twice"),
])
def test_a_field_of_the_wrong_type_is_named_with_what_was_found(saved, name, value, match):
    _edit_meta(saved, lambda m: m.update({name: value}))
    with pytest.raises(ValueError, match=match) as err:
        ReferenceStats.load(saved)
    assert str(saved) in str(err.value) and f"field '{name}'" in str(err.value)


def test_levels_that_disagree_with_the_tables_are_refused(saved):
    _edit_meta(saved, lambda m: m.update(levels=8))
    with pytest.raises(ValueError, match=r"site 'a' \(quantiles table\) has shape \(4, 9\), "
                                         "expected 8 levels"):
        ReferenceStats.load(saved)


def test_existing_refusals_stay(saved, tmp_path):
    _edit_meta(saved, lambda m: m.update(format_version=2))
    with pytest.raises(ValueError, match="format version 2.*upgrade torch-dmc"):
        ReferenceStats.load(saved)
    save_file({"x": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="no torch-dmc metadata"):
        ReferenceStats.load(tmp_path / "plain.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(ValueError, match="not a safetensors file"):
        ReferenceStats.load(tmp_path / "junk.safetensors")
    with pytest.raises(FileNotFoundError, match="dmc fit"):
        ReferenceStats.load(tmp_path / "missing.safetensors")


def test_check_against_a_model_still_applies(saved):
    assert ReferenceStats.load(saved, model=_model()).sites == list(SITES)
    with pytest.raises(StatsMismatchError, match="channels.*another model"):
        ReferenceStats.load(saved, model=_model(width=2))
    with pytest.raises(StatsMismatchError, match="site 'c'"):
        _load(saved).check_output("c", torch.zeros(2, 7, 6))


# -- the tensors ---------------------------------------------------------------------------------


def test_a_tensor_the_metadata_does_not_name_is_refused(tmp_path):
    stats = _stats()
    tensors = {**_tensors(stats), "quantiles/evil": torch.zeros(2, LEVELS)}
    with pytest.raises(ValueError, match=r"tensors its metadata does not name: \['quantiles/evil'\]"):
        ReferenceStats.load(_craft(tmp_path / "x.safetensors", tensors, _meta(stats)))


def test_a_missing_table_is_refused(tmp_path):
    stats = _stats()
    tensors = _tensors(stats)
    del tensors["per_sample/c"]
    with pytest.raises(ValueError, match=r"is damaged: no table for sites \['per_sample/c'\]"):
        ReferenceStats.load(_craft(tmp_path / "x.safetensors", tensors, _meta(stats)))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64, torch.bfloat16, torch.int32])
def test_a_table_of_another_dtype_is_refused(tmp_path, dtype):
    stats = _stats()
    tensors = _tensors(stats)
    tensors["quantiles/b.bn"] = tensors["quantiles/b.bn"].to(dtype)
    name = str(dtype).split(".")[-1]
    with pytest.raises(ValueError, match=rf"site 'b.bn' \(quantiles table\) has dtype {name}, "
                                         "expected float32 exactly"):
        ReferenceStats.load(_craft(tmp_path / "x.safetensors", tensors, _meta(stats)))


@pytest.mark.parametrize("key, table, match", [
    ("quantiles/a", torch.zeros(4, 3, 3), r"site 'a' \(quantiles table\) has shape \(4, 3, 3\), "
                                          "expected a 2-D"),
    ("quantiles/a", torch.zeros(0, LEVELS), "expected at least one channel"),
    ("per_sample/a", torch.zeros(2, LEVELS), r"site 'a' \(per_sample table\) has 2 channels \(rows\), "
                                             "expected 4"),
    ("per_sample/c", torch.zeros(5, 4), r"site 'c' \(per_sample table\) has shape \(5, 4\), expected 9"),
])
def test_a_table_of_the_wrong_shape_is_refused(tmp_path, key, table, match):
    stats = _stats()
    tensors = {**_tensors(stats), key: table}
    with pytest.raises(ValueError, match=match):
        ReferenceStats.load(_craft(tmp_path / "x.safetensors", tensors, _meta(stats)))


@pytest.mark.parametrize("key, value, match", [
    ("quantiles/c", float("nan"), r"site 'c' \(quantiles table\), channel 2: level 5 is nan"),
    ("per_sample/a", float("inf"), r"site 'a' \(per_sample table\), channel 2: level 5 is inf"),
    ("quantiles/a", float("-inf"), r"site 'a' \(quantiles table\), channel 2: level 5 is -inf"),
])
def test_a_non_finite_entry_is_refused(tmp_path, key, value, match):
    stats = _stats()
    tensors = _tensors(stats)
    tensors[key][2, 5] = value
    with pytest.raises(ValueError, match=match + ", expected finite values only"):
        ReferenceStats.load(_craft(tmp_path / "x.safetensors", tensors, _meta(stats)))


def test_a_decreasing_row_is_refused_naming_site_and_first_channel(tmp_path):
    stats = _stats()
    tensors = _tensors(stats)
    q = tensors["quantiles/b.bn"]
    q[1, [3, 4]] = q[1, [4, 3]]  # swap two levels of channel 1 (distinct: random normals)
    q[2, [6, 7]] = q[2, [7, 6]]
    with pytest.raises(ValueError, match=r"site 'b.bn' \(quantiles table\), channel 1: level 4 is .* < "
                                         "level 3 = .*expected non-decreasing rows"):
        ReferenceStats.load(_craft(tmp_path / "x.safetensors", tensors, _meta(stats)))


# -- construction and validate -------------------------------------------------------------------


def _kwargs(**changes) -> dict:
    s = _stats()
    kw = dict(quantiles=s.quantiles, channel_axes=s.channel_axes, module_types=s.module_types,
              fingerprint=s.fingerprint, info=s.info, per_sample=s.per_sample)
    kw.update(changes)
    return kw


@pytest.mark.parametrize("changes, match", [
    ({"quantiles": {"a": torch.zeros(LEVELS)}}, r"site 'a' \(quantiles table\) has shape \(9,\), "
                                                "expected a 2-D"),
    ({"quantiles": {}}, "quantiles must be a non-empty dict"),
    ({"quantiles": {"a": [[0.0, 1.0]]}}, r"site 'a' \(quantiles table\) is a list, expected a torch.Tensor"),
    ({"channel_axes": {"a": 1, "b.bn": 1}}, r"channel_axes must give an int axis for every site; "
                                            r"it lacks sites \['c'\]"),
    ({"module_types": {"a": "BatchNorm2d"}}, r"module_types .*lacks sites \['b.bn', 'c'\]"),
    ({"channel_axes": {"a": 1, "b.bn": 1, "c": 1, "d": 1}}, r"channel_axes names sites \['d'\]"),
    ({"channel_axes": {"a": 1, "b.bn": "1", "c": 1}}, "channel_axes must map every site to an int"),
    ({"per_sample": {"z": torch.zeros(2, LEVELS)}}, "per_sample has a table for site 'z'"),
    ({"per_sample": {"a": torch.zeros(4, 5)}}, r"site 'a' \(per_sample table\) has shape \(4, 5\)"),
    ({"fingerprint": None}, "fingerprint must be a str"),
])
def test_construction_refuses_what_code_can_get_wrong(changes, match):
    with pytest.raises(ValueError, match="invalid ReferenceStats: " + match):
        ReferenceStats(**_kwargs(**changes))


def test_validate_checks_values_and_save_writes_no_invalid_file(tmp_path):
    q = _stats().quantiles
    q["c"][0, 0] = float("nan")
    stats = ReferenceStats(**_kwargs(quantiles=q))  # construction does not scan the values ...
    with pytest.raises(ValueError, match=r"site 'c' \(quantiles table\), channel 0: level 0 is nan"):
        stats.validate()  # ... validate does
    with pytest.raises(ValueError, match="channel 0: level 0 is nan"):
        stats.save(tmp_path / "bad.safetensors")
    assert not (tmp_path / "bad.safetensors").exists()
    half = ReferenceStats(**_kwargs(quantiles={k: v.half() for k, v in _stats().quantiles.items()},
                                    per_sample={}))
    with pytest.raises(ValueError, match="has dtype float16, expected float32 exactly"):
        half.validate()
