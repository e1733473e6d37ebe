"""The process side of the benchmark: runs one point per process.

Two ways in (chosen by the driver's --isolation):

* ``--serve`` (default): a *fork server*. It imports torch, dmlkern and PML once, then reads
  JSON requests on stdin and forks a fresh child per point, so each point still runs in its own
  process (own peak-memory counter, own crash/OOM, killable on timeout) without paying the
  ~4 s of imports every time. The server never touches CUDA or runs a kernel, so forking is safe.
* ``--point JSON --result PATH``: one point in this (spawned) process.

A point's spec: loss, provider, device, dtype, n, d, mode, warmup, repeats, time_limit,
jit_grace, mem_budget_gb, seed, threads, compile_dynamic. Its result: status (ok/oom/timeout/
error), samples (seconds per call), peak_mem_bytes, backend, note.
"""
from __future__ import annotations

import gc
import json
import os
import resource
import signal
import sys
import time
import traceback

from .specs import FLOOR_LOSS, LOSSES, num_classes

TORCH_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "fp64": "float64"}
ENV_BACKEND = {"dmlkern": None, "dmlkern-compiled": None, "dmlkern-cpp": "cpp", "dmlkern-triton": "triton",
               "reference": "reference"}
REFERENCE_FN = {
    "multi_similarity": "multi_similarity_loss",
    "ntxent": "ntxent_loss",
    "supcon": "supcon_loss",
    "lifted": "lifted_structure_loss",
    "generalized_lifted": "generalized_lifted_structure_loss",
    "npairs": "n_pairs_loss",
}
CLASS_NAME = {
    "multi_similarity": "MultiSimilarityLoss",
    "multi_similarity_miner": "MultiSimilarityLoss",
    "ntxent": "NTXentLoss",
    "supcon": "SupConLoss",
    "lifted": "LiftedStructureLoss",
    "generalized_lifted": "GeneralizedLiftedStructureLoss",
    "npairs": "NPairsLoss",
    "proxy_anchor": "ProxyAnchorLoss",
}


# ------------------------------------------------------------------------------------ helpers

def _status_kb(field):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def is_oom(exc) -> bool:
    import torch

    if isinstance(exc, MemoryError):
        return True
    if isinstance(exc, getattr(torch.cuda, "OutOfMemoryError", ())):
        return True
    msg = str(exc).lower()
    return any(s in msg for s in ("out of memory", "can't allocate memory", "cannot allocate memory",
                                  "not enough memory", "std::bad_alloc"))


class MemProbe:
    """Peak memory growth of the calls between reset() and peak().

    CUDA: torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), minus what was
    allocated at reset(). CPU: peak RSS. The peak is reset by writing 5 to /proc/self/clear_refs
    (Linux), then read as VmHWM; the fork server runs with a fixed glibc mmap threshold so freed
    blocks return to the OS and an earlier call cannot hide the next call's peak. Without
    clear_refs, ru_maxrss (ever-growing) is used, so the caller resets before the first call.
    """

    def __init__(self, device):
        self.device = device
        self.method = None

    def reset(self):
        import torch

        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            self.method = "cuda.max_memory_allocated"
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.base = _status_kb("VmRSS") * 1024
            self.method = "VmHWM after clear_refs"
        except (OSError, TypeError):
            self.base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            self.method = "ru_maxrss"

    def peak(self) -> int:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            return max(0, torch.cuda.max_memory_allocated() - self.base)
        if self.method.startswith("VmHWM"):
            hwm = _status_kb("VmHWM")
            maxrss = hwm * 1024 if hwm is not None else 0
        else:
            maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return max(0, maxrss - self.base)


def _limit_memory(device, budget_gb):
    """Turn 'more than the budget' into a catchable allocation failure instead of the kernel's OOM
    killer (which could hit someone else's process): RLIMIT_DATA on CPU, the caching allocator's
    per-process fraction on CUDA. Neither changes any device setting."""
    import torch

    if not budget_gb or budget_gb <= 0:
        return
    budget = int(budget_gb * 2**30)
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, (budget + torch.cuda.memory_allocated()) / total), device)
        return
    vmdata = _status_kb("VmData")
    if vmdata is None:
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
    want = vmdata * 1024 + budget + 2 * 2**30  # 2 GiB slack: compilers, thread arenas, libraries
    if hard != resource.RLIM_INFINITY:
        want = min(want, hard)
    if soft == resource.RLIM_INFINITY or want < soft:
        resource.setrlimit(resource.RLIMIT_DATA, (want, hard))


def make_timer(torch, device):
    """timed(step) -> seconds of one call of step(): CUDA events on a GPU, perf_counter on CPU."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

        def timed(step):
            start.record()
            step()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1000.0
    else:
        def timed(step):
            t0 = time.perf_counter()
            step()
            return time.perf_counter() - t0
    return timed


# ----------------------------------------------------------------------------------- builders

def _labels(loss, n, device, gen):
    import torch

    if loss != FLOOR_LOSS and LOSSES[loss].labels == "simclr":
        lab = torch.arange(n) % max(1, n // 2)  # = cat([arange(N/2)] * 2) for even N
    else:
        c = num_classes(loss, n) if loss != FLOOR_LOSS else max(1, n // 8)
        lab = (torch.arange(n) % c)[torch.randperm(n, generator=gen)]
    return lab.to(device)


def _dmlkern_callable(loss, x, labels, d):
    """The dmlkern class (its backend is chosen by DMLKERN_BACKEND, set by the caller)."""
    if loss == "masked_lse":
        from dmlkern.ops import masked_lse, resolve_backend

        return (lambda: masked_lse(x, x_labels=labels, mask="diff").sum(),
                lambda: resolve_backend("auto", x.device), [])
    import dmlkern.losses as L
    import dmlkern.miners as M

    return _class_callable(L, M, loss, x, labels, d)


def _pml_callable(loss, x, labels, d):
    import pytorch_metric_learning.losses as L
    import pytorch_metric_learning.miners as M

    return _class_callable(L, M, loss, x, labels, d)


def _class_callable(L, M, loss, x, labels, d):
    cls = getattr(L, CLASS_NAME[loss])
    if loss == "proxy_anchor":
        module = cls(num_classes=num_classes(loss, x.shape[0]), embedding_size=d).to(x.device)
    else:
        module = cls().to(x.device)
    params = [p for p in module.parameters()]

    def backend():
        if L.__name__.startswith("pytorch_metric_learning"):
            return "pml"
        b = getattr(module, "last_backend", None) or "reference"
        if miner is not None:
            mb = getattr(miner, "last_backend", None)
            if mb and mb != b:
                b = f"{b}+miner:{mb}"
        return b

    miner = None
    if loss == "multi_similarity_miner":
        miner = M.MultiSimilarityMiner()
        return (lambda: module(x, labels, miner(x, labels))), backend, params
    return (lambda: module(x, labels)), backend, params


def _compile_callable(loss, x, labels, d, dynamic):
    import torch

    import dmlkern.reference as R
    from dmlkern.distances import CosineSimilarity

    params = []
    if loss == "masked_lse":
        def fn(x, lab):
            return R.masked_lse(x, x, lab, lab, 1.0, "diff", True).sum()
        args = (x, labels)
    elif loss == "multi_similarity_miner":
        dist = CosineSimilarity()

        def fn(x, lab):
            with torch.no_grad():  # as BaseMiner.forward
                idx = R.multi_similarity_miner(dist(x, x), lab, lab, 0.1, True, True)
            return R.multi_similarity_loss(x, lab, idx)
        args = (x, labels)
    elif loss == "proxy_anchor":
        c = num_classes(loss, x.shape[0])
        proxies = torch.nn.Parameter(torch.empty(c, d, device=x.device))
        torch.nn.init.kaiming_normal_(proxies, mode="fan_out")
        params = [proxies]
        fn = R.proxy_anchor_loss
        args = (x, labels, proxies)
    else:
        fn = getattr(R, REFERENCE_FN[loss])
        args = (x, labels)
    compiled = torch.compile(fn, dynamic=bool(dynamic))
    return (lambda: compiled(*args)), (lambda: "inductor"), params


FLOOR_MAX_OUT_BYTES = 2**31


def _floor_callable(torch, x):
    """T_mm: one x @ x.T. Above 2 GiB of output (e.g. N = 262144 on a GPU) the same product is
    done in row blocks into one reused buffer (same FLOPs, no N x N allocation)."""
    n, item = x.shape[0], x.element_size()
    if n * n * item <= FLOOR_MAX_OUT_BYTES:
        return (lambda: x @ x.T), (lambda: "torch"), x, []
    rows = max(1, FLOOR_MAX_OUT_BYTES // (n * item))
    buf = torch.empty(rows, n, dtype=x.dtype, device=x.device)
    xt = x.T

    def blocked():
        for i in range(0, n, rows):
            xi = x[i:i + rows]
            torch.matmul(xi, xt, out=buf[: xi.shape[0]])
        return buf

    return blocked, (lambda: f"torch-blocked-{rows}"), x, []


def build(spec, torch, device):
    loss, provider, n, d = spec["loss"], spec["provider"], spec["n"], spec["d"]
    dtype = getattr(torch, TORCH_DTYPES[spec["dtype"]])
    gen = torch.Generator().manual_seed(int(spec.get("seed", 0)))
    x = torch.randn(n, d, generator=gen).to(device=device, dtype=dtype)
    labels = _labels(loss, n, device, gen)
    if loss == FLOOR_LOSS:
        return _floor_callable(torch, x)
    x.requires_grad_(True)
    if provider in ENV_BACKEND:
        fn, backend, params = _dmlkern_callable(loss, x, labels, d)
        if provider == "dmlkern-compiled":
            compiled, eager_backend = torch.compile(fn), backend
            fn, backend = compiled, (lambda: f"{eager_backend()}+compile")
    elif provider == "pml":
        fn, backend, params = _pml_callable(loss, x, labels, d)
    elif provider == "compile":
        fn, backend, params = _compile_callable(loss, x, labels, d, spec.get("compile_dynamic", True))
    else:
        raise ValueError(f"unknown provider {provider!r}")
    return fn, backend, x, params


# ------------------------------------------------------------------------------------- a point

def run_point(spec) -> dict:
    """Build, warm up, time and measure one point in this process. Never raises."""
    t_begin = time.perf_counter()
    out = {"status": "error", "samples": [], "peak_mem_bytes": None, "backend": "", "note": ""}
    try:
        env = ENV_BACKEND.get(spec["provider"])
        if spec["loss"] != "matmul_floor" and spec["provider"] in ENV_BACKEND:
            if env is None:
                os.environ.pop("DMLKERN_BACKEND", None)
            else:
                os.environ["DMLKERN_BACKEND"] = env
        import torch

        if spec.get("threads"):
            torch.set_num_threads(int(spec["threads"]))
        device = torch.device(spec["device"])
        if device.type == "cuda":
            torch.cuda.set_device(device.index or 0)
        _limit_memory(device, spec.get("mem_budget_gb"))
        torch.manual_seed(int(spec.get("seed", 0)))
        fn, backend, x, params = build(spec, torch, device)
        hang = os.environ.get("DMLKERN_BENCH_HANG")  # test hook: "loss:provider:n" never finishes
        if hang and hang == f"{spec['loss']}:{spec['provider']}:{spec['n']}":
            time.sleep(10**6)
        fwdbwd = spec["mode"] == "fwdbwd" and spec["loss"] != "matmul_floor"

        def step():
            if fwdbwd:
                x.grad = None
                for p in params:
                    p.grad = None
                fn().backward()
            else:
                fn()

        timer = make_timer(torch, device)

        def timed():
            return timer(step)

        limit = float(spec["time_limit"])
        jit = bool(spec.get("jit_grace"))
        probe = MemProbe(device)
        warmup = int(spec["warmup"])
        if warmup <= 0:
            probe.reset()  # no warm-up: the first call is measured too
        clock = time.perf_counter()
        done_warm = 0
        while done_warm < warmup:
            t = timed()
            done_warm += 1
            if done_warm == 1:
                out["first_call_s"] = t
                if jit:
                    clock = time.perf_counter()  # compilation/autotuning is not timed
                    continue
            if time.perf_counter() - clock + t > 0.5 * limit:
                break
        if warmup > 0:
            x.grad = None
            for p in params:
                p.grad = None
            probe.reset()
        samples = []
        repeats = max(1, int(spec["repeats"]))
        while len(samples) < repeats:
            samples.append(timed())
            s = sorted(samples)
            nxt = s[len(s) // 2]
            cap = 0.9 * limit if len(samples) < 3 else 0.5 * limit
            if time.perf_counter() - clock + nxt > cap:
                break
        out.update(status="ok", samples=samples, peak_mem_bytes=probe.peak(), backend=str(backend()),
                   mem_method=probe.method, warmup_done=done_warm)
    except BaseException as exc:  # noqa: BLE001 - everything is recorded, nothing escapes
        try:
            oom = is_oom(exc)
        except Exception:  # noqa: BLE001
            oom = False
        out["status"] = "oom" if oom else "error"
        tb = traceback.format_exception(type(exc), exc, exc.__traceback__)
        out["note"] = (f"{type(exc).__name__}: {exc}")[:600]
        out["traceback"] = "".join(tb)[-4000:]
    out["wall_s"] = time.perf_counter() - t_begin
    return out


def machine_info() -> dict:
    """What the report header needs (run in a child so the server never initialises CUDA)."""
    import platform

    import torch

    import dmlkern

    info = {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "nproc": os.cpu_count(), "cpu_model": platform.processor() or platform.machine()}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    info["mem_available_bytes"] = avail
    try:
        info["build_info"] = dmlkern.build_info()
    except Exception as exc:  # noqa: BLE001
        info["build_info"] = {"error": repr(exc)}
    info["cuda_available"] = torch.cuda.is_available()
    if info["cuda_available"]:
        props = torch.cuda.get_device_properties(0)
        info["gpu_name"] = props.name
        info["gpu_total_bytes"] = props.total_memory
    try:
        import pytorch_metric_learning

        info["pml_version"] = pytorch_metric_learning.__version__
    except Exception:  # noqa: BLE001
        info["pml_version"] = None
    try:
        import triton

        info["triton_version"] = triton.__version__
    except Exception:  # noqa: BLE001
        info["triton_version"] = None
    return info


# ---------------------------------------------------------------------------- process plumbing

def _write_json(path, obj):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


def _child(job, result_path):
    """In the forked child: new process group (so a timeout kills helpers too), stdout -> stderr."""
    code = 0
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.setpgid(0, 0)
        _write_json(result_path, machine_info() if job == "info" else run_point(job))
    except BaseException:  # noqa: BLE001
        traceback.print_exc()
        code = 3
    finally:
        sys.stderr.flush()
        os._exit(code)


def _kill_group(pid):
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_forked(job, result_path, hard_limit) -> dict:
    """Fork, run `job` (a point spec, or "info") in the child, wait at most hard_limit seconds."""
    if os.path.exists(result_path):
        os.remove(result_path)
    pid = os.fork()
    if pid == 0:
        _child(job, result_path)
    try:
        os.setpgid(pid, pid)
    except OSError:
        pass
    try:
        return _wait(pid, result_path, hard_limit)
    except BaseException:  # e.g. Ctrl-C: do not leave the point running
        _kill_group(pid)
        raise


def _wait(pid, result_path, hard_limit):
    deadline = time.monotonic() + hard_limit
    timed_out = False
    delay = 0.002
    while True:
        # WNOWAIT: the exited child stays a zombie, so its process group id cannot be reused
        # before the stray helpers in that group (compile workers) are killed below.
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        if info is not None and info.si_pid == pid:
            break
        if time.monotonic() > deadline:
            timed_out = True
            break
        time.sleep(delay)
        delay = min(0.05, delay * 2)
    _kill_group(pid)
    _, status = os.waitpid(pid, 0)
    return _collect(result_path, status, timed_out, hard_limit)


def _collect(result_path, status, timed_out, hard_limit):
    if timed_out:
        return {"status": "timeout", "note": f"killed after {hard_limit:.0f} s"}
    if os.path.exists(result_path):
        try:
            with open(result_path) as f:
                return json.load(f)
        except (OSError, ValueError) as exc:
            return {"status": "error", "note": f"unreadable result: {exc}"}
    if status is not None and os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        if sig == signal.SIGKILL:
            return {"status": "oom", "note": "killed by SIGKILL (most likely the out-of-memory killer)"}
        return {"status": "error", "note": f"crashed with signal {sig} ({signal.Signals(sig).name})"}
    code = os.WEXITSTATUS(status) if status is not None else None
    return {"status": "error", "note": f"exited with code {code} and no result"}


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)


def serve():
    """The fork server: one JSON request per stdin line, one JSON answer per stdout line."""
    signal.signal(signal.SIGTERM, _exit_on_sigterm)  # stop the running point too (see run_forked)
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything printed by libraries (here or in children) goes to stderr
    import torch  # noqa: F401

    import dmlkern  # noqa: F401
    import dmlkern.distances  # noqa: F401
    import dmlkern.losses  # noqa: F401
    import dmlkern.miners  # noqa: F401
    import dmlkern.ops  # noqa: F401
    import dmlkern.reference  # noqa: F401

    try:
        import pytorch_metric_learning.losses  # noqa: F401
        import pytorch_metric_learning.miners  # noqa: F401
    except Exception:  # noqa: BLE001
        pass
    try:
        import torch._dynamo  # noqa: F401
    except Exception:  # noqa: BLE001
        pass
    cuda_initialized = bool(torch.cuda.is_initialized())
    proto.write(json.dumps({"ready": True, "pid": os.getpid(), "cuda_initialized": cuda_initialized}) + "\n")
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        req = json.loads(line)
        if req.get("op") == "quit":
            break
        job = "info" if req.get("op") == "info" else req["spec"]
        try:
            res = run_forked(job, req["result"], float(req["hard_limit"]))
        except Exception as exc:  # noqa: BLE001
            res = {"status": "error", "note": f"fork server: {exc!r}"}
        proto.write(json.dumps(res) + "\n")


def main(argv=None):
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--serve", action="store_true", help="run as the fork server (JSON lines on stdin/stdout)")
    ap.add_argument("--point", help="JSON spec of one point to run in this process")
    ap.add_argument("--info", action="store_true", help="print machine info as JSON")
    ap.add_argument("--result", help="where --point/--info writes its JSON result")
    args = ap.parse_args(argv)
    if args.serve:
        serve()
        return 0
    res = machine_info() if args.info else run_point(json.loads(args.point))
    if args.result:
        _write_json(args.result, res)
    else:
        print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
