"""The bounded attention store: fp16 entries, RAM budget, memory-mapped spill, save/load."""

import json
import os

import pytest
import torch

from diffstream.attention.store import AttentionStore, format_bytes, parse_size
from diffstream.errors import ConfigError, InputError, OutputError


def entry(seed, shape=(3, 16, 8)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def test_parse_size():
    assert parse_size("4GB") == 4 * 2**30
    assert parse_size("512MB") == 512 * 2**20
    assert parse_size("1.5g") == int(1.5 * 2**30)
    assert parse_size("0") == 0
    assert parse_size("inf") is None
    for bad in ("lots", "-1GB", "4 XB", ""):
        with pytest.raises(ConfigError):
            parse_size(bad)
    assert format_bytes(3 * 2**30) == "3.00 GiB"


def test_entries_are_stored_in_fp16_and_read_back_in_any_dtype():
    store = AttentionStore(budget_bytes=None)
    x = entry(0)
    store.put(("self", "a", 0), x)
    got = store.get(("self", "a", 0))
    assert got.dtype == torch.float16 and torch.equal(got, x.half())
    assert torch.equal(store.get(("self", "a", 0), dtype=torch.float32), x.half().float())
    assert store.nbytes == x.numel() * 2 and store.disk_bytes == 0
    # per-entry dtype override (latents stay fp32)
    store.put(("latent", "z", 5), x, dtype=torch.float32)
    assert torch.equal(store.get(("latent", "z", 5)), x)
    # the store owns a copy
    x.add_(1)
    assert not torch.equal(store.get(("latent", "z", 5)), x)


def test_budget_spills_the_excess_to_disk_with_identical_values():
    one = 3 * 16 * 8 * 2  # bytes of one fp16 entry
    store = AttentionStore(budget_bytes=2 * one)
    values = {("cross", f"l{i}", i): entry(i) for i in range(5)}
    for key, value in values.items():
        store.put(key, value)
    assert store.ram_bytes == 2 * one and store.disk_bytes == 3 * one
    assert len(store) == 5 and set(store.keys()) == set(values)
    for key, value in values.items():
        assert torch.equal(store.get(key), value.half())
        assert store.shape(key) == (3, 16, 8)
    assert store.nbytes_of(["cross"]) == 5 * one and store.nbytes_of(["self"]) == 0
    spill = store._spill_path
    assert os.path.getsize(spill) == 3 * one
    store.close()
    assert not os.path.exists(spill)


def test_zero_budget_keeps_nothing_in_ram():
    store = AttentionStore(budget_bytes=0)
    store.put(("self", "a", 1), entry(1))
    assert store.ram_bytes == 0 and torch.equal(store.get(("self", "a", 1)), entry(1).half())
    store.close()


def test_replacing_an_entry_keeps_the_accounting_right():
    store = AttentionStore(budget_bytes=None)
    store.put(("self", "a", 0), entry(0))
    store.put(("self", "a", 0), entry(1))
    assert len(store) == 1 and store.ram_bytes == entry(0).numel() * 2
    assert torch.equal(store.get(("self", "a", 0)), entry(1).half())


def test_save_and_load_round_trip_without_reading_into_ram(tmp_path):
    one = 3 * 16 * 8 * 2
    store = AttentionStore(budget_bytes=one)  # one entry in RAM, the rest spilled
    for i in range(3):
        store.put(("self", "layer", i), entry(i))
    store.put(("latent", "z", 9), entry(9), dtype=torch.float32)
    store.meta = {"rows": [0, 1, 2]}
    store.save(tmp_path / "inv")
    loaded = AttentionStore.load(tmp_path / "inv")
    assert loaded.ram_bytes == 0 and loaded.nbytes == store.nbytes
    assert loaded.meta == {"rows": [0, 1, 2]}
    assert set(loaded.keys()) == set(store.keys())
    for key in store.keys():
        assert torch.equal(loaded.get(key), store.get(key))
        assert loaded.get(key).dtype == store.get(key).dtype
    with pytest.raises(RuntimeError):
        loaded.put(("self", "layer", 7), entry(7))
    with pytest.raises(OutputError):
        store.save(tmp_path / "inv")  # never overwrite a saved store
    loaded.close()
    store.close()
    assert (tmp_path / "inv" / "entries.bin").exists()  # closing a loaded store keeps the files


def test_load_rejects_missing_or_damaged_folders(tmp_path):
    with pytest.raises(InputError):
        AttentionStore.load(tmp_path / "nothing")
    store = AttentionStore()
    store.put(("self", "a", 0), entry(0))
    store.save(tmp_path / "s")
    with open(tmp_path / "s" / "entries.bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(InputError, match="incomplete"):
        AttentionStore.load(tmp_path / "s")
    index = json.loads((tmp_path / "s" / "index.json").read_text())
    index["version"] = 999
    (tmp_path / "s" / "index.json").write_text(json.dumps(index))
    with pytest.raises(InputError, match="incompatible"):
        AttentionStore.load(tmp_path / "s")


def test_bad_settings_are_one_line_errors():
    with pytest.raises(ConfigError):
        AttentionStore(dtype=torch.bfloat16)
    with pytest.raises(ConfigError):
        AttentionStore(budget_bytes=-1)
