"""Dataset validation (errors name file and line), grain access, and the group sampler."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from edit_r1_jax.data import groups, source


def _write_dataset(root, lines, n_images=3):
    os.makedirs(root / "images", exist_ok=True)
    for i in range(n_images):
        arr = np.full((20 + i, 30, 3), 40 * i, np.uint8)
        arr[:, :10] = 255
        Image.fromarray(arr).save(root / "images" / f"{i}.png")
    with open(root / "train_metadata.jsonl", "w") as f:
        for line in lines:
            f.write((line if isinstance(line, str) else json.dumps(line)) + "\n")


GOOD = [{"prompt": "make it red", "image": "images/0.png", "requirement": "keep bg"},
        {"prompt": "remove the cat", "image": "images/1.png", "extra": 1},
        {"prompt": "remove the cat", "image": "images/2.png"}]


def test_good_dataset_loads(tmp_path):
    _write_dataset(tmp_path, GOOD)
    ds, rows = source.make_dataset(tmp_path, "train", resolution=16)
    assert len(ds) == 3 and [r.row_id for r in rows] == [0, 1, 2]
    el = ds[1]
    assert el["image"].shape == (16, 16, 3) and el["image"].dtype == np.uint8
    assert el["prompt"] == "remove the cat" and el["requirement"] == "" and el["metadata"]["extra"] == 1
    assert ds[0]["requirement"] == "keep bg"
    batch = source.stack_rows([ds[i] for i in range(3)])
    assert batch["image"].shape == (3, 16, 16, 3) and batch["row_id"].tolist() == [0, 1, 2]


@pytest.mark.parametrize("bad_line,pattern", [
    ('{"prompt": "x", "image": "images/0.png"', "malformed JSON"),
    ({"image": "images/0.png"}, "missing required field 'prompt'"),
    ({"prompt": "x"}, "missing required field 'image'"),
    ({"prompt": "", "image": "images/0.png"}, "'prompt' must be a non-empty string"),
    ({"prompt": "x", "image": "images/nope.png"}, "image file not found"),
    ("[1, 2]", "expected a JSON object"),
])
def test_bad_lines_named(tmp_path, bad_line, pattern):
    _write_dataset(tmp_path, [GOOD[0], "", bad_line, GOOD[1]])
    with pytest.raises(source.DatasetError, match=pattern) as e:
        source.read_metadata(tmp_path, "train")
    assert "train_metadata.jsonl:3:" in str(e.value)


def test_corrupt_image_named(tmp_path):
    _write_dataset(tmp_path, GOOD)
    with open(tmp_path / "images" / "1.png", "rb") as f:
        data = f.read()
    with open(tmp_path / "images" / "1.png", "wb") as f:
        f.write(data[: len(data) // 2])  # truncated PNG
    with pytest.raises(source.DatasetError, match=r"train_metadata.jsonl:2: image .*1.png cannot be decoded"):
        source.read_metadata(tmp_path, "train")
    with open(tmp_path / "images" / "2.png", "wb") as f:
        f.write(b"not an image at all")
    # Without the up-front check, the error surfaces at access time, still naming file and line.
    ds, _ = source.make_dataset(tmp_path, "train", resolution=16, verify_images=False)
    with pytest.raises(source.DatasetError, match=r"train_metadata.jsonl:3: cannot load image .*2.png"):
        ds[2]


def test_missing_metadata_file(tmp_path):
    with pytest.raises(source.DatasetError, match="metadata file not found"):
        source.read_metadata(tmp_path, "test")


def test_sampler_groups_and_determinism():
    s = groups.GroupSampler(num_rows=20, groups_per_batch=3, group_size=4, batches_per_epoch=2, seed=42)
    b = s.next_batch()
    ids, counts = np.unique(b.global_row_ids, return_counts=True)
    assert len(ids) == 3 and np.all(counts == 4)
    np.testing.assert_array_equal(b.row_ids, b.global_row_ids)
    s.next_batch()
    assert (s.epoch, s.batch) == (1, 0)
    again = groups.GroupSampler(20, 3, 4, 2, seed=42).sample(0, 0)
    np.testing.assert_array_equal(again.global_row_ids, b.global_row_ids)
    assert not np.array_equal(s.sample(0, 1).global_row_ids, b.global_row_ids)


def test_sampler_host_split_and_ban_and_state():
    hosts = [groups.GroupSampler(10, 2, 6, 4, seed=1, process_index=p, process_count=3) for p in range(3)]
    parts = [h.sample(5, 2) for h in hosts]
    np.testing.assert_array_equal(np.concatenate([p.row_ids for p in parts]), parts[0].global_row_ids)
    np.testing.assert_array_equal(np.concatenate([p.slot_ids for p in parts]), np.arange(12))
    s = groups.GroupSampler(5, 2, 2, 1, seed=0)
    s.ban([0, 1, 2])
    for e in range(20):
        assert set(s.sample(e, 0).global_row_ids.tolist()) == {3, 4}
    st = s.get_state()
    assert json.loads(json.dumps(st)) == st == {"epoch": 0, "batch": 0, "banned": [0, 1, 2]}
    s.ban([3])
    with pytest.raises(groups.InsufficientRowsError, match="only 1 eligible rows"):
        s.sample(0, 0)
    t = groups.GroupSampler(5, 2, 2, 1, seed=0)
    t.set_state(st)
    assert set(t.sample(3, 0).global_row_ids.tolist()) == {3, 4}  # the restored ban set is in force
    assert t.get_state() == st
    with pytest.raises(ValueError, match="split evenly"):
        groups.GroupSampler(10, 2, 5, 1, seed=0, process_count=3)
