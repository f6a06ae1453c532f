"""The data stream: every trainable row once per epoch, never a failed one, shuffled, split over workers, resumable."""

from __future__ import annotations

from itertools import islice

import numpy as np
import pytest
import torch

from recaption.errors import InputError
from recaption.train.data import Batches, DataState, ExampleStream, load_image, output_parts
from recaption.train.sampling import TextSampler
from recaption.train.tokenizer import train_wordpiece
from tests.train.conftest import BROKEN_KEY, N_IMAGES, tiny_config


@pytest.fixture(scope="module")
def tokenizer(caption_output):
    from recaption.train.data import caption_texts

    return train_wordpiece(caption_texts(str(caption_output)), 500)


def stream(cfg, rank=0, world=1) -> ExampleStream:
    return ExampleStream(cfg, TextSampler(cfg.sampling, cfg.run.seed), rank, world)


def test_an_epoch_holds_every_trainable_row_once_and_never_the_failed_one(caption_output, tmp_path):
    cfg = tiny_config(caption_output, tmp_path, "data.shuffle_buffer=8")
    keys = [ex.key for ex in stream(cfg).epoch(0)]
    assert len(keys) == N_IMAGES - 1 and len(set(keys)) == len(keys) and BROKEN_KEY not in keys
    assert keys != sorted(keys)  # shuffled across shards
    assert keys == [ex.key for ex in stream(cfg).epoch(0)]  # deterministic
    assert keys != [ex.key for ex in stream(cfg).epoch(1)]  # a new order each epoch
    other_seed = tiny_config(caption_output, tmp_path, "data.shuffle_buffer=8", "run.seed=1")
    assert keys != [ex.key for ex in stream(other_seed).epoch(0)]


def test_workers_split_the_rows_between_them(caption_output, tmp_path):
    cfg = tiny_config(caption_output, tmp_path)
    halves = [{ex.key for ex in stream(cfg, rank, 2).epoch(3)} for rank in range(2)]
    assert not halves[0] & halves[1] and len(halves[0] | halves[1]) == N_IMAGES - 1
    # More workers than part files: each reads all of them and keeps every 8th example.
    eighths = [{ex.key for ex in stream(cfg, rank, 8).epoch(0)} for rank in range(8)]
    assert sum(map(len, eighths)) == N_IMAGES - 1 and len(set().union(*eighths)) == N_IMAGES - 1


def test_batches_are_deterministic_and_a_saved_position_resumes_exactly(caption_output, tmp_path, tokenizer):
    cfg = tiny_config(caption_output, tmp_path, "data.shuffle_buffer=16")
    first = list(islice(Batches(cfg, tokenizer), 9))  # 72 examples: past the end of epoch 0
    again = list(islice(Batches(cfg, tokenizer), 9))
    for a, b in zip(first, again, strict=True):
        assert a["keys"] == b["keys"] and torch.equal(a["pixel_values"], b["pixel_values"])
        assert torch.equal(a["long_ids"], b["long_ids"]) and torch.equal(a["short_ids"], b["short_ids"])
    assert first[-1]["state"].epoch == 1
    for k in (2, 4, 5):  # mid-epoch, and just after the epoch boundary
        resumed = next(iter(Batches(cfg, tokenizer, state=first[k]["state"])))
        nxt = first[k + 1]
        assert resumed["keys"] == nxt["keys"] and torch.equal(resumed["short_ids"], nxt["short_ids"])


def test_batch_layout_shapes_and_text_groups(caption_output, tmp_path, tokenizer):
    cfg = tiny_config(caption_output, tmp_path, "loss.grouping=0", "loss.short=0")
    batch = next(iter(Batches(cfg, tokenizer)))
    b, k = cfg.run.batch_size, cfg.sampling.num_sub_captions
    assert batch["pixel_values"].shape == (b, 3, 32, 32)
    assert batch["layout"] == [("subs", k)] and batch["short_ids"].shape[0] == b * k
    corners = cfg.model.text.num_corners
    assert batch["long_ids"].shape[1] <= cfg.model.text.context_length - corners
    assert (batch["long_ids"][:, 0] == tokenizer.cls_token_id).all()


def test_batches_name_identical_texts_with_equal_ids(caption_output, tmp_path, tokenizer):
    """The loss masks identical texts by these ids: equal exactly when the strings are (many scenes share a short
    caption such as `a red circle`)."""
    from recaption.train.data import text_ids

    cfg = tiny_config(caption_output, tmp_path, "loss.short=1", "data.shuffle_buffer=1", "run.batch_size=16")
    loader = Batches(cfg, tokenizer)
    batch = next(iter(loader))
    loader.close()
    ids = batch["text_ids"]
    assert ids["short"].shape == (16,) and ids["subs"].shape == (16, cfg.sampling.num_sub_captions)
    assert ids["long"].shape == (16,)
    shorts = tokenizer.batch_decode(batch["short_ids"][:16], skip_special_tokens=True)
    for i in range(16):
        for j in range(16):
            assert (shorts[i] == shorts[j]) == bool(ids["short"][i] == ids["short"][j])
    assert len(set(shorts)) < 16  # the case that matters: this batch does repeat a short caption
    torch.testing.assert_close(text_ids([["a red circle", "x"]]), text_ids([["a red circle", "x"]]))
    assert text_ids([["a"], ["b"]])[0, 0] != text_ids([["a"], ["b"]])[1, 0]


def test_load_image_is_clip_normalised_and_square():
    from tests.data import make_image

    arr = load_image(make_image(3, size=(80, 40)), 32)
    assert arr.shape == (3, 32, 32) and arr.dtype == np.float32
    assert arr.min() > -2.0 and arr.max() < 2.7


def test_a_directory_without_parts_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="no part files"):
        output_parts(str(tmp_path))


def test_data_state_round_trip():
    assert DataState(**DataState(3, 7).to_dict()) == DataState(3, 7)


def test_a_webdataset_export_trains_like_the_output_it_came_from(caption_output, tmp_path, tokenizer):
    from recaption.outputs.export import export_output
    from recaption.train.run import prepare_run

    export_output(str(caption_output), "webdataset", str(tmp_path / "wds"), shard_size=16)
    direct = tiny_config(caption_output, tmp_path / "a", "data.shuffle_buffer=1")
    exported = tiny_config(tmp_path / "wds", tmp_path / "b", "data.shuffle_buffer=1")
    rows = {ex.key: ex for ex in stream(direct).epoch(0)}
    from_export = {ex.key: ex for ex in stream(exported).epoch(0)}
    assert set(from_export) == set(rows) and len(rows) == N_IMAGES - 1  # the failed row is in neither
    for key, ex in from_export.items():
        assert ex.image == rows[key].image and ex.row["captions"] == rows[key].row["captions"]
    batch = next(iter(Batches(prepare_run(exported), tokenizer)))
    assert batch["pixel_values"].shape[0] == exported.run.batch_size
