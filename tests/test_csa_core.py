"""CSA core semantics: limits against independently written attention, fast path vs per-image loop."""
import pytest
import torch


@pytest.fixture(scope="module")
def csa(pack):
    return pack("attention.csa")


def mha(q, k, v, heads):
    """Independent multi-head attention: q (Nq, C), k/v (Nk, C)."""
    d = q.shape[-1] // heads
    qh, kh, vh = (t.reshape(t.shape[0], heads, d).transpose(0, 1) for t in (q, k, v))
    w = torch.softmax(qh @ kh.transpose(1, 2) / d ** 0.5, dim=-1)
    return (w @ vh).transpose(0, 1).reshape(q.shape[0], -1)


def qkv(g, b, n, c, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(g * b, n, c, generator=gen, dtype=torch.float64) for _ in range(3)]


def plan(csa, b, n, rate, refs=0, seed=0):
    return csa.make_plan(b, n, rate, refs, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("g", [1, 2, 3])
def test_rate_zero_is_plain_self_attention(csa, g):
    q, k, v = qkv(g, 4, 16, 32)
    out = csa.consistent_self_attention(q, k, v, 4, plan(csa, 4, 16, 0.0))
    for r in range(q.shape[0]):
        torch.testing.assert_close(out[r], mha(q[r], k[r], v[r], 4))


@pytest.mark.parametrize("g", [1, 2])
def test_rate_one_is_attention_over_union_of_group(csa, g):
    b, n, c = 3, 10, 16
    q, k, v = qkv(g, b, n, c, seed=1)
    out = csa.consistent_self_attention(q, k, v, 2, plan(csa, b, n, 1.0))
    for chunk in range(g):
        rows = slice(chunk * b, (chunk + 1) * b)
        ku, vu = k[rows].reshape(b * n, c), v[rows].reshape(b * n, c)  # only this chunk's images
        for i in range(b):
            torch.testing.assert_close(out[chunk * b + i], mha(q[chunk * b + i], ku, vu, 2))


def test_reference_count_semantics_at_rate_one(csa):
    b, n, c, r = 5, 8, 16, 2
    q, k, v = qkv(2, b, n, c, seed=2)
    out = csa.consistent_self_attention(q, k, v, 4, plan(csa, b, n, 1.0, refs=r))
    for chunk in range(2):
        base = chunk * b
        refs_k = k[base:base + r].reshape(r * n, c)
        refs_v = v[base:base + r].reshape(r * n, c)
        for i in range(b):
            row = base + i
            if i < r:  # references: union of the references
                exp = mha(q[row], refs_k, refs_v, 4)
            else:  # story images: own tokens + the references only
                exp = mha(q[row], torch.cat((k[row], refs_k)), torch.cat((v[row], refs_v)), 4)
            torch.testing.assert_close(out[row], exp)


def test_single_reference_sees_only_itself(csa):
    q, k, v = qkv(1, 3, 8, 16, seed=3)
    out = csa.consistent_self_attention(q, k, v, 2, plan(csa, 3, 8, 0.5, refs=1))
    torch.testing.assert_close(out[0], mha(q[0], k[0], v[0], 2))
    assert not torch.allclose(out[1], mha(q[1], k[1], v[1], 2))


def test_story_images_sample_only_references(csa):
    p = plan(csa, 6, 20, 0.5, refs=2, seed=4)
    assert p.story_idx.shape == (4, 2 * 10)
    assert (p.story_idx // 20 < 2).all()
    assert p.ref_idx.shape == (2, 10)
    assert (p.ref_idx[0] // 20 == 1).all() and (p.ref_idx[1] // 20 == 0).all()


def test_plan_draws_distinct_tokens_from_each_other_image(csa):
    b, n, rate = 4, 50, 0.3
    p = plan(csa, b, n, rate, seed=5)
    m = csa.tokens_per_source(n, rate)
    assert m == 15 and p.all_idx.shape == (b, (b - 1) * m)
    for i in range(b):
        src = p.all_idx[i] // n
        assert i not in src.tolist()
        for j in set(src.tolist()):
            toks = p.all_idx[i][src == j]
            assert len(toks) == m and len(set(toks.tolist())) == m


def test_batch_of_one_is_plain(csa):
    q, k, v = qkv(2, 1, 12, 16, seed=6)
    out = csa.consistent_self_attention(q, k, v, 2, plan(csa, 1, 12, 1.0))
    for r in range(2):
        torch.testing.assert_close(out[r], mha(q[r], k[r], v[r], 2))


@pytest.mark.parametrize("refs", [0, 1, 2, 3])
@pytest.mark.parametrize("rate", [0.3, 0.5, 0.9])
def test_batched_equals_per_image_loop(csa, refs, rate):
    b, n, c = 5, 24, 32
    q, k, v = qkv(2, b, n, c, seed=7)
    p = plan(csa, b, n, rate, refs=refs, seed=8)
    fast = csa.consistent_self_attention(q, k, v, 4, p)
    slow = csa.naive_consistent_self_attention(q, k, v, 4, p)
    torch.testing.assert_close(fast, slow)


def test_sampling_is_deterministic_and_seeded(csa):
    a, b2 = plan(csa, 4, 64, 0.5, seed=11), plan(csa, 4, 64, 0.5, seed=11)
    c = plan(csa, 4, 64, 0.5, seed=12)
    assert torch.equal(a.all_idx, b2.all_idx)
    assert not torch.equal(a.all_idx, c.all_idx)
    state = torch.random.get_rng_state()
    plan(csa, 4, 64, 0.5, seed=13)
    assert torch.equal(state, torch.random.get_rng_state()), "plan drawing must not touch the global RNG"


def test_bad_rate_and_shape_raise(csa):
    with pytest.raises(ValueError):
        csa.tokens_per_source(10, 1.5)
    q, k, v = qkv(1, 3, 8, 16)
    with pytest.raises(ValueError):
        csa.consistent_self_attention(q, k, v, 2, plan(csa, 3, 9, 0.5))


def test_fp16_close_to_fp64(csa):
    q, k, v = qkv(2, 4, 16, 32, seed=9)
    p = plan(csa, 4, 16, 0.5)
    ref = csa.consistent_self_attention(q, k, v, 4, p)
    half = csa.consistent_self_attention(*(t.to(torch.bfloat16) for t in (q, k, v)), 4, p)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.double(), ref, atol=5e-2, rtol=5e-2)
