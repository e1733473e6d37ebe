"""Random batches (embeddings, labels, an optional reference set) and their shapes for the miner
and classification-loss parity tests, and the comparison of mined index tuples (tests only)."""
import torch


def canon(t):
    """Index tuple -> comparable Python structure: sorted triplets, or (sorted pos, sorted neg)."""
    if len(t) == 3:
        return sorted(zip(*[x.tolist() for x in t]))
    assert len(t) == 4
    return sorted(zip(t[0].tolist(), t[1].tolist())), sorted(zip(t[2].tolist(), t[3].tolist()))


def assert_same_indices(ours, theirs, exact_order=True):
    assert len(ours) == len(theirs)
    for x in ours:
        assert x.dtype == torch.long
    assert canon(ours) == canon(theirs)
    if exact_order:
        for a, b in zip(ours, theirs):
            assert torch.equal(a.cpu(), b.cpu().long())


def batch(seed, B, D, num_classes, dtype=torch.float64, R=None):
    """Random embeddings/labels (and a reference set when R is given), from a private generator."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=g, dtype=dtype)
    y = torch.randint(0, num_classes, (B,), generator=g)
    if R is None:
        return x, y
    r = torch.randn(R, D, generator=g, dtype=dtype)
    ry = torch.randint(0, num_classes, (R,), generator=g)
    return x, y, r, ry


# (batch, dim, classes) with odd sizes
SHAPES = [(13, 5, 3), (7, 9, 4), (20, 3, 5)]
