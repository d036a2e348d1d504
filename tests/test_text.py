"""The text stage: sources, the document split, and packing into contexts with stable ids."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from framework.config import TextConfig
from framework.lm.tokenizer import train_tokenizer
from framework.text import (
    TextSourceError,
    count_contexts,
    iter_chosen_context_batches,
    iter_context_batches,
    iter_contexts,
    iter_documents,
    iter_split,
    load_contexts,
)

STDLIB_SAMPLE = TextConfig(max_documents=60, context_length=32, heldout_fraction=0.2)


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(STDLIB_SAMPLE, vocab_size=512)


def write_corpus(tmp_path, n: int = 12) -> TextConfig:
    for i in range(n):
        (tmp_path / f"doc{i:02d}.txt").write_text(f"document {i} says " + "hello world " * (5 + i))
    return TextConfig(source=str(tmp_path), context_length=16, heldout_fraction=0.25)


# ---- sources -----------------------------------------------------------------------------------


def test_stdlib_source_reads_python_files_without_test_suites_or_site_packages():
    docs = list(iter_documents(TextConfig()))
    ids = [d.doc_id for d in docs]
    assert len(docs) > 500 and ids == sorted(ids)
    assert "stdlib/json/decoder.py" in ids
    assert not [i for i in ids if {"test", "tests", "idle_test", "site-packages"} & set(i.split("/"))]
    assert 10_000_000 < sum(len(d.text) for d in docs) < 20_000_000


def test_max_documents_caps_the_corpus():
    assert len(list(iter_documents(TextConfig(max_documents=7)))) == 7


def test_txt_files_load_one_document_per_file_named_relative_to_the_source(tmp_path):
    cfg = write_corpus(tmp_path, n=3)
    docs = list(iter_documents(cfg))
    assert [d.doc_id for d in docs] == ["doc00.txt", "doc01.txt", "doc02.txt"]
    assert docs[1].text.startswith("document 1 says hello")


def test_a_glob_selects_matching_files(tmp_path):
    write_corpus(tmp_path, n=12)
    docs = list(iter_documents(TextConfig(source=str(tmp_path / "doc1*.txt"))))
    assert [d.doc_id for d in docs] == ["doc10.txt", "doc11.txt"]


def test_jsonl_lines_are_documents_read_from_the_text_field(tmp_path):
    lines = [{"body": "first text", "n": 1}, {"body": "second text", "n": 2}]
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    docs = list(iter_documents(TextConfig(source=str(tmp_path / "data.jsonl"), text_field="body")))
    assert [(d.doc_id, d.text) for d in docs] == [("data.jsonl:1", "first text"), ("data.jsonl:2", "second text")]


def test_parquet_rows_are_documents_read_from_the_text_column(tmp_path):
    pq.write_table(pa.table({"text": ["alpha", "beta", "gamma"], "x": [1, 2, 3]}), tmp_path / "part.parquet")
    docs = list(iter_documents(TextConfig(source=str(tmp_path))))
    assert [(d.doc_id, d.text) for d in docs] == [("part.parquet:0", "alpha"), ("part.parquet:1", "beta"),
                                                   ("part.parquet:2", "gamma")]


def test_hf_source_loads_a_local_dataset_directory_through_datasets(tmp_path):
    pq.write_table(pa.table({"content": ["one doc", "two doc"]}), tmp_path / "train.parquet")
    docs = list(iter_documents(TextConfig(source=f"hf:{tmp_path}", text_field="content")))
    assert [d.text for d in docs] == ["one doc", "two doc"]
    assert docs[0].doc_id.endswith(":train:0")


def test_a_missing_path_is_named_in_the_error(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(TextSourceError, match="nowhere.*no such file") as err:
        list(iter_documents(TextConfig(source=str(missing))))
    assert "stdlib" in str(err.value)  # says what else would be accepted


def test_a_glob_matching_nothing_is_named_in_the_error(tmp_path):
    with pytest.raises(TextSourceError, match=r"\*\.jsonl.*matches no"):
        list(iter_documents(TextConfig(source=str(tmp_path / "*.jsonl"))))


def test_a_missing_text_field_names_the_field_and_those_present(tmp_path):
    (tmp_path / "data.jsonl").write_text(json.dumps({"content": "x", "id": 1}) + "\n")
    with pytest.raises(TextSourceError, match="no field 'text'.*fields: content, id.*text.text_field"):
        list(iter_documents(TextConfig(source=str(tmp_path / "data.jsonl"))))
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "p.parquet")
    with pytest.raises(TextSourceError, match="no column 'text'.*columns: body"):
        list(iter_documents(TextConfig(source=str(tmp_path / "p.parquet"))))


def test_a_jsonl_null_text_is_an_empty_document_and_a_number_is_refused(tmp_path):
    """null became the document "None", and a number or list its repr."""
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": None}) + "\n" + json.dumps({"text": "x"}) + "\n")
    assert [d.text for d in iter_documents(TextConfig(source=str(tmp_path / "a.jsonl")))] == ["", "x"]
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": 42}) + "\n")
    with pytest.raises(TextSourceError, match=r"b.jsonl:1: field 'text' holds int, not text"):
        list(iter_documents(TextConfig(source=str(tmp_path / "b.jsonl"))))


def test_a_missing_hf_dataset_says_only_cached_datasets_load_offline():
    with pytest.raises(TextSourceError, match="no-such-dataset-xyz.*local HF cache"):
        list(iter_documents(TextConfig(source="hf:no-such-dataset-xyz")))


# ---- the split ---------------------------------------------------------------------------------


def test_split_is_deterministic_disjoint_and_covers_every_document():
    train = [d.doc_id for d in iter_split(STDLIB_SAMPLE, "train")]
    heldout = [d.doc_id for d in iter_split(STDLIB_SAMPLE, "heldout")]
    assert train == [d.doc_id for d in iter_split(STDLIB_SAMPLE, "train")]
    assert not set(train) & set(heldout)
    assert sorted(train + heldout) == sorted(d.doc_id for d in iter_documents(STDLIB_SAMPLE))
    assert 0.05 < len(heldout) / 60 < 0.4


def test_a_documents_side_of_the_split_does_not_depend_on_the_rest_of_the_corpus():
    small = {d.doc_id for d in iter_split(TextConfig(max_documents=30, heldout_fraction=0.2), "heldout")}
    large = {d.doc_id for d in iter_split(TextConfig(max_documents=60, heldout_fraction=0.2), "heldout")}
    assert small and small <= large


def test_the_seed_changes_the_split():
    a = {d.doc_id for d in iter_split(STDLIB_SAMPLE, "heldout")}
    b = {d.doc_id for d in iter_split(TextConfig(max_documents=60, heldout_fraction=0.2, seed=1), "heldout")}
    assert a != b


# ---- contexts ----------------------------------------------------------------------------------


def test_contexts_have_exactly_context_length_tokens_and_consecutive_ids(tokenizer):
    contexts = list(iter_contexts(STDLIB_SAMPLE, tokenizer, "train", stop=50))
    assert [i for i, _ in contexts] == list(range(50))
    assert all(t.shape == (32,) and t.dtype == torch.long for _, t in contexts)


def test_contexts_pack_documents_separated_by_eos(tmp_path, tokenizer):
    cfg = write_corpus(tmp_path)
    docs = list(iter_split(cfg, "train"))
    expected = [t for d in docs for t in tokenizer.encode(d.text) + [tokenizer.eos_id]]
    packed = load_contexts(cfg, tokenizer, "train").flatten().tolist()
    assert packed == expected[: len(expected) // 16 * 16]  # the trailing partial context is dropped
    assert count_contexts(cfg, tokenizer, "train") == len(expected) // 16


def test_a_read_that_failed_midway_starts_again_rather_than_going_on(tmp_path, tokenizer, monkeypatch):
    """An error while a split was tokenised (an interrupt in a notebook, a bad line of a source)
    left the process's stream with the documents pulled before it gone: the next read went on
    after them, shifting every later context id, or ended the split there."""
    cfg = write_corpus(tmp_path, n=600)  # ~450 training documents: two batches of 256
    expected = [t for d in iter_split(cfg, "train") for t in tokenizer.encode(d.text) + [tokenizer.eos_id]]
    calls, encode_batch = [], tokenizer.encode_batch

    def flaky(texts):
        calls.append(len(texts))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return encode_batch(texts)

    monkeypatch.setattr(tokenizer, "encode_batch", flaky)
    with pytest.raises(KeyboardInterrupt):
        count_contexts(cfg, tokenizer, "train")
    assert load_contexts(cfg, tokenizer, "train").flatten().tolist() == expected[: len(expected) // 16 * 16]


def test_context_ids_name_the_same_tokens_on_every_call_and_in_any_range(tokenizer):
    whole = load_contexts(STDLIB_SAMPLE, tokenizer, "heldout", stop=40)
    again = load_contexts(STDLIB_SAMPLE, tokenizer, "heldout", stop=40)
    middle = dict(iter_contexts(STDLIB_SAMPLE, tokenizer, "heldout", start=17, stop=23))
    assert torch.equal(whole, again)
    assert list(middle) == list(range(17, 23))
    assert all(torch.equal(middle[i], whole[i]) for i in middle)


def test_batches_hold_the_same_contexts_with_a_short_last_batch(tokenizer):
    batches = list(iter_context_batches(STDLIB_SAMPLE, tokenizer, "train", batch_size=8, start=3, stop=24))
    assert [len(ids) for ids, _ in batches] == [8, 8, 5]
    ids = torch.cat([ids for ids, _ in batches])
    tokens = torch.cat([t for _, t in batches])
    assert ids.tolist() == list(range(3, 24))
    assert torch.equal(tokens, load_contexts(STDLIB_SAMPLE, tokenizer, "train", start=3, stop=24))


def test_chosen_contexts_come_in_the_order_asked_and_an_id_past_the_split_is_named(tokenizer):
    everything = load_contexts(STDLIB_SAMPLE, tokenizer, "train")
    chosen = torch.tensor([len(everything) - 1, 5, 0, 17, 5])
    batches = list(iter_chosen_context_batches(STDLIB_SAMPLE, tokenizer, "train", chosen, batch_size=2))
    assert [ids.tolist() for ids, _ in batches] == [[len(everything) - 1, 5], [0, 17], [5]]
    assert torch.equal(torch.cat([t for _, t in batches]), everything[chosen])
    with pytest.raises(TextSourceError, match=f"context {len(everything)} was asked for"):
        list(iter_chosen_context_batches(STDLIB_SAMPLE, tokenizer, "train", torch.tensor([len(everything)]), 4))


def test_iteration_stops_at_the_end_of_the_split(tmp_path, tokenizer):
    cfg = write_corpus(tmp_path)
    n = count_contexts(cfg, tokenizer, "heldout")
    assert [i for i, _ in iter_contexts(cfg, tokenizer, "heldout")] == list(range(n))
    assert list(iter_contexts(cfg, tokenizer, "heldout", start=n, stop=n + 5)) == []


def test_an_empty_corpus_says_what_to_check(tmp_path, tokenizer):
    (tmp_path / "empty.txt").write_text("")
    cfg = TextConfig(source=str(tmp_path / "empty.txt"), heldout_fraction=0.0)
    with pytest.raises(TextSourceError, match="fewer than one context.*larger corpus"):
        list(iter_contexts(cfg, tokenizer, "train"))
    with pytest.raises(TextSourceError, match="split 'heldout'.*no documents.*heldout_fraction"):
        count_contexts(cfg, tokenizer, "heldout")
