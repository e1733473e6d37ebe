"""Runs a function on W gloo ranks (fresh processes, one CPU thread each) and returns what
each rank returned, in rank order. The function must be importable (module level) and its
arguments and results picklable (tensors are)."""
import io
import os
import tempfile
import traceback

import torch
import torch.multiprocessing as mp


def _rank_main(r, world, init_file, fn, args, queue):
    try:
        torch.set_num_threads(1)
        torch.distributed.init_process_group("gloo", init_method="file://" + init_file, rank=r, world_size=world)
        try:
            result = fn(r, world, *args)
        finally:
            torch.distributed.destroy_process_group()
        buf = io.BytesIO()  # bytes, not tensors: a tensor in a queue dies with its process's shared memory
        torch.save(result, buf)
        queue.put((r, True, buf.getvalue()))
    except BaseException:  # noqa: BLE001 -- reported to the test in the parent
        queue.put((r, False, traceback.format_exc()))


def run_ranks(fn, world, *args, timeout=600, triton_interpreter=False):
    """fn(rank, world, *args) on `world` gloo ranks; the list of results in rank order. A rank's
    exception is raised here with its traceback. The ranks inherit TRITON_INTERPRET only with
    `triton_interpreter` (a rank that runs a Triton kernel on CPU tensors): without it their
    `import dmlkern` skips registering the Triton ops, ~1-2 s of each rank's start."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        procs = [ctx.Process(target=_rank_main, args=(r, world, init_file, fn, args, queue)) for r in range(world)]
        interpret = os.environ.get("TRITON_INTERPRET")
        if interpret is not None and not triton_interpreter:
            del os.environ["TRITON_INTERPRET"]  # for the children only: restored once they started
        try:
            for p in procs:
                p.start()
        finally:
            if interpret is not None:
                os.environ["TRITON_INTERPRET"] = interpret
        results, errors = {}, []
        try:
            for _ in range(world):
                r, ok, value = queue.get(timeout=timeout)
                if ok:
                    results[r] = torch.load(io.BytesIO(value), weights_only=False)
                else:
                    errors.append(f"rank {r}:\n{value}")
                if errors:
                    break
        finally:
            for p in procs:
                p.join(timeout=5 if errors else timeout)
                if p.is_alive():
                    p.kill()
        if errors:
            raise AssertionError("\n".join(errors))
    return [results[r] for r in range(world)]


def shard(x, sizes, r):
    """Rank r's rows of x when shards have `sizes` rows (rank order)."""
    start = sum(sizes[:r])
    return x[start:start + sizes[r]]
