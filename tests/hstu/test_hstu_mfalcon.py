"""M-FALCON: the cached history gives the uncached result; rounds behave as the mask says."""
from __future__ import annotations

import pytest
import torch

from gauss_plugins.hstu.mfalcon import MFalcon, append_targets
from gauss_plugins.hstu.modules import HSTUConfig, HSTUEncoder
from gauss_plugins.jagged import lengths_to_offsets


def setup(seed=0, history=(3, 7, 0, 5), candidates=(5, 1, 7, 0), timestamps=True, **config):
    torch.manual_seed(seed)
    base = dict(dim=16, num_heads=2, max_seq_len=12, dropout=0.1)
    base.update(config)
    encoder = HSTUEncoder(HSTUConfig(**base)).double().eval()
    ho = lengths_to_offsets(torch.tensor(history))
    co = lengths_to_offsets(torch.tensor(candidates))
    h = torch.randn(int(ho[-1]), 16, dtype=torch.float64)
    c = torch.randn(int(co[-1]), 16, dtype=torch.float64)
    ht = ct = None
    if timestamps:
        ht = torch.randint(0, 10**7, (int(ho[-1]),))
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
    (2, dict(timestamps=False)),
    (3, dict(contextual_len=2, max_attn_len=3)),
    (1, dict(contextual_len=1)),
    (4, dict(max_attn_len=2, num_time_buckets=0)),
    (3, dict(silu_on="u", alpha=0.25, num_blocks=3)),
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


def test_one_candidate_per_round_equals_appending_it_to_the_history():
    encoder, h, ho, c, co, ht, ct = setup(seed=1)
    got = MFalcon(encoder, 1).score_cached(MFalcon(encoder, 1).encode_history(h, ho, ht), c, co, ct)
    for b in range(4):
        hs, he = ho[b].item(), ho[b + 1].item()
        for i in range(co[b].item(), co[b + 1].item()):
            x = torch.cat([h[hs:he], c[i:i + 1]])
            t = torch.cat([ht[hs:he], ct[i:i + 1]])
            out = encoder(x, torch.tensor([0, x.shape[0]]), t, torch.tensor([1]))
            torch.testing.assert_close(got[i], out[-1])


def test_candidates_in_a_round_do_not_see_each_other():
    encoder, h, ho, c, co, ht, ct = setup(seed=2)
    mfalcon = MFalcon(encoder, 4)
    cache = mfalcon.encode_history(h, ho, ht)
    base = mfalcon.score_cached(cache, c, co, ct)
    c2 = c.clone()
    c2[0] += torch.randn(16, dtype=c.dtype)  # user 0, first candidate of round 0
    moved = mfalcon.score_cached(cache, c2, co, ct)
    torch.testing.assert_close(moved[1:], base[1:])
    assert not torch.allclose(moved[0], base[0])


def test_float32_cached_close_to_uncached():
    encoder, h, ho, c, co, ht, ct = setup(seed=3)
    encoder = encoder.float()
    mfalcon = MFalcon(encoder, 3)
    cached = mfalcon.score_cached(mfalcon.encode_history(h.float(), ho, ht), c.float(), co, ct)
    torch.testing.assert_close(cached, mfalcon.score(h.float(), ho, c.float(), co, ht, ct), rtol=1e-4, atol=1e-5)


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
    with pytest.raises(ValueError, match="users"):
        MFalcon(encoder, 2).score(h, ho, c[:5], co[:2], ht, ct[:5])
    encoder.train()
    with pytest.raises(RuntimeError, match="eval"):
        MFalcon(encoder, 2).encode_history(h, ho, ht)
    for config in (dict(causal=False), dict(normalizer="seq_len")):
        other = setup(**config)[0]
        with pytest.raises(ValueError, match="causal encoder with normalizer='max_seq_len'"):
            MFalcon(other, 2).encode_history(h, ho, ht)
