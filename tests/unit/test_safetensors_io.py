"""The streaming safetensors writer: files safetensors itself reads back exactly, sharded or not."""

import torch
from safetensors.torch import load_file, save_file

from llmshrink.safetensors_io import StoredTensor, TensorIndex, save_shards


def test_streamed_files_read_back_exactly_by_safetensors(tmp_path):
    src = {"a": torch.randn(3, 5).half(), "b": torch.arange(7, dtype=torch.int32), "c": torch.randn(4).bfloat16(),
           "d": torch.tensor([True, False]), "e": torch.randn(2, 3)}
    save_file(src, str(tmp_path / "src.safetensors"))
    stored = TensorIndex.of_file(tmp_path / "src.safetensors")
    entries = {k: StoredTensor(stored, k) for k in ("a", "b", "c", "d")}
    entries["e"] = src["e"]  # in-memory and stored tensors mix
    (tmp_path / "one").mkdir()
    save_shards(entries, tmp_path / "one")
    back = load_file(str(tmp_path / "one" / "model.safetensors"))
    assert back.keys() == src.keys()
    for k in src:
        assert back[k].dtype == src[k].dtype and torch.equal(back[k], src[k])

    (tmp_path / "many").mkdir()
    save_shards(entries, tmp_path / "many", max_shard_bytes=24)
    assert (tmp_path / "many" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "many").glob("model-*-of-*.safetensors"))) > 2
    index = TensorIndex(tmp_path / "many")
    assert sorted(index.keys()) == sorted(src)
    for k in src:
        assert torch.equal(index.get(k), src[k])
