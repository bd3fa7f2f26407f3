"""M-FALCON: a candidate's score depends on the history and on itself only (not on its slot
or the micro-batch size); the cached history gives the uncached result through the fused
op with the num_targets mask."""
from __future__ import annotations

import pytest
import torch

import gauss_plugins.hstu.modules as modules
from gauss_plugins.hstu.mfalcon import MFalcon, append_targets
from gauss_plugins.hstu.modules import HSTUConfig, HSTUEncoder
from gauss_plugins.jagged import lengths_to_offsets


def setup(seed=0, history=(3, 7, 0, 5), candidates=(5, 1, 7, 0), timestamps=True, dtype=torch.float64,
          **config):
    torch.manual_seed(seed)
    base = dict(dim=16, num_heads=2, max_seq_len=12, dropout=0.1, num_time_buckets=16, time_bucket_scale=1.0)
    base.update(config)
    encoder = HSTUEncoder(HSTUConfig(**base)).to(dtype).eval()
    ho = lengths_to_offsets(torch.tensor(history))
    co = lengths_to_offsets(torch.tensor(candidates))
    h = torch.randn(int(ho[-1]), 16, dtype=dtype)
    c = torch.randn(int(co[-1]), 16, dtype=dtype)
    ht = ct = None
    if timestamps:
        ht = torch.cat([torch.randint(1, 10**6, (n,)).cumsum(0) for n in history])
        ct = torch.randint(10**7, 2 * 10**7, (int(co[-1]),))
    return encoder, h, ho, c, co, ht, ct


def test_append_targets_by_hand():
    hist = torch.tensor([1, 2, 3])
    tgt = torch.tensor([10, 20, 30])
    values, offsets, num_targets, rows = append_targets(hist, torch.tensor([0, 2, 2, 3]), tgt,
                                                        torch.tensor([0, 1, 3, 3]))
    assert values.tolist() == [1, 2, 10, 20, 30, 3]
    assert offsets.tolist() == [0, 3, 5, 6]
    assert num_targets.tolist() == [1, 2, 0]
    assert values[rows].tolist() == [10, 20, 30]


@pytest.mark.parametrize("micro_batch_size, options", [
    (1, dict()),
    (3, dict()),
    (7, dict()),
    (2, dict(timestamps=False, num_time_buckets=0)),
    (3, dict(contextual_len=2, max_attn_len=3)),
    (1, dict(contextual_len=1)),
    (4, dict(max_attn_len=2, num_time_buckets=0)),
    (3, dict(silu_on="u", alpha=0.25, num_blocks=3)),
    (5, dict(relative_position_bias=False)),
])
def test_cached_equals_uncached(micro_batch_size, options):
    encoder, h, ho, c, co, ht, ct = setup(**options)
    mfalcon = MFalcon(encoder, micro_batch_size)
    uncached = mfalcon.score(h, ho, c, co, ht, ct)
    cache = mfalcon.encode_history(h, ho, ht)
    cached = mfalcon.score_cached(cache, c, co, ct)
    assert cached.shape == c.shape
    torch.testing.assert_close(cached, uncached, rtol=1e-10, atol=1e-12)
    # the cache is used: corrupting it changes the scores
    cache.values[0].mul_(2.0)
    assert not torch.allclose(mfalcon.score_cached(cache, c, co, ct), uncached)


@pytest.mark.parametrize("options", [dict(), dict(contextual_len=2, max_attn_len=3)])
def test_permuting_candidates_permutes_the_scores(options):
    encoder, h, ho, c, co, ht, ct = setup(seed=4, **options)
    mfalcon = MFalcon(encoder, 7)  # every user's candidates in one round: slots really move
    cache = mfalcon.encode_history(h, ho, ht)
    base = mfalcon.score_cached(cache, c, co, ct)
    g = torch.Generator().manual_seed(0)
    # shuffle inside each user's block of candidates
    perm = torch.cat([s + torch.randperm(e - s, generator=g) for s, e in zip(co[:-1].tolist(), co[1:].tolist())])
    assert not torch.equal(perm, torch.arange(perm.shape[0]))
    moved = mfalcon.score_cached(cache, c[perm], co, ct[perm])
    # exact up to the order of a floating-point sum over keys (fp64)
    torch.testing.assert_close(moved, base[perm], rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(mfalcon.score(h, ho, c[perm], co, ht, ct[perm]), base[perm], rtol=1e-13, atol=1e-14)


def test_micro_batch_size_does_not_change_the_scores_fp32():
    # 64 rounds of one candidate against one round of 64 (one block keeps the 64 rounds cheap)
    history, candidates = (9, 0, 14), (64, 40, 17)
    encoder, h, ho, c, co, ht, ct = setup(seed=5, history=history, candidates=candidates, dtype=torch.float32,
                                          max_seq_len=80, num_blocks=1)
    one = MFalcon(encoder, 1)
    sixty_four = MFalcon(encoder, 64)
    by_one = one.score_cached(one.encode_history(h, ho, ht), c, co, ct)
    by_64 = sixty_four.score_cached(sixty_four.encode_history(h, ho, ht), c, co, ct)
    torch.testing.assert_close(by_64, by_one, rtol=0, atol=1e-5)
    torch.testing.assert_close(sixty_four.score(h, ho, c, co, ht, ct), by_one, rtol=0, atol=1e-5)


def test_one_candidate_per_round_equals_appending_it_to_the_history():
    encoder, h, ho, c, co, ht, ct = setup(seed=1)
    got = MFalcon(encoder, 3).score_cached(MFalcon(encoder, 3).encode_history(h, ho, ht), c, co, ct)
    for b in range(4):
        hs, he = ho[b].item(), ho[b + 1].item()
        for i in range(co[b].item(), co[b + 1].item()):
            x = torch.cat([h[hs:he], c[i:i + 1]])
            t = torch.cat([ht[hs:he], ct[i:i + 1]])
            out = encoder(x, torch.tensor([0, x.shape[0]]), t, torch.tensor([1]))
            torch.testing.assert_close(got[i], out[-1], rtol=1e-12, atol=1e-13)


def test_candidates_in_a_round_do_not_see_each_other():
    encoder, h, ho, c, co, ht, ct = setup(seed=2)
    mfalcon = MFalcon(encoder, 4)
    cache = mfalcon.encode_history(h, ho, ht)
    base = mfalcon.score_cached(cache, c, co, ct)
    c2, ct2 = c.clone(), ct.clone()
    c2[0] += torch.randn(16, dtype=c.dtype)  # user 0, first candidate of round 0
    ct2[1] //= 1000  # and the time of its neighbour (other time buckets)
    moved = mfalcon.score_cached(cache, c2, co, ct2)
    torch.testing.assert_close(moved[2:], base[2:])
    assert not torch.allclose(moved[0], base[0]) and not torch.allclose(moved[1], base[1])


def test_cached_path_runs_the_attention_op_with_the_num_targets_mask(monkeypatch):
    """Each block's attention of the cached path is one hstu_attention call over every
    (user, round) pair as [history ; round's candidates], with num_targets = the round's
    candidates (what selects the fused kernel on CUDA)."""
    encoder, h, ho, c, co, ht, ct = setup(seed=3)  # history (3, 7, 0, 5), candidates (5, 1, 7, 0)
    mfalcon = MFalcon(encoder, 4)
    cache = mfalcon.encode_history(h, ho, ht)
    calls = []
    attention = modules.hstu_attention

    def spy(q, k, v, offsets, **kwargs):
        calls.append((offsets.clone(), kwargs["num_targets"].clone()))
        return attention(q, k, v, offsets, **kwargs)

    monkeypatch.setattr(modules, "hstu_attention", spy)
    mfalcon.score_cached(cache, c, co, ct)
    assert len(calls) == len(encoder.blocks)
    # round 0: users 0, 1, 2 (4, 1, 4 candidates); round 1: users 0, 2 (1, 3); user 3 has none
    for offsets, num_targets in calls:
        assert num_targets.tolist() == [4, 1, 4, 1, 3]
        assert offsets.diff().tolist() == [3 + 4, 7 + 1, 0 + 4, 3 + 1, 0 + 3]


def test_rounds_split_into_passes_by_the_budget(monkeypatch):
    encoder, h, ho, c, co, ht, ct = setup(seed=7)
    whole = MFalcon(encoder, 2)
    split = MFalcon(encoder, 2, pass_budget=1)  # every round its own pass
    cache = whole.encode_history(h, ho, ht)
    calls = []
    attention = modules.hstu_attention

    def spy(*args, **kwargs):
        calls.append(kwargs["num_targets"].tolist())
        return attention(*args, **kwargs)

    monkeypatch.setattr(modules, "hstu_attention", spy)
    got = split.score_cached(cache, c, co, ct)
    # candidates (5, 1, 7, 0) in rounds of 2: four rounds, one pass each, per block
    assert calls[::len(encoder.blocks)] == [[2, 1, 2], [2, 2], [1, 2], [1]]
    torch.testing.assert_close(got, whole.score_cached(cache, c, co, ct), rtol=1e-12, atol=1e-13)
    assert len(calls) == 4 * len(encoder.blocks) + len(encoder.blocks)  # then the whole: one pass
    with pytest.raises(ValueError, match="pass_budget"):
        MFalcon(encoder, 2, pass_budget=0)


def test_float32_cached_close_to_uncached():
    encoder, h, ho, c, co, ht, ct = setup(seed=3)
    encoder = encoder.float()
    mfalcon = MFalcon(encoder, 3)
    cached = mfalcon.score_cached(mfalcon.encode_history(h.float(), ho, ht), c.float(), co, ct)
    torch.testing.assert_close(cached, mfalcon.score(h.float(), ho, c.float(), co, ht, ct), rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_cached_equals_cpu():
    encoder, h, ho, c, co, ht, ct = setup(seed=6, dtype=torch.float32, history=(30, 0, 90, 7),
                                          candidates=(64, 10, 30, 1), max_seq_len=128)
    want = MFalcon(encoder, 32).score_cached(MFalcon(encoder, 32).encode_history(h, ho, ht), c, co, ct)
    gpu = MFalcon(encoder.cuda(), 32)
    cache = gpu.encode_history(h.cuda(), ho.cuda(), ht.cuda())
    got = gpu.score_cached(cache, c.cuda(), co.cuda(), ct.cuda())
    torch.testing.assert_close(got.cpu(), want, rtol=2e-3, atol=2e-3)


def test_errors():
    encoder, h, ho, c, co, ht, ct = setup()
    with pytest.raises(ValueError, match="micro_batch_size"):
        MFalcon(encoder, 0)
    _, lh, lho, lc, lco, lht, lct = setup(history=(10,), candidates=(3,))
    with pytest.raises(ValueError, match="reaches 13 rows, more than max_seq_len=12"):
        MFalcon(encoder, 3).score(lh, lho, lc, lco, lht, lct)
    MFalcon(encoder, 2).score(lh, lho, lc, lco, lht, lct)  # 10 + 2 fits
    with pytest.raises(ValueError, match="both"):
        MFalcon(encoder, 2).score(h, ho, c, co, ht, None)
    with pytest.raises(ValueError, match="num_time_buckets=16"):
        MFalcon(encoder, 2).score(h, ho, c, co, None, None)
    with pytest.raises(ValueError, match="users"):
        MFalcon(encoder, 2).score(h, ho, c[:5], co[:2], ht, ct[:5])
    encoder.train()
    with pytest.raises(RuntimeError, match="eval"):
        MFalcon(encoder, 2).encode_history(h, ho, ht)
    for config in (dict(causal=False), dict(normalizer="seq_len")):
        other = setup(**config)[0]
        with pytest.raises(ValueError, match="causal encoder with normalizer='max_seq_len'"):
            MFalcon(other, 2).encode_history(h, ho, ht)


def test_no_candidates_gives_an_empty_result():
    encoder, h, ho, c, co, ht, ct = setup(candidates=(0, 0, 0, 0))
    mfalcon = MFalcon(encoder, 4)
    assert mfalcon.score_cached(mfalcon.encode_history(h, ho, ht), c, co, ct).shape == (0, 16)
    assert mfalcon.score(h, ho, c, co, ht, ct).shape == (0, 16)
