"""What the TripletMarginLoss row-sweep kernels' tests share (tests/test_triplet_triton.py,
tests/test_triplet_slots.py): random row blocks of similarities, the loss against PML."""
import torch


def random_block(rows, cols, classes, dtype, seed, self_block=False, row0=0, device="cpu"):
    """A block of unit-row cosines: (s, labels of the rows, labels of the columns)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.nn.functional.normalize(torch.randn(cols, 9, generator=g, dtype=torch.float64), dim=1)
    ref_labels = torch.randint(0, classes, (cols,), generator=g)
    if self_block:  # rows row0 .. row0 + rows of the batch against itself
        x, labels_b = y[row0:row0 + rows], ref_labels[row0:row0 + rows]
    else:
        x = torch.nn.functional.normalize(torch.randn(rows, 9, generator=g, dtype=torch.float64), dim=1)
        labels_b = torch.randint(0, classes, (rows,), generator=g)
    return (x @ y.T).to(dtype).to(device), labels_b.to(device), ref_labels.to(device)


def swap_block(cols, classes, block_classes, dtype, seed, device="cpu"):
    """A block for `swap`: the rows of the classes in range(*block_classes) of a batch sorted by
    label against the whole batch, with a duplicated row in the block (ties of min(e_an, e_pn)):
    (s, labels of the rows, labels of the columns, row0)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.nn.functional.normalize(torch.randn(cols, 9, generator=g, dtype=torch.float64), dim=1)
    labels = torch.sort(torch.randint(0, classes, (cols,), generator=g)).values
    rows = ((labels >= block_classes[0]) & (labels < block_classes[1])).nonzero()[:, 0]
    row0, row1 = int(rows[0]), int(rows[-1]) + 1
    if row1 - row0 > 1 and labels[row0] == labels[row0 + 1]:
        y[row0 + 1] = y[row0]
    return (y[row0:row1] @ y.T).to(dtype).to(device), labels[row0:row1].to(device), labels.to(device), row0


def triplet_loss(lib, kw, kind, x, labels, ref=None, ref_labels=None, backend=None):
    """TripletMarginLoss(**kw) of dmlkern or PML (lib "pml") on a TripletMarginMiner(kind)'s
    triplets (None: every triplet): (value, gradients of x (and ref), the loss module)."""
    import pytorch_metric_learning.losses as pml_losses
    import pytorch_metric_learning.miners as pml_miners
    from dmlkern import losses, miners

    L, M = (losses, miners) if lib == "dmlkern" else (pml_losses, pml_miners)
    x = x.clone().requires_grad_(True)
    ref = None if ref is None else ref.clone().requires_grad_(True)
    loss_fn = L.TripletMarginLoss(**kw)
    if backend is not None:
        loss_fn.backend = backend
    mined = None if kind is None else M.TripletMarginMiner(type_of_triplets=kind)(x, labels, ref, ref_labels)
    value = loss_fn(x, labels, mined, ref, ref_labels)
    wrt = [x] + ([] if ref is None else [ref])
    grads = torch.autograd.grad(value, wrt, allow_unused=True)
    return value.detach(), [torch.zeros_like(w) if g is None else g for g, w in zip(grads, wrt)], loss_fn


def assert_loss_matches_pml(kw, kind, device, backend):
    """dmlkern's loss on `device` with `backend` against PML's, fp64, on a batch and on a batch
    with ref_emb: values and gradients."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(61, 12, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 7, (61,), generator=g)
    ref = torch.randn(45, 12, generator=g, dtype=torch.float64)
    ref_labels = torch.randint(0, 7, (45,), generator=g)
    for args in ((x, labels), (x, labels, ref, ref_labels)):
        ours, our_grads, loss_fn = triplet_loss("dmlkern", kw, kind, *(a.to(device) for a in args), backend=backend)
        want, want_grads, _ = triplet_loss("pml", kw, kind, *args)
        assert loss_fn.last_backend in ("blocked", "zero"), loss_fn.last_fallback
        torch.testing.assert_close(ours.cpu(), want, rtol=1e-9, atol=1e-12)
        for a, b in zip(our_grads, want_grads):
            torch.testing.assert_close(a.cpu(), b, rtol=1e-9, atol=1e-12)
