"""fastadv.bench.floor: the recorder logs what the model was asked to do, and the replay does exactly that."""
import torch

from fastadv.bench.floor import ModelCallRecorder, replay_floor, summarize_calls


class _Counting(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(12, 3)
        self.seen = []

    def forward(self, x):
        self.seen.append((tuple(x.shape), torch.is_grad_enabled() and x.requires_grad))
        return self.lin(x.flatten(1))


def test_recorder_logs_shapes_tags_and_backwards_and_replay_repeats_them():
    net = _Counting()
    rec = ModelCallRecorder(net)
    rec.tag = "a"
    x = torch.rand(5, 3, 2, 2, requires_grad=True)
    torch.autograd.grad(rec(x).sum(), x)
    with torch.no_grad():
        rec(torch.rand(2, 3, 2, 2))
    rec.tag = "b"
    rec(torch.rand(7, 3, 2, 2))  # grad enabled but the input needs none: no backward follows
    assert [c[0] for c in rec.calls] == ["a", "a", "b"]
    assert [c[4] for c in rec.calls] == [True, False, False]
    assert summarize_calls(rec.calls) == {
        "a": {"forwards": 2, "backwards": 1, "rows_forward": 7, "rows_backward": 5},
        "b": {"forwards": 1, "backwards": 0, "rows_forward": 7, "rows_backward": 0}}
    net.seen.clear()
    floors = replay_floor(net, rec.calls, repeats=2)
    assert set(floors) == {"a", "b"} and all(v > 0 for v in floors.values())
    assert net.seen == [((5, 3, 2, 2), True), ((2, 3, 2, 2), False), ((7, 3, 2, 2), False)] * 2


def test_recorder_sees_channels_last_and_autocast():
    rec = ModelCallRecorder(torch.nn.Conv2d(3, 4, 1))
    rec(torch.rand(2, 3, 4, 4).contiguous(memory_format=torch.channels_last))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rec(torch.rand(2, 3, 4, 4))
    assert [c[3] for c in rec.calls] == [True, False]
    assert [c[5] for c in rec.calls] == [None, torch.bfloat16]
    assert set(replay_floor(rec.model, rec.calls)) == {None}
