"""The activation store: harvest to real shards on disk, read them back, resume, verify."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_PRETRAIN, copy_lm_with_other_weights

from framework.activations.harvest import harvest, harvest_differences, make_plan
from framework.activations.live import LiveStream
from framework.activations.reader import ActivationStore, ActivationStream, sub_store
from framework.activations.verify import verify_store
from framework.cli import main
from framework.config import load_recipe, save_recipe, with_overrides
from framework.errors import DataError, RecipeError
from framework.lm import load_lm
from framework.text import iter_chosen_context_batches

HOOKS = "[blocks.0.mlp.hook_post,blocks.0.hook_resid_pre]"
SMALL_STORE = [
    f"harvest.hook_points={HOOKS}",
    "harvest.n_tokens=6144",
    "harvest.tokens_per_context=32",
    "harvest.shuffle_window=2048",
    "harvest.rows_per_shard=1024",
    "harvest.rows_per_sample=256",
    "harvest.heldout_tokens=1024",
    "harvest.dtype=float32",
    "harvest.batch_size=8",
]


def store_recipe(pretrained_recipe, workdir: Path, *extra: str):
    return load_recipe(None, [*TINY_PRETRAIN, f"workdir={workdir}", f"lm.path={pretrained_recipe.path('lm')}",
                              *SMALL_STORE, *extra])


def shard_digests(store: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(store.glob("shard-*.tar"))}


@pytest.fixture(scope="module")
def harvested(pretrained_recipe, tmp_path_factory):
    recipe = store_recipe(pretrained_recipe, tmp_path_factory.mktemp("store"))
    harvest(recipe)
    return recipe


def all_rows(location: str, rank: int = 0, world: int = 1):
    stream = ActivationStream(ActivationStore(location), batch_size=1, rank=rank, world=world, shuffle=False)
    return list(stream.iter_rows())


def test_harvested_rows_equal_a_direct_forward_pass_each_row_once(harvested):
    store = harvested.path("activations")
    rows = all_rows(str(store))
    acts = [torch.cat([r.acts[h] for r in rows]) for h in range(2)]
    context = torch.cat([r.context for r in rows])
    position = torch.cat([r.position for r in rows])
    token = torch.cat([r.token for r in rows])
    assert len(context) == 6144
    pairs = set(zip(context.tolist(), position.tolist()))
    assert len(pairs) == len(context), "a (context, position) row appears twice"

    model = load_lm(harvested)
    plan = make_plan(harvested, model, "train", harvested.harvest.n_tokens)
    chosen = torch.cat([plan.window_contexts(w) for w in range(plan.n_windows)]).sort().values
    assert len(chosen) == 6144 // 32 and torch.equal(context.unique(), chosen)
    assert (context.bincount()[chosen] == 32).all(), "each context gives tokens_per_context rows"
    _, tokens = next(iter_chosen_context_batches(harvested.text, model.tokenizer, "train", chosen, len(chosen)))
    hooks = ["blocks.0.mlp.hook_post", "blocks.0.hook_resid_pre"]
    direct = model.run(tokens, capture=hooks).activations
    row_of = torch.searchsorted(chosen, context)  # the row of `tokens` holding each row's context
    for h, hook in enumerate(hooks):
        torch.testing.assert_close(acts[h], direct[hook][row_of, position], rtol=1e-5, atol=1e-5)
    assert torch.equal(token, tokens[row_of, position])
    assert (position >= harvested.harvest.skip_first_tokens).all()


def test_windows_sample_the_whole_split_and_a_larger_harvest_keeps_the_earlier_windows(harvested):
    model = load_lm(harvested)
    plan = make_plan(harvested, model, "train", harvested.harvest.n_tokens)
    windows = [plan.window_contexts(w) for w in range(plan.n_windows)]
    assert plan.n_windows == 3 and all(len(w) == 2048 // 32 for w in windows)
    assert len(torch.cat(windows).unique()) == 3 * 64, "windows are disjoint"
    # Each window samples the whole split, not a run of neighbouring contexts at its start.
    for ids in windows:
        assert ids.min() < plan.split_contexts / 8 and ids.max() > plan.split_contexts * 7 / 8
    larger = make_plan(with_overrides(harvested, ["harvest.n_tokens=12288"]), model, "train", 12288)
    assert all(torch.equal(larger.window_contexts(w), windows[w]) for w in range(3))
    other_seed = make_plan(with_overrides(harvested, ["harvest.seed=1"]), model, "train", 6144)
    assert not torch.equal(other_seed.window_contexts(0), windows[0])
    heldout = make_plan(harvested, model, "heldout", 1024)
    assert heldout.split_contexts < plan.split_contexts and heldout.window_contexts(0).max() < heldout.split_contexts
    # harvest.context_order=source: consecutive contexts from the start, as stores made before the key.
    source = make_plan(with_overrides(harvested, ["harvest.context_order=source"]), model, "train", 6144)
    assert [source.window_contexts(w).tolist() for w in range(3)] == [list(range(64 * w, 64 * (w + 1))) for w in range(3)]


def test_the_context_order_is_fixed_arithmetic_not_a_librarys_shuffle():
    """Which contexts a store holds must not change with a torch or numpy upgrade (a resumed or
    extended harvest would mix two orders): the order is pinned here."""
    from framework.activations.harvest import HarvestPlan

    def order(split: str, seed: int = 0) -> list[int]:
        return HarvestPlan(split, 640, 64, 128, 64, seed, 12, "shuffled").context_sequence.tolist()

    assert order("train") == [3, 10, 1, 9, 4, 2, 6, 5, 11, 7, 8, 0]
    assert order("heldout") == [3, 10, 4, 0, 1, 6, 11, 9, 7, 8, 5, 2]
    assert order("train", seed=1) != order("train")


def test_a_store_harvested_before_context_order_existed_counts_as_source_order(pretrained_recipe, harvested,
                                                                                tmp_path):
    store = tmp_path / "activations"
    store.mkdir()
    claim = json.loads((harvested.path("activations") / "harvest-recipe.json").read_text())
    assert claim["harvest"].pop("context_order") == "shuffled"
    (store / "harvest-recipe.json").write_text(json.dumps(claim))
    with pytest.raises(RecipeError, match=r"harvest.context_order: 'source' there, 'shuffled' here"):
        harvest(store_recipe(pretrained_recipe, tmp_path))
    assert harvest_differences(store, store_recipe(pretrained_recipe, tmp_path, "harvest.context_order=source")) == []


def test_manifest_describes_the_store(harvested):
    store = ActivationStore(str(harvested.path("activations")))
    m = store.manifest
    assert m.hook_points == ["blocks.0.mlp.hook_post", "blocks.0.hook_resid_pre"]
    assert m.d == [512, 128] and m.dtype == "float32" and m.rows == 6144
    assert len(m.shards) == 6 and all(len(s.sha256) == 64 for s in m.shards)
    assert m.model["name"] == "builtin" and m.recipe["harvest"]["n_tokens"] == 6144
    rows = all_rows(str(harvested.path("activations")))
    acts = torch.cat([r.acts[0] for r in rows]).double()
    torch.testing.assert_close(torch.tensor(m.normalisation["blocks.0.mlp.hook_post"]["mean"], dtype=torch.float64), acts.mean(0), rtol=1e-4, atol=1e-6)
    assert m.normalisation["blocks.0.mlp.hook_post"]["mean_norm"] == pytest.approx(acts.norm(dim=1).mean().item(), rel=1e-5)


def test_heldout_store_comes_from_heldout_documents(harvested):
    heldout = ActivationStore(str(harvested.path("activations") / "heldout"))
    assert heldout.manifest.split == "heldout" and heldout.manifest.rows == 1024


def test_shards_are_plain_tar_files_of_npy_members(harvested):
    import tarfile

    with tarfile.open(harvested.path("activations") / "shard-000000.tar") as tar:
        names = tar.getnames()
    assert names[:5] == ["000000_000000.acts0.npy", "000000_000000.acts1.npy", "000000_000000.token.npy",
                         "000000_000000.context.npy", "000000_000000.position.npy"]
    assert len(names) == 5 * (1024 // 256)


def test_several_shard_writers_write_the_store_one_writer_writes(pretrained_recipe, harvested, tmp_path,
                                                                 monkeypatch):
    monkeypatch.setenv("SAE_SHARD_WRITERS", "3")
    recipe = store_recipe(pretrained_recipe, tmp_path, "harvest.heldout_tokens=0")
    harvest(recipe)
    store, expected = recipe.path("activations"), harvested.path("activations")
    assert shard_digests(store) == shard_digests(expected)
    ours, theirs = (json.loads((s / "manifest.json").read_text()) for s in (store, expected))
    assert ours["shards"] == theirs["shards"] and ours["normalisation"] == theirs["normalisation"]


@pytest.mark.parametrize("setting", ["0", "two"])
def test_a_shard_writer_count_that_is_not_a_positive_number_is_refused(setting, monkeypatch):
    from framework.activations.harvest import shard_writers
    from framework.errors import FrameworkError

    monkeypatch.setenv("SAE_SHARD_WRITERS", setting)
    with pytest.raises(FrameworkError, match=f"SAE_SHARD_WRITERS='{setting}'.*whole number"):
        shard_writers()


def test_two_ranks_read_disjoint_rows_that_cover_the_store(harvested):
    location = str(harvested.path("activations"))
    ranks = [all_rows(location, rank, 2) for rank in (0, 1)]
    keys = [{(c, p) for r in rows for c, p in zip(r.context.tolist(), r.position.tolist())} for rows in ranks]
    assert keys[0] and keys[1] and not keys[0] & keys[1]
    assert len(keys[0] | keys[1]) == 6144


def test_a_manifest_whose_width_was_edited_is_named_when_its_shards_are_read(harvested, tmp_path):
    """d in manifest.json changed after the harvest: training used to fail deep in the SAE's
    initialisation with a tensor size mismatch; reading the first shard names it."""
    import shutil

    store = tmp_path / "store"
    shutil.copytree(harvested.path("activations"), store, copy_function=os.link)
    manifest = json.loads((store / "manifest.json").read_text())
    (store / "manifest.json").unlink()  # a hard link: the fixture's manifest stays as it is
    edited = [manifest["d"][0] // 2, *manifest["d"][1:]]
    (store / "manifest.json").write_text(json.dumps({**manifest, "d": edited}))
    with pytest.raises(DataError, match=rf"shard \S+ in {store} holds rows {re.escape(str(manifest['d']))} wide where "
                                        rf"its manifest.json says d={re.escape(str(edited))} .*was edited: delete it"):
        next(iter(ActivationStream(ActivationStore(str(store)), batch_size=16, shuffle=False)))


def test_store_streams_over_http_and_pipe_urls_with_verified_checksums(harvested):
    """A store served by a real HTTP server, and one read through `pipe:cat`, give the rows of
    the local directory; checksums verify over the URL too."""
    import functools
    import http.server
    import threading

    local = str(harvested.path("activations"))
    expected = torch.cat([r.acts[0] for r in all_rows(local)])
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=local)
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        store = ActivationStore(url, verify=True)
        assert store.shard_url(0).startswith(url)
        over_http = list(ActivationStream(store, batch_size=1, shuffle=False).iter_rows())
    finally:
        server.shutdown()
        server.server_close()
    assert torch.equal(torch.cat([r.acts[0] for r in over_http]), expected)

    # A pipe command names each member with {name} (as `pipe:aws s3 cp s3://b/store/{name} -` would).
    piped = ActivationStore(f"pipe:cat {local}/{{name}}", verify=True)
    assert piped.shard_url(1) == f"pipe:cat {local}/shard-000001.tar"
    rows = list(ActivationStream(piped, batch_size=1, shuffle=False).iter_rows())
    assert torch.equal(torch.cat([r.acts[0] for r in rows]), expected)
    assert ActivationStore(sub_store(piped.location, "heldout")).manifest.split == "heldout"

    # file:///absolute/path, the URL form of a local store (docs/activations.md)
    as_file_url = ActivationStore(f"file://{local}", verify=True)
    rows = list(ActivationStream(as_file_url, batch_size=1, shuffle=False).iter_rows())
    assert torch.equal(torch.cat([r.acts[0] for r in rows]), expected)


def test_verify_on_read_covers_the_held_out_split_that_eval_and_training_read(harvested, tmp_path):
    """A changed byte in a held-out shard (not a truncation: the tar still reads) is found by its
    checksum when harvest.verify_on_read is on, by `sae eval`'s and training's held-out reads too."""
    import shutil

    from framework.evaluation.evaluate import heldout_activations
    from framework.training.data import ActivationDataModule

    store = tmp_path / "activations"
    shutil.copytree(harvested.path("activations"), store)
    shard = store / "heldout" / "shard-000000.tar"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01  # inside the activations, not the tar headers
    shard.write_bytes(bytes(data))
    recipe = store_recipe(harvested, tmp_path, f"harvest.output_dir={store}", "harvest.verify_on_read=true",
                          "train.n_tokens=1024", "train.batch_size=256")
    with pytest.raises(DataError, match=r"shard-000000.tar.*checksum"):
        heldout_activations(recipe, load_lm(recipe), "blocks.0.mlp.hook_post", 64)
    with pytest.raises(DataError, match=r"shard-000000.tar.*checksum"):
        ActivationDataModule(recipe).heldout_batches(1, 64)


def test_store_reads_through_fsspec_and_names_a_missing_backend(harvested):
    """Schemes webdataset has no opener for go through fsspec: a store copied into fsspec's
    in-memory filesystem gives the directory's rows; s3:// without s3fs says what to install."""
    import fsspec

    local = harvested.path("activations")
    memory = fsspec.filesystem("memory")
    for path in local.iterdir():
        if path.is_file():
            memory.pipe(f"/sae-store/{path.name}", path.read_bytes())
    try:
        rows = list(ActivationStream(ActivationStore("memory://sae-store", verify=True), batch_size=1,
                                     shuffle=False).iter_rows())
    finally:
        memory.rm("/sae-store", recursive=True)
    expected = torch.cat([r.acts[0] for r in all_rows(str(local))])
    assert torch.equal(torch.cat([r.acts[0] for r in rows]), expected)
    import importlib.util

    if importlib.util.find_spec("s3fs") is None:  # with s3fs installed this would reach for S3
        with pytest.raises(DataError, match="s3fs.*pipe:aws s3 cp"):
            ActivationStore("s3://bucket/store")


def test_resumed_stream_continues_where_it_stopped(harvested):
    store = ActivationStore(str(harvested.path("activations")))
    full = list(ActivationStream(store, batch_size=512, seed=3, epochs=2))
    resumed = list(ActivationStream(store, batch_size=512, seed=3, epochs=2, start_row=5 * 512))
    assert len(full) == 24 and len(resumed) == 19
    for a, b in zip(full[5:], resumed):
        assert torch.equal(a[0], b[0])


@pytest.mark.parametrize("workers,batch,max_batches,world", [
    (2, 384, 29, 1),  # a batch count that is no multiple of the workers
    (3, 1000, None, 1),  # the stream's own end
    (3, 2000, 2, 1),  # fewer batches than workers: one worker yields nothing
    (2, 300, None, 2),  # rank 1 of 2
])
def test_dataloader_workers_yield_the_batches_of_one_process_in_order(harvested, workers, batch, max_batches, world):
    # train.num_workers > 0: each worker process yields every workers-th batch; the DataLoader's
    # round-robin must give back exactly the one-process sequence (here with a resume in
    # mid-sample, two epochs, and checksums verified on read).
    from torch.utils.data import DataLoader

    store = ActivationStore(str(harvested.path("activations")), verify=True)
    options = dict(batch_size=batch, seed=3, epochs=2, start_row=700, max_batches=max_batches,
                   rank=world - 1, world=world)
    expected = list(ActivationStream(store, **options))
    got = list(DataLoader(ActivationStream(store, **options), batch_size=None, num_workers=workers))
    assert len(got) == len(expected) > 0
    if max_batches is not None:
        assert len(expected) == max_batches
    for a, b in zip(got, expected):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_rows_after_a_mid_shard_resume_are_the_rest_of_the_stream(harvested):
    store = ActivationStore(str(harvested.path("activations")))
    everything = torch.cat([rows.acts[0] for rows in ActivationStream(store, 1, seed=5).iter_rows()])
    resumed = torch.cat([rows.acts[0] for rows in ActivationStream(store, 1, seed=5, start_row=1500).iter_rows()])
    assert torch.equal(resumed, everything[1500:])


def test_a_worker_decodes_only_the_samples_of_its_own_batches(harvested):
    from framework.activations.reader import Skipped, WorkerShare, rebatch

    store = ActivationStore(str(harvested.path("activations")))
    stream = ActivationStream(store, batch_size=512, shuffle=False)
    everything = list(stream)
    share = WorkerShare(1, 3, 512, None)  # worker 1 of 3: batches 1, 4, 7, 10
    blocks = list(stream._rows(share))
    decoded = sum(len(b) for b in blocks if not isinstance(b, Skipped))
    assert sum(len(b) for b in blocks) == 6144 and decoded == 4 * 512
    mine = list(rebatch(iter(blocks), 512, share=share))
    assert len(mine) == 4 and all(torch.equal(a[0], b[0]) for a, b in zip(mine, everything[1::3]))
    # A shard without rows of the worker's batches is not even opened.
    share = WorkerShare(0, 2, 2048, 2)  # batch 0 only (batch 1 is worker 1's; 2 batches in all)
    blocks = list(ActivationStream(store, batch_size=2048, shuffle=False)._rows(share))
    assert [len(b) for b in blocks if isinstance(b, Skipped)][-4:] == [1024] * 4  # shards 2-5 never opened


def test_a_local_shard_is_read_with_random_access_and_declined_samples_are_never_read(harvested):
    """tar_members reads a local shard's members in one read each, seeking past the samples it
    is told to decline; the members it reads are the tar's bytes."""
    import io
    import tarfile

    from framework.activations.reader import tar_members

    shard = harvested.path("activations") / "shard-000000.tar"
    with tarfile.open(shard) as tar:
        truth = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}

    class Counting(io.FileIO):
        read_bytes = 0

        def readinto(self, buffer):
            n = super().readinto(buffer)
            Counting.read_bytes += n
            return n

    with Counting(shard) as raw, io.BufferedReader(raw, buffer_size=512) as stream:
        members = list(tar_members(stream, str(shard), wanted=lambda index: index % 2 == 0))
    keys = sorted({name.split(".")[0] for name in truth})
    assert [m["fname"] for m in members] == list(truth)
    for m in members:
        taken = keys.index(m["fname"].split(".")[0]) % 2 == 0
        assert (m["data"] == truth[m["fname"]]) if taken else m["data"] is None
    taken_bytes = sum(len(v) for k, v in truth.items() if keys.index(k.split(".")[0]) % 2 == 0)
    skipped_bytes = sum(len(v) for v in truth.values()) - taken_bytes
    assert skipped_bytes > 0 and Counting.read_bytes < shard.stat().st_size - skipped_bytes // 2


@pytest.mark.parametrize("array", [
    np.arange(24, dtype=np.uint16).reshape(4, 6),  # a bfloat16 store's acts
    np.arange(6, dtype=np.int64), np.arange(6, dtype=np.int16), np.float32(3.5).reshape(()),
    np.asfortranarray(np.arange(12, dtype=np.float32).reshape(3, 4)), np.zeros((0, 576), np.float16),
])
@pytest.mark.parametrize("version", [(1, 0), (2, 0)])
def test_npy_members_decode_as_np_load_reads_them(array, version):
    import io

    from framework.activations.format import npy_array

    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, array, version=version, allow_pickle=False)
    data = buffer.getvalue()
    for raw in (data, bytearray(data)):
        decoded = npy_array(raw)
        expected = np.load(io.BytesIO(data), allow_pickle=False)
        assert decoded.dtype == expected.dtype and decoded.shape == expected.shape
        assert np.array_equal(decoded, expected) and decoded.flags.writeable


def test_npy_members_of_python_objects_are_refused():
    import io

    from framework.activations.format import npy_array

    buffer = io.BytesIO()
    np.save(buffer, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="refused"):
        npy_array(buffer.getvalue())
    with pytest.raises(ValueError, match="not a .npy"):
        npy_array(b"PK\x03\x04 not an array")


def test_epochs_visit_every_row_once_each_in_a_new_order(harvested):
    store = ActivationStore(str(harvested.path("activations")))
    first, second = (list(ActivationStream(store, 1024, seed=1, epochs=1 + e))[6 * e:] for e in (0, 1))
    assert len(first) == len(second) == 6
    assert not torch.equal(torch.cat([b[0] for b in first]), torch.cat([b[0] for b in second]))
    assert torch.allclose(torch.cat([b[0] for b in first]).sum(0), torch.cat([b[0] for b in second]).sum(0), rtol=1e-4)


def test_live_mode_yields_the_rows_the_store_holds(harvested):
    model = load_lm(harvested)
    live = list(LiveStream(model, harvested, batch_size=1000))
    stored = list(ActivationStream(ActivationStore(str(harvested.path("activations"))), 1000, shuffle=False))
    assert len(live) == len(stored) == 6
    for a, b in zip(live, stored):
        for h in range(2):
            torch.testing.assert_close(a[h], b[h], rtol=1e-5, atol=1e-6)


def test_live_mode_reads_the_split_a_harvest_of_the_recipe_reads(harvested):
    """harvest.split=heldout makes a store of held-out text; live mode read the train split
    whatever the recipe said (its stream, its row count check and its samples)."""
    model = load_lm(harvested)
    heldout_recipe = with_overrides(harvested, ["harvest.split=heldout", "harvest.heldout_tokens=0"])
    live = next(iter(LiveStream(model, heldout_recipe, batch_size=64)))
    named = next(iter(LiveStream(model, harvested, batch_size=64, split="heldout")))
    train = next(iter(LiveStream(model, harvested, batch_size=64)))
    assert torch.equal(live[0], named[0]) and not torch.equal(live[0], train[0])


@pytest.mark.parametrize("manifest, message", [
    ({"model": {}}, r"is not a valid manifest \(KeyError: 'shards'\); re-run `sae harvest RECIPE`"),
    ([1, 2], r"is not a valid manifest \((TypeError|ValueError)"),
    ("format 2", r"is in shard format 2; this version of the framework reads format 1"),
    ("format 2 with a new field", r"is in shard format 2; this version of the framework reads format 1"),
])
def test_a_manifest_this_version_cannot_read_is_named_with_what_to_do(harvested, tmp_path, manifest, message):
    """JSON that is no manifest came out as a KeyError traceback from the reader (URL stores,
    the held-out split, `sae eval`); a newer shard format was read as if it were this one."""
    if manifest.startswith("format 2") if isinstance(manifest, str) else False:
        extra = {"new_field": 1} if manifest.endswith("new field") else {}
        manifest = json.loads((harvested.path("activations") / "manifest.json").read_text()) | {"format_version": 2} | extra
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=message):
        ActivationStore(str(tmp_path))


def test_live_rows_are_rounded_as_a_bfloat16_store_holds_them(pretrained_recipe, tmp_path):
    recipe = store_recipe(pretrained_recipe, tmp_path, "harvest.dtype=bfloat16", "harvest.heldout_tokens=0")
    harvest(recipe)
    live = list(LiveStream(load_lm(recipe), recipe, batch_size=1024))
    stored = list(ActivationStream(ActivationStore(str(recipe.path("activations"))), 1024, shuffle=False))
    assert len(live) == len(stored) == 6
    for a, b in zip(live, stored):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_live_mode_refuses_to_repeat_rows_and_draws_each_sample_from_its_own_windows(harvested):
    """A store refuses more training rows than it holds (times train.epochs); live activations
    have no epochs, and Lightning would silently start the stream again. Samples (resampling
    draws one per resampling step) start at another window per seed, as a store's start at
    another shard."""
    import copy

    from framework.training.data import ActivationDataModule

    recipe = copy.deepcopy(harvested)
    recipe.harvest.mode, recipe.train.n_tokens = "live", 4 * 4096
    model = load_lm(harvested)
    with pytest.raises(DataError, match=r"train.n_tokens=16,384 needs 16,384 rows per rank but harvest.mode=live "
                                        r"with harvest.n_tokens=6,144 generates 6,144 per rank"):
        ActivationDataModule(recipe, model=model)
    recipe.train.n_tokens = 4096
    data = ActivationDataModule(recipe, model=model)
    one, again, other = data.sample(64, seed=1), data.sample(64, seed=1), data.sample(64, seed=2)
    assert torch.equal(one[0], again[0]) and not torch.equal(one[0], other[0])


def test_live_mode_refuses_dataloader_workers(harvested):
    import copy

    from framework.errors import RecipeError
    from framework.training.data import ActivationDataModule

    recipe = copy.deepcopy(harvested)
    recipe.harvest.mode, recipe.train.num_workers, recipe.train.n_tokens = "live", 2, 4096
    with pytest.raises(RecipeError, match=r"train.num_workers=2 with harvest.mode=live.*train.num_workers=0.*"
                                          r"harvest.mode=shards"):
        ActivationDataModule(recipe, model=load_lm(harvested))


def test_rerun_of_a_complete_harvest_does_nothing(harvested):
    before = shard_digests(harvested.path("activations"))
    mtimes = {p: p.stat().st_mtime for p in harvested.path("activations").glob("shard-*.tar")}
    harvest(harvested)
    assert shard_digests(harvested.path("activations")) == before
    assert mtimes == {p: p.stat().st_mtime for p in harvested.path("activations").glob("shard-*.tar")}


def test_killed_harvest_resumed_equals_uninterrupted(pretrained_recipe, harvested, tmp_path):
    recipe = store_recipe(pretrained_recipe, tmp_path, "harvest.heldout_tokens=0")
    store = recipe.path("activations")
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text("{}\n")
    args = [sys.executable, "-m", "framework.cli", "harvest", str(recipe_file), *TINY_PRETRAIN,
            f"workdir={tmp_path}", f"lm.path={pretrained_recipe.path('lm')}", *SMALL_STORE,
            "harvest.heldout_tokens=0"]
    env = dict(os.environ, SAE_HARVEST_WINDOW_DELAY_S="3")
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while not (store / "window-000000.json").exists():
        assert proc.poll() is None, proc.stdout.read().decode()
        assert time.time() < deadline
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (store / "manifest.json").exists()
    assert len(list(store.glob("window-*.json"))) < 3
    harvest(recipe)
    expected = shard_digests(harvested.path("activations"))
    assert shard_digests(store) == expected


def test_corrupted_shard_is_named_by_verify_and_by_the_reader(harvested, tmp_path):
    import shutil

    copy = tmp_path / "activations"
    shutil.copytree(harvested.path("activations"), copy)
    recipe = load_recipe(None, [f"harvest.output_dir={copy}"])
    assert "verified 7 shards" in verify_store(recipe)
    shard = copy / "shard-000002.tar"
    data = bytearray(shard.read_bytes())
    data[5000] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match="shard-000002.tar.*checksum"):
        verify_store(recipe)
    with pytest.raises(DataError, match="shard-000002.tar.*checksum"):
        list(ActivationStream(ActivationStore(str(copy), verify=True), 1024, shuffle=False))


def test_verify_checks_every_shard_and_names_all_the_bad_ones_in_one_error(harvested, tmp_path, capsys):
    """Stopping at the first bad shard made a user re-run --verify once per damaged shard."""
    import shutil

    copy = tmp_path / "activations"
    shutil.copytree(harvested.path("activations"), copy)
    corrupted = copy / "shard-000002.tar"
    data = bytearray(corrupted.read_bytes())
    data[5000] ^= 0xFF
    corrupted.write_bytes(bytes(data))
    (copy / "shard-000004.tar").unlink()
    truncated = copy / "heldout" / "shard-000000.tar"
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    recipe = load_recipe(None, [f"harvest.output_dir={copy}"])
    with pytest.raises(DataError) as err:
        verify_store(recipe)
    lines = str(err.value).splitlines()
    assert lines[0] == f"3 of 7 shards in {copy} do not match the manifest:"
    assert lines[1].startswith("  shard-000002.tar: fails its checksum")
    assert lines[2] == "  shard-000004.tar: missing"
    assert lines[3].startswith("  heldout/shard-000000.tar: fails its checksum")
    assert "Delete those shards and re-run `sae harvest RECIPE`" in lines[4]

    recipe_file = save_recipe(recipe, tmp_path / "recipe")
    assert main(["harvest", str(recipe_file), "--verify"]) == 2
    assert capsys.readouterr().err.startswith("sae harvest: error: 3 of 7 shards")


def test_truncated_shard_is_named_by_the_reader(harvested, tmp_path):
    import shutil

    copy = tmp_path / "activations"
    shutil.copytree(harvested.path("activations"), copy)
    shard = copy / "shard-000001.tar"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(DataError, match="shard-000001.tar.*(truncated|corrupt)"):
        list(ActivationStream(ActivationStore(str(copy)), 1024, shuffle=False))


def test_missing_shard_is_named_by_the_reader(harvested, tmp_path):
    import shutil

    copy = tmp_path / "activations"
    shutil.copytree(harvested.path("activations"), copy)
    (copy / "shard-000003.tar").unlink()
    with pytest.raises(DataError, match="shard-000003.tar.*missing"):
        list(ActivationStream(ActivationStore(str(copy)), 1024, shuffle=False))


@pytest.mark.parametrize("shard, damage", [
    ("shard-000003.tar", "deleted"),
    ("shard-000003.tar", "deleted with its window record"),
    ("shard-000003.tar", "truncated"),
    ("heldout/shard-000000.tar", "deleted"),
])
def test_rerunning_harvest_rewrites_a_damaged_shard_of_a_complete_store(pretrained_recipe, harvested, tmp_path,
                                                                       shard, damage):
    """What the reader's errors advise (delete the shard, re-run `sae harvest`) repairs the store:
    the COMPLETE marker is not taken on trust, and only the damaged shard's window is redone."""
    import shutil

    copy = tmp_path / "activations"
    shutil.copytree(harvested.path("activations"), copy)
    recipe = store_recipe(pretrained_recipe, tmp_path, f"harvest.output_dir={copy}")
    def digests() -> dict[str, str]:
        return {**shard_digests(copy), **{f"heldout/{k}": v for k, v in shard_digests(copy / "heldout").items()}}

    expected = digests()
    untouched = {p: p.stat().st_mtime_ns for p in copy.glob("shard-*.tar") if p.name not in ("shard-000002.tar", shard)}
    path = copy / shard
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        path.unlink()
    if damage == "deleted with its window record":
        (copy / "window-000001.json").unlink()  # shards 2 and 3 make window 1

    harvest(recipe)
    assert digests() == expected
    assert untouched == {p: p.stat().st_mtime_ns for p in untouched}
    assert (copy / "COMPLETE").is_file()
    assert "verified 7 shards" in verify_store(recipe)


def test_contexts_longer_than_the_lm_reads_are_refused_before_harvest_writes_anything(pretrained_recipe, tmp_path,
                                                                                     capsys):
    recipe = store_recipe(pretrained_recipe, tmp_path, "text.context_length=128")
    with pytest.raises(RecipeError, match=r"text.context_length=128 .*n_ctx is 64 .*text.context_length=64 or less"):
        harvest(recipe)
    assert not recipe.path("activations").exists()

    yaml = save_recipe(recipe, tmp_path / "recipe")
    assert main(["harvest", str(yaml)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sae harvest: error: text.context_length=128") and "Traceback" not in err
    assert not recipe.path("activations").exists()


def test_missing_store_says_to_harvest(tmp_path):
    with pytest.raises(DataError, match="sae harvest"):
        ActivationStore(str(tmp_path / "nowhere"))


def test_sae_hook_or_width_that_the_store_lacks_is_refused(harvested):
    store = ActivationStore(str(harvested.path("activations")))
    with pytest.raises(DataError, match="blocks.0.hook_mlp_out"):
        store.check_compatible("blocks.0.hook_mlp_out", 128, "s")
    with pytest.raises(DataError, match="d=256.*d=512"):
        store.check_compatible("blocks.0.mlp.hook_post", 256, "s")


def test_harvest_into_a_store_of_another_recipe_is_refused(pretrained_recipe, harvested):
    other = store_recipe(pretrained_recipe, Path(harvested.workdir), "harvest.tokens_per_context=16")
    with pytest.raises(Exception, match="different recipe"):
        harvest(other)


def test_resuming_a_partial_harvest_of_another_recipe_names_the_keys_that_differ(pretrained_recipe, harvested,
                                                                                tmp_path):
    partial = tmp_path / "activations"
    partial.mkdir()
    (partial / "harvest-recipe.json").write_bytes((harvested.path("activations") / "harvest-recipe.json").read_bytes())
    other = store_recipe(pretrained_recipe, tmp_path, "harvest.seed=1")
    with pytest.raises(RecipeError, match=r"partial harvest of a different recipe \(harvest.seed: 0 there, 1 here\)"):
        harvest(other)
    assert sorted(p.name for p in partial.iterdir()) == ["harvest-recipe.json"]


def test_harvest_with_other_lm_weights_into_a_store_is_refused_and_the_store_is_kept(pretrained_recipe, harvested,
                                                                                      tmp_path):
    """lm.path is not part of the recipe fingerprint: the weights hash tells another LM apart,
    for a complete store (which would otherwise be reported as done) and a partial one (whose
    windows would be mixed with another LM's)."""
    other = copy_lm_with_other_weights(pretrained_recipe.path("lm"), tmp_path / "other-lm")
    store = harvested.path("activations")
    before = shard_digests(store)
    refusal = r"harvested from LM weights with sha256 .*lm.path=.*other-lm.*point lm.path at the LM that made the store"
    with pytest.raises(RecipeError, match=refusal):
        harvest(store_recipe(pretrained_recipe, Path(harvested.workdir), f"lm.path={other}"))
    assert shard_digests(store) == before and (store / "COMPLETE").is_file()

    partial = tmp_path / "activations"
    partial.mkdir()
    (partial / "harvest-recipe.json").write_bytes((store / "harvest-recipe.json").read_bytes())
    with pytest.raises(RecipeError, match=refusal):
        harvest(store_recipe(pretrained_recipe, tmp_path, f"lm.path={other}"))
    assert sorted(p.name for p in partial.iterdir()) == ["harvest-recipe.json"]


def test_activations_beyond_float16s_range_are_refused_before_a_float16_store_holds_them_as_inf(
        pretrained_recipe, tmp_path, monkeypatch):
    """The LM's real activations, scaled past 65,504 (as some LMs' residual streams are): the
    harvest stops naming the hook and bfloat16, with no shard written; bfloat16 keeps them."""
    from framework.lm.builtin import BuiltinLM

    real_run = BuiltinLM.run

    def run_loud(self, tokens, **kwargs):
        out = real_run(self, tokens, **kwargs)
        out.activations = {h: a * 1e6 for h, a in out.activations.items()}
        return out

    monkeypatch.setattr(BuiltinLM, "run", run_loud)
    with pytest.raises(DataError, match=r"activations at blocks\.0\.\S+ reach [\d,]+ \(window 0\), beyond "
                                        r"float16's largest value \(65,504\).*harvest.dtype=bfloat16"):
        harvest(store_recipe(pretrained_recipe, tmp_path / "f16", "harvest.dtype=float16"))
    assert not list((tmp_path / "f16").rglob("shard-*.tar"))
    store = harvest(store_recipe(pretrained_recipe, tmp_path / "bf16", "harvest.dtype=bfloat16"))
    rows = next(ActivationStream(ActivationStore(str(store)), 256, shuffle=False).iter_rows())
    assert all(torch.isfinite(a).all() and a.abs().max() > 65_504 for a in rows.acts)


@pytest.mark.parametrize("writers", ["1", "3"])
def test_full_disk_stops_with_a_message_and_keeps_nothing_partial(pretrained_recipe, tmp_path, writers):
    """RLIMIT_FSIZE makes the write fail with EFBIG, as a full disk fails with ENOSPC; with
    several writer threads, every write in flight fails or finishes before the harvest stops."""
    script = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (400_000, 400_000))
from framework.cli import main
sys.exit(main(["harvest", sys.argv[1], *sys.argv[2:]]))
"""
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text("{}\n")
    args = [sys.executable, "-c", script, str(recipe_file), *TINY_PRETRAIN, f"workdir={tmp_path}",
            f"lm.path={pretrained_recipe.path('lm')}", *SMALL_STORE]
    result = subprocess.run(args, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, SAE_SHARD_WRITERS=writers))
    assert result.returncode == 2, result.stderr[-2000:]
    assert "disk full while writing shard-000000.tar" in result.stderr
    store = tmp_path / "activations"
    assert not list(store.glob("window-*.json")) and not list(store.glob("*.partial")) and not list(store.glob(".*partial"))
    assert not (store / "manifest.json").exists()


@pytest.mark.distributed
def test_torchrun_harvest_with_two_ranks_equals_one_process(pretrained_recipe, harvested, tmp_path):
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text("{}\n")
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
            "-m", "framework.cli", "harvest", str(recipe_file), *TINY_PRETRAIN, f"workdir={tmp_path}",
            f"lm.path={pretrained_recipe.path('lm')}", *SMALL_STORE]
    result = subprocess.run(args, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert shard_digests(tmp_path / "activations") == shard_digests(harvested.path("activations"))
    manifest = json.loads((tmp_path / "activations" / "manifest.json").read_text())
    assert manifest["rows"] == 6144 and len(manifest["shards"]) == 6


def test_training_past_an_epoch_on_shards_the_ranks_do_not_divide_warns(harvested, caplog):
    """Ranks with an extra shard cross into the next epoch later: a global batch near the
    crossing can hold one shard's rows twice, read by two ranks."""
    from framework.training.data import ActivationDataModule

    store = ActivationStore(harvested.store_location())
    shards, sizes = store.n_shards, {s.rows for s in store.manifest.shards}
    assert sizes == {1024}  # equal shards: the ranks' rows per epoch differ only where they do not divide
    recipe = with_overrides(harvested, ["train.n_tokens=8192", "train.batch_size=256", "train.epochs=4"])
    uneven = next(w for w in (4, 5, 3) if shards % w)
    even = next(w for w in (2, 3) if shards % w == 0)
    with caplog.at_level("WARNING", logger="framework.training.data"):
        ActivationDataModule(recipe, world_size=even)
        ActivationDataModule(with_overrides(recipe, ["train.n_tokens=1024"]), world_size=uneven)  # within an epoch
        assert "different numbers of rows per epoch" not in caplog.text
        ActivationDataModule(recipe, world_size=uneven)
    assert f"whose {shards} shards give the {uneven} data-parallel ranks different numbers of rows" in caplog.text
