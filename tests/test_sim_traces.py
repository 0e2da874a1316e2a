from pathlib import Path

import pytest

from moecli.errors import MoecliError
from moecli.sim.traces import LayerRouting, Pass, Sequence, Trace, prefill_from_decode, read_trace, write_trace

TRACES = Path(__file__).resolve().parents[2] / "shared" / "traces"


def test_moecli_format_round_trip(tmp_path):
    lr = LayerRouting([[1, 2], [2, 3]], [[0.6, 0.4], [0.5, 0.5]], [[0.1, 0.5, 0.3, 0.1]] * 2, {1: [[1, 3], [2, 3]]})
    tr = Trace("toy", 4, 2, [0, 1], [Sequence("a", [Pass("prefill", {0: lr, 1: LayerRouting([[0, 1]] * 2)}),
                                                    Pass("decode", {0: LayerRouting([[3, 0]]),
                                                                    1: LayerRouting([[2, 1]])})])])
    write_trace(tr, tmp_path / "t.jsonl")
    back = read_trace(tmp_path / "t.jsonl")
    assert back.n_experts == 4 and back.layers == [0, 1] and back.full_scores and back.has_predictions
    p0 = back.sequences[0].passes[0]
    assert p0.kind == "prefill" and p0.layers[0].ids == [[1, 2], [2, 3]] and p0.layers[0].pred[1] == [[1, 3], [2, 3]]
    assert p0.layers[0].tokens() == {1: 1, 2: 2, 3: 1}
    assert back.sequences[0].passes[1].layers[1].ids == [[2, 1]]
    assert not (tmp_path / "t.jsonl.tmp").exists()


def test_bad_trace_inputs(tmp_path):
    with pytest.raises(MoecliError):
        read_trace(tmp_path / "none.jsonl")
    (tmp_path / "x.jsonl").write_text("not json\n")
    with pytest.raises(MoecliError):
        read_trace(tmp_path / "x.jsonl")


@pytest.mark.skipif(not (TRACES / "mixtral-8x7b").is_dir(), reason="shared traces absent")
def test_mixtral_reader():
    tr = read_trace(TRACES / "mixtral-8x7b" / "gsm8k_2_routing.jsonl")
    assert tr.n_experts == 8 and tr.top_k == 2 and tr.layers == list(range(32))
    assert [len(s.passes) for s in tr.sequences] == [166, 78]  # incomplete last tokens dropped
    assert all(len(p.layers) == 32 for s in tr.sequences for p in s.passes)
    pre = prefill_from_decode(tr.sequences[0].passes)
    assert pre.n_tokens == 166 and sum(pre.layers[0].tokens().values()) == 332


@pytest.mark.skipif(not (TRACES / "qwen1.5-moe-a2.7b").is_dir(), reason="shared traces absent")
def test_qwen_reader():
    tr = read_trace(TRACES / "qwen1.5-moe-a2.7b")
    ps = tr.sequences[0].passes
    assert tr.layers == [0, 8, 12] and tr.n_experts == 60 and tr.top_k == 4
    assert ps[0].kind == "prefill" and ps[0].n_tokens == 1406
    assert len(ps) == 128 and ps[1].n_tokens == 25 and ps[-1].n_tokens == 11
