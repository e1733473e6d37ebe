"""Per-rank time and memory of the exact distributed losses (gloo ranks on this machine) against
one process computing the same global batch: `python -m dmlkern.bench.distributed`.

Every process runs one CPU thread, so on a machine with at least `--world` cores the ranks run
side by side and the per-rank time shows the scaling; "gathered" is the wrapper computing the
whole global loss on every rank, "row-sharded" each rank its own rows. Memory: the peak resident
growth of one forward + backward (VmHWM, reset before it) over the resident set with the inputs
in place."""
import argparse
import os
import tempfile
import time

import torch
import torch.multiprocessing as mp

LOSSES = {"multi_similarity": "MultiSimilarityLoss", "ntxent": "NTXentLoss", "supcon": "SupConLoss",
          "contrastive": "ContrastiveLoss"}


def _kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _measure(step, reps):
    """(best seconds, peak MiB over the resident set before the first call) of step()."""
    before = _kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - t0)
    return best, (_kib("VmHWM") - before) / 1024.0


def _inputs(n_global, dim, classes):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n_global, dim, generator=g), torch.randint(0, classes, (n_global,), generator=g)


def _rank(r, world, init_file, loss_name, n_global, dim, classes, mode, reps, queue):
    from dmlkern import losses
    from dmlkern.utils.distributed import DistributedLossWrapper

    torch.set_num_threads(1)
    emb, labels = _inputs(n_global, dim, classes)
    loss = getattr(losses, LOSSES[loss_name])()
    if world > 1:
        torch.distributed.init_process_group("gloo", init_method="file://" + init_file, rank=r, world_size=world)
        loss = DistributedLossWrapper(loss, row_sharded=(mode == "row-sharded"))
        step_rows = slice(r * n_global // world, (r + 1) * n_global // world)
        emb, labels = emb[step_rows].clone(), labels[step_rows].clone()
    x = emb.requires_grad_()

    def step():
        x.grad = None
        loss(x, labels).backward()

    step()  # warm-up (first-call set-up, the allocator's pools)
    seconds, mib = _measure(step, reps)
    if world > 1:
        torch.distributed.destroy_process_group()
    queue.put((r, seconds, mib, getattr(loss, "last_mode", "one process")))


def run_point(loss_name, n_global, dim, classes, world, mode, reps):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        procs = [ctx.Process(target=_rank, args=(r, world, os.path.join(tmp, "init"), loss_name, n_global, dim,
                                                 classes, mode, reps, queue)) for r in range(world)]
        for p in procs:
            p.start()
        results = sorted(queue.get(timeout=3600) for _ in procs)
        for p in procs:
            p.join()
    return {"seconds": max(s for _, s, _, _ in results), "mib": max(m for _, _, m, _ in results),
            "mode": results[0][3]}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--losses", nargs="+", default=list(LOSSES), choices=list(LOSSES))
    parser.add_argument("--n", nargs="+", type=int, default=[4096, 16384])
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--classes", type=int, default=512)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--out", default=None, help="a folder for summary.md (printed either way)")
    args = parser.parse_args(argv)
    lines = ["| loss | N_g | one process (s) | gathered, per rank (s) | row-sharded, per rank (s) | "
             "row-sharded / one process | peak MiB: one process | gathered | row-sharded |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    print(lines[0], flush=True)
    for loss_name in args.losses:
        for n in args.n:
            one = run_point(loss_name, n, args.dim, args.classes, 1, "one", args.reps)
            gathered = run_point(loss_name, n, args.dim, args.classes, args.world, "gathered", args.reps)
            rows = run_point(loss_name, n, args.dim, args.classes, args.world, "row-sharded", args.reps)
            assert gathered["mode"] == "gathered" and rows["mode"] == "row_sharded", (gathered, rows)
            line = (f"| {loss_name} | {n} | {one['seconds']:.3f} | {gathered['seconds']:.3f} | {rows['seconds']:.3f} "
                    f"| {rows['seconds'] / one['seconds']:.2f} | {one['mib']:.0f} | {gathered['mib']:.0f} "
                    f"| {rows['mib']:.0f} |")
            lines.append(line)
            print(line, flush=True)
    header = (f"# Distributed losses on this CPU: {args.world} gloo ranks, one thread each; fp32, D={args.dim}, "
              f"{args.classes} classes, fwd+bwd, best of {args.reps}; peak MiB = resident growth of one step, "
              f"worst rank\n\n")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "summary.md"), "w") as f:
            f.write(header + "\n".join(lines) + "\n")
    return lines


if __name__ == "__main__":
    main()
