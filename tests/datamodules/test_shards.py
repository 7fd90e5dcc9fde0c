import numpy as np
import pytest

from datamodules.errors import StagewiseError, TokenizerMismatchError
from datamodules.shards import ShardWriter, check_tokenizer, open_split, read_manifest, write_manifest


@pytest.mark.parametrize("dtype,top", [("uint16", 65535), ("uint32", 70000)])
def test_round_trip(tmp_path, dtype, top):
    docs = [[1, 2, 3], [top], [], [4, 5]]
    with ShardWriter(tmp_path, "train", dtype, chunk_tokens=2) as w:  # tiny chunks: several writes
        for d in docs:
            w.add(d)
    write_manifest(tmp_path, {"dtype": dtype, "tokens": {"train": w.tokens}})
    split = open_split(tmp_path, "train")
    assert split.tokens.dtype == np.dtype(dtype) and split.mask is None
    assert split.offsets.tolist() == [0, 3, 4, 4, 6]
    assert [split.tokens[a:b].tolist() for a, b in zip(split.offsets[:-1], split.offsets[1:])] == docs
    assert read_manifest(tmp_path)["tokens"] == {"train": 6}


def test_mask_round_trip_and_dtype_overflow(tmp_path):
    with ShardWriter(tmp_path, "val", "uint16", with_mask=True) as w:
        w.add([7, 8, 9], [0, 1, 1])
        with pytest.raises(ValueError):
            w.add([1, 2], [1])
        with pytest.raises(ValueError):
            w.add([70000], [1])
    split = open_split(tmp_path, "val")  # no manifest: dtype from the file size
    assert split.tokens.tolist() == [7, 8, 9] and split.mask.tolist() == [0, 1, 1]


def test_interrupted_write_keeps_the_old_shard(tmp_path):
    with ShardWriter(tmp_path, "train", "uint16") as w:
        w.add([1, 2, 3])
    with pytest.raises(RuntimeError):
        with ShardWriter(tmp_path, "train", "uint16", chunk_tokens=1) as w:
            w.add([9, 9, 9, 9])
            raise RuntimeError("killed")
    assert open_split(tmp_path, "train").tokens.tolist() == [1, 2, 3]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.bin", "train.idx.npy"]


def test_damaged_or_missing_shards_are_user_errors(tmp_path):
    with pytest.raises(StagewiseError, match="stagewise prepare"):
        read_manifest(tmp_path)
    with pytest.raises(StagewiseError, match="stagewise prepare"):
        open_split(tmp_path, "train")
    with ShardWriter(tmp_path, "train", "uint16") as w:
        w.add([1, 2, 3])
    write_manifest(tmp_path, {"dtype": "uint16"})
    with open(tmp_path / "train.bin", "ab") as f:
        f.write(b"\0\0")
    with pytest.raises(StagewiseError, match="damaged"):
        open_split(tmp_path, "train")


def test_tokenizer_mismatch_names_both_tokenizers(tmp_path):
    check_tokenizer({"tokenizer_sha256": "a" * 64}, "a" * 64, tmp_path)
    with pytest.raises(TokenizerMismatchError, match=r"(?s)bbbbbbbbbbbb.*aaaaaaaaaaaa.*stagewise prepare"):
        check_tokenizer({"tokenizer_sha256": "b" * 64}, "a" * 64, tmp_path)
