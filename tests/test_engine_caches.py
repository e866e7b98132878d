"""The engine's caches: the CUDA-graph key keeps attacks with other settings apart, the caches are bounded,
and a recycled model id never hands back another model's entry. Tested on CPU (the capture itself needs a
GPU: tests/test_attacks.py::test_cuda_graph_matches_eager)."""
import torch
from torch import nn

from fastadv.attacks import PGD, engine


def _key(atk, x, steps=10):
    s = {"eps": torch.zeros(x.shape[0]), "alpha": torch.zeros(x.shape[0])}
    return engine.graph_key(atk, atk._step, x, steps, atk.loss, s, 1)


def test_graph_key_covers_the_attack_settings():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    x = torch.rand(4, 3, 2, 2)
    base = PGD(model, 0.1, 0.01, 10)
    assert _key(base, x) == _key(PGD(model, 0.1, 0.01, 10), x)  # the same attack reuses its graph
    # the bug: PGD(norm='l2') after a Linf one on the same model and shape replayed the Linf graph
    others = [PGD(model, 0.1, 0.01, 10, norm="l2"), PGD(model, 0.1, 0.01, 10, norm="l1"),
              PGD(model, 0.1, 0.01, 10, norm="l1", sparsity=0.5), PGD(model, 0.1, 0.01, 10, clip=(0.0, 2.0)),
              PGD(model, 0.1, 0.01, 10, model_mode="train"), PGD(model, 0.1, 0.01, 10, channels_last=True),
              PGD(model, 0.1, 0.01, 10, loss="cw"), PGD(model, 0.1, 0.01, 10, targeted=True),
              PGD(model, 0.1, 0.01, 10, autocast="bf16")]
    keys = {_key(a, x) for a in others} | {_key(base, x)}
    assert len(keys) == len(others) + 1
    assert _key(base, x) != _key(base, x, steps=11)
    assert _key(base, x) != _key(base, torch.rand(5, 3, 2, 2))
    assert _key(base, x) != _key(PGD(nn.Sequential(nn.Flatten(), nn.Linear(12, 3)), 0.1, 0.01, 10), x)


def test_caches_are_bounded_and_detect_recycled_ids():
    cache = engine._LRU(2)
    models = [nn.Linear(2, 2) for _ in range(3)]
    for i, m in enumerate(models):
        engine._cache_put(cache, ("k", i), m, f"entry{i}")
    assert len(cache) == 2 and engine._cache_get(cache, ("k", 0), models[0]) is None  # evicted, oldest first
    assert engine._cache_get(cache, ("k", 2), models[2]) == "entry2"
    # an entry whose model died is never returned for a new object that got the same key
    m = nn.Linear(2, 2)
    engine._cache_put(cache, ("same",), m, "old")
    del m
    assert engine._cache_get(cache, ("same",), nn.Linear(2, 2)) is None
    engine.clear_caches()
    assert len(engine._COMPILED) == 0 and len(engine._GRAPHS) == 0
