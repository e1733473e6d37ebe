"""Train a small MLP embedding on scikit-learn's digits with dmlkern, and the same run with
pytorch-metric-learning (same seed, same initial weights, same batches).

Loss: MultiSimilarityLoss, miner: MultiSimilarityMiner. Prints Recall@1 on the held-out split
for both runs and the largest absolute difference between the two per-step loss curves.

    python examples/train_digits.py [--epochs N] [--batch-size B] [--seed S]

The data ships with scikit-learn (no download). Runs in a few seconds on a CPU. The last line
is ``RESULT {json}`` for scripts.
"""

import argparse
import copy
import json
import time

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import dmlkern.losses
import dmlkern.miners


def make_model(in_dim, emb_dim=32, hidden=128):
    return torch.nn.Sequential(
        torch.nn.Linear(in_dim, hidden),
        torch.nn.ReLU(),
        torch.nn.Linear(hidden, emb_dim),
    )


def recall_at_1(model, x, y):
    """Fraction of held-out samples whose nearest other sample (cosine) has the same label."""
    with torch.no_grad():
        e = torch.nn.functional.normalize(model(x), dim=1)
        sim = e @ e.t()
        sim.fill_diagonal_(-float("inf"))
        nn_idx = sim.argmax(dim=1)
    return float((y[nn_idx] == y).double().mean())


def train(model, loss_fn, miner, x, y, batches, lr, paths):
    """Adam steps over `batches`; the loss curve. `paths` collects which path computed the loss
    (dmlkern's `last_backend`: "cpp" = the fused kernels, "reference" = materialising)."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    curve = []
    for idx in batches:
        emb = model(x[idx])
        pairs = miner(emb, y[idx])
        loss = loss_fn(emb, y[idx], pairs)
        opt.zero_grad()
        loss.backward()
        opt.step()
        curve.append(loss.item())
        paths.add(getattr(loss_fn, "last_backend", None) or "pml")
    return curve


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-pml", action="store_true", help="only run dmlkern")
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    digits = load_digits()
    X = digits.data.astype(np.float64) / 16.0
    x_tr, x_te, y_tr, y_te = train_test_split(
        X, digits.target, test_size=0.33, random_state=args.seed, stratify=digits.target
    )
    dtype = torch.float64  # double precision keeps the two runs' curves equal to ~1e-12
    x_tr, x_te = torch.tensor(x_tr, dtype=dtype), torch.tensor(x_te, dtype=dtype)
    y_tr, y_te = torch.tensor(y_tr), torch.tensor(y_te)

    g = torch.Generator().manual_seed(args.seed)
    batches = []
    for _ in range(args.epochs):
        perm = torch.randperm(len(x_tr), generator=g)
        batches += [perm[i : i + args.batch_size] for i in range(0, len(perm) - args.batch_size + 1, args.batch_size)]

    init = make_model(x_tr.shape[1]).to(dtype)
    torch.optim.Adam(init.parameters())  # first use imports torch._dynamo: keep it out of the timings
    runs = {"dmlkern": (dmlkern.losses.MultiSimilarityLoss(), dmlkern.miners.MultiSimilarityMiner())}
    if not args.no_pml:
        import pytorch_metric_learning.losses as pml_losses
        import pytorch_metric_learning.miners as pml_miners

        runs["pml"] = (pml_losses.MultiSimilarityLoss(), pml_miners.MultiSimilarityMiner())

    result = {"epochs": args.epochs, "steps": len(batches)}
    curves = {}
    for name, (loss_fn, miner) in runs.items():
        model = copy.deepcopy(init)
        t0 = time.perf_counter()
        paths = set()
        curves[name] = train(model, loss_fn, miner, x_tr, y_tr, batches, args.lr, paths)
        result[f"paths_{name}"] = sorted(paths)
        seconds = time.perf_counter() - t0
        r1 = recall_at_1(model, x_te, y_te)
        result[f"recall_at_1_{name}"] = r1
        result[f"final_loss_{name}"] = curves[name][-1]
        print(f"{name:8s} Recall@1 {r1:.4f}  first/last loss {curves[name][0]:.4f}/{curves[name][-1]:.4f}  "
              f"({seconds:.1f} s, path: {', '.join(sorted(paths))})")
    result["loss_curve_dmlkern"] = curves["dmlkern"]
    if "pml" in curves:
        diff = float(np.max(np.abs(np.array(curves["dmlkern"]) - np.array(curves["pml"])))) if batches else 0.0
        result["max_abs_loss_diff"] = diff
        print(f"largest |loss_dmlkern - loss_pml| over {len(batches)} steps: {diff:.3e}")
    print("RESULT " + json.dumps(result))
    return result


if __name__ == "__main__":
    main()
