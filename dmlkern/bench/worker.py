"""One benchmark point, in a forkserver child (dmlkern.bench.cli): build the call, warm up, take its
peak memory, then time it with triton.testing.do_bench on CUDA or torch.utils.benchmark on CPU."""
from __future__ import annotations

import ctypes
import faulthandler
import functools
import gc
import importlib
import os
import resource
import statistics
import time
import traceback

from .specs import FLOOR_LOSS, LOSSES, TORCH_DTYPES, num_classes

PRELOAD = ["torch", "dmlkern.bench.worker", "dmlkern.losses", "dmlkern.miners", "dmlkern.ops",
           "dmlkern.reference", "dmlkern.distances", "pytorch_metric_learning.losses",
           "pytorch_metric_learning.miners", "torch._dynamo"]
ENV_BACKEND = {"dmlkern": None, "dmlkern-compiled": None, "dmlkern-cpp": "cpp", "dmlkern-triton": "triton",
               "reference": "reference"}
REFERENCE_FN = {"multi_similarity": "multi_similarity_loss", "ntxent": "ntxent_loss", "supcon": "supcon_loss",
                "lifted": "lifted_structure_loss", "generalized_lifted": "generalized_lifted_structure_loss",
                "npairs": "n_pairs_loss", "nca": "nca_loss", "tuplet_margin": "tuplet_margin_loss",
                "triplet": "triplet_margin_loss", "triplet_swap": "triplet_margin_loss",
                "contrastive": "contrastive_loss", "margin": "margin_loss",
                "circle": "circle_loss", "angular": "angular_loss"}
FLOOR_MAX_OUT_BYTES = 2**31
MAX_TIMING_S = 10.0  # a point's timing window, unless two calls take longer


def timing_window(repeats, call_s, left_s, limit_s):
    """(seconds, most) of calls to time: --repeats calls' worth, within what the point has left, at
    most max(MAX_TIMING_S, two calls): a 9 s call (a class loss at C = 2^20) is timed twice, not five
    times, so the default sweep keeps its budget for the other points; never under 50 ms (or half
    the limit). `most`: while the spread is wide, more blocks up to twice that, not past
    MAX_TIMING_S (nor what is left)."""
    seconds = max(min(repeats * call_s, left_s, max(MAX_TIMING_S, 2 * call_s)), min(0.05, 0.5 * limit_s))
    return seconds, min(left_s, max(0.5, min(2 * seconds, max(MAX_TIMING_S, seconds))))


def time_call(torch, device, step, seconds, most=None):
    """(median, p20, p80, calls) of step() in seconds over about `seconds` of calls; on CPU more, up to
    `most`, until the block times' spread is within 10 % of their median."""
    if device.type == "cuda":
        from triton.testing import do_bench

        med, p20, p80 = do_bench(step, warmup=1, rep=max(1.0, 1e3 * seconds), quantiles=[0.5, 0.2, 0.8])
        return med / 1e3, p20 / 1e3, p80 / 1e3, None
    from torch.utils.benchmark import Timer

    m = Timer("step()", globals={"step": step}, num_threads=torch.get_num_threads()).adaptive_autorange(
        threshold=0.1, min_run_time=seconds, max_run_time=max(seconds, most or seconds))
    q = statistics.quantiles(m.times, n=5, method="inclusive") if len(m.times) > 1 else [m.median] * 4
    return m.median, q[0], q[3], m.number_per_run * len(m.times)


def _status_bytes(field):
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))
    except (OSError, StopIteration):
        return None


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_FIXED_THRESHOLD = 128 * 1024


def return_freed_memory():
    """From now on in this process, blocks of 128 KiB or more are mmapped and go back to the OS when
    freed (glibc's fixed mmap threshold, as MALLOC_MMAP_THRESHOLD_=131072), and the heap's free
    memory is released now: a peak of RSS then shows the call's own memory, not what an earlier call
    left free in the heap. Called after the timing, which runs under the default allocator (its
    dynamic threshold keeps freed blocks for reuse, as in any user's process: under the fixed one,
    every block of 128 KiB or more would be page-faulted afresh in every call, PML's N x N
    tensors most). Returns whether it could (glibc); elsewhere nothing changes."""
    try:
        libc = ctypes.CDLL(None)
        ok = (libc.mallopt(_M_MMAP_THRESHOLD, _FIXED_THRESHOLD) == 1
              and libc.mallopt(_M_TRIM_THRESHOLD, _FIXED_THRESHOLD) == 1)
        libc.malloc_trim(0)
        return ok
    except (OSError, AttributeError):
        return False


class DefaultAllocatorPeak:
    """Peak RSS growth over the timed calls, which run under glibc's default allocator (as in a user's
    process), from a trimmed heap. Its dynamic mmap threshold can leave freed blocks pinned in the heap
    under memory the call keeps, so RSS grows with every block of a loop: peak_memory, run under a
    fixed threshold, cannot see that. CPU with /proc only; else growth() is None."""

    def __init__(self):
        self.base = None
        try:
            ctypes.CDLL(None).malloc_trim(0)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # VmHWM := VmRSS
            self.base = _status_bytes("VmRSS")
        except (OSError, AttributeError):
            pass

    def growth(self):
        peak = _status_bytes("VmHWM") if self.base is not None else None
        return None if peak is None else max(0, peak - self.base)


def peak_memory(torch, device, run):
    """(run(), peak memory growth during it, method). CPU: VmHWM after resetting it (ru_maxrss where
    clear_refs is unavailable), after return_freed_memory, so an earlier call cannot hide a peak."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = run()
        torch.cuda.synchronize()
        return out, max(0, torch.cuda.max_memory_allocated() - base), "cuda.max_memory_allocated"
    fixed = return_freed_memory()

    def maxrss():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS
        base, peak, method = _status_bytes("VmRSS"), (lambda: _status_bytes("VmHWM")), "VmHWM after clear_refs"
    except OSError:
        base, peak, method = maxrss(), maxrss, "ru_maxrss"
    out = run()
    return out, max(0, peak() - base), method + ("" if fixed else " (allocator's threshold unchanged)")


def limit_memory(torch, device, budget_gb):
    """Over the budget is a catchable allocation failure ('oom'), not the OOM killer: RLIMIT_DATA on
    CPU (RLIMIT_AS would count torch's virtual reservations), the allocator's fraction on CUDA."""
    if not budget_gb or budget_gb <= 0:
        return
    budget = int(budget_gb * 2**30)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()  # it takes no bare "cuda"
        total = torch.cuda.get_device_properties(index).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, (budget + torch.cuda.memory_allocated(index)) / total), index)
        return
    vmdata = _status_bytes("VmData")
    soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
    want = (vmdata or 0) + budget + 2 * 2**30  # 2 GiB slack: compilers, thread arenas, libraries
    if vmdata is not None and (hard == resource.RLIM_INFINITY or want < hard):
        resource.setrlimit(resource.RLIMIT_DATA, (want, hard))


def is_oom(exc) -> bool:
    msg = str(exc).lower()
    return isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError" or any(
        s in msg for s in ("out of memory", "can't allocate memory", "cannot allocate memory",
                           "not enough memory", "std::bad_alloc"))


def _labels(loss, n, c, device, gen):
    import torch

    if c:
        lab = torch.randint(0, c, (n,), generator=gen)
    elif loss in LOSSES and LOSSES[loss].labels == "simclr":
        lab = torch.arange(n) % num_classes(loss, n)  # = cat([arange(N/2)] * 2) for even N
    else:
        lab = (torch.arange(n) % num_classes(loss, n))[torch.randperm(n, generator=gen)]
    return lab.to(device)


def _class_callable(L, M, loss, x, labels, d, c):
    """The loss class's call; its weights (class-weight losses: C classes) are built here, before
    the memory baseline, in the embeddings' dtype."""
    kw = dict(num_classes=c or num_classes(loss, x.shape[0]), embedding_size=d) if c or loss == "proxy_anchor" else {}
    module = getattr(L, LOSSES[loss].cls)(**kw, **dict(LOSSES[loss].loss_kw)).to(x.device, x.dtype)
    miner_cls, miner_kw = LOSSES[loss].miner or (None, ())
    miner = getattr(M, miner_cls)(**dict(miner_kw)) if miner_cls else None

    def backend():
        if L.__name__.startswith("pytorch_metric_learning"):
            return "pml"
        b = getattr(module, "last_backend", None) or "reference"
        mb = getattr(miner, "last_backend", None)
        return f"{b}+miner:{mb}" if mb and mb != b else b

    fn = (lambda: module(x, labels, miner(x, labels))) if miner is not None else (lambda: module(x, labels))
    if loss == "dynamic_soft_margin" and backend() == "pml":
        call = fn

        def fn():  # PML keeps its running histogram's graph: a second backward through it raises
            out = call()
            module.hist_ = module.hist_.detach()
            return out
    return fn, backend, list(module.parameters())


def _compile_callable(torch, loss, x, labels, d, dynamic):
    import dmlkern.reference as R
    from dmlkern.distances import CosineSimilarity

    params, args = [], (x, labels)
    if loss == "masked_lse":
        def fn(x, lab):
            return R.masked_lse(x, x, lab, lab, 1.0, "diff", True).sum()
    elif loss == "multi_similarity_miner":
        dist = CosineSimilarity()

        def fn(x, lab):
            with torch.no_grad():  # as BaseMiner.forward
                idx = R.multi_similarity_miner(dist(x, x), lab, lab, 0.1, True, True)
            return R.multi_similarity_loss(x, lab, idx)
    elif loss in ("triplet_semihard", "triplet_batch_hard"):
        from dmlkern.distances import LpDistance

        dist = LpDistance(p=2)

        def mine(d, lab):
            if loss == "triplet_semihard":
                return R.triplet_margin_miner(d, lab, lab, 0.2, "semihard")
            return R.batch_hard_miner(d, lab, lab)

        def fn(x, lab):
            with torch.no_grad():
                idx = mine(dist(x, x), lab)
            return R.triplet_margin_loss(x, lab, idx)
    elif loss == "contrastive_pair_margin":
        from dmlkern.distances import LpDistance

        dist = LpDistance(p=2)

        def fn(x, lab):
            with torch.no_grad():
                idx = R.pair_margin_miner(dist(x, x), lab, lab, 0.2, 0.8, False)
            return R.contrastive_loss(x, lab, idx)
    elif loss == "proxy_anchor":
        proxies = torch.nn.Parameter(torch.empty(num_classes(loss, x.shape[0]), d, device=x.device))
        torch.nn.init.kaiming_normal_(proxies, mode="fan_out")
        fn, params, args = R.proxy_anchor_loss, [proxies], (x, labels, proxies)
    else:
        fn = functools.partial(getattr(R, REFERENCE_FN[loss]), **dict(LOSSES[loss].loss_kw))
    compiled = torch.compile(fn, dynamic=bool(dynamic))
    return (lambda: compiled(*args)), (lambda: "inductor"), params


def _floor_callable(torch, x, y):
    """T_mm: one x @ y (x.T, or a (D, C) W); above 2 GiB of output in row blocks into one reused buffer
    (same FLOPs)."""
    n, m, item = x.shape[0], y.shape[1], x.element_size()
    if n * m * item <= FLOOR_MAX_OUT_BYTES:
        return (lambda: x @ y), (lambda: "torch"), x, []
    rows = max(1, FLOOR_MAX_OUT_BYTES // (m * item))
    buf = torch.empty(rows, m, dtype=x.dtype, device=x.device)

    def blocked():
        for i in range(0, n, rows):
            torch.matmul(x[i:i + rows], y, out=buf[: min(rows, n - i)])
        return buf

    return blocked, (lambda: f"torch-blocked-{rows}"), x, []


def _floor_operand(torch, x, c):
    """T_mm's right operand: x.T (pair losses), or a (D, C) W (class-weight losses)."""
    return torch.randn(x.shape[1], c, dtype=x.dtype, device=x.device) if c else x.T


def build(spec, torch, device):
    """(fn, backend, x, params) of a point: fn() computes the loss, backend() names what ran. The
    dmlkern providers' backend comes from DMLKERN_BACKEND (run_point sets it)."""
    loss, provider, n, d, c = spec["loss"], spec["provider"], spec["n"], spec["d"], spec.get("c")
    gen = torch.Generator().manual_seed(int(spec.get("seed", 0)))
    x = torch.randn(n, d, generator=gen).to(device=device, dtype=getattr(torch, TORCH_DTYPES[spec["dtype"]]))
    labels = _labels(loss, n, c, device, gen)
    if loss == FLOOR_LOSS:
        return _floor_callable(torch, x, _floor_operand(torch, x, c))
    x.requires_grad_(True)
    if c and provider == "compile":  # torch.compile of the dmlkern module on the reference path
        os.environ["DMLKERN_BACKEND"] = "reference"
        fn, _, params = _class_callable(importlib.import_module("dmlkern.losses"), None, loss, x, labels, d, c)
        fn, backend = torch.compile(fn, dynamic=bool(spec.get("compile_dynamic", True))), lambda: "inductor"
    elif provider in ENV_BACKEND and loss == "masked_lse":
        from dmlkern.ops import masked_lse, resolve_backend

        fn, backend, params = (lambda: masked_lse(x, x_labels=labels, mask="diff").sum(),
                               lambda: resolve_backend("auto", x.device), [])
    elif provider in ENV_BACKEND or provider == "pml":
        pkg = "dmlkern" if provider in ENV_BACKEND else "pytorch_metric_learning"
        L, M = (importlib.import_module(f"{pkg}.{m}") for m in ("losses", "miners"))
        fn, backend, params = _class_callable(L, M, loss, x, labels, d, c)
    elif provider == "compile":
        fn, backend, params = _compile_callable(torch, loss, x, labels, d, spec.get("compile_dynamic", True))
    else:
        raise ValueError(f"unknown provider {provider!r}")
    if provider == "dmlkern-compiled":
        fn, eager_backend = torch.compile(fn), backend
        backend = lambda: f"{eager_backend()}+compile"  # noqa: E731
    return fn, backend, x, params


def train_step(fn, x, params, backward=True):
    """step(): fn(), and with backward its gradients from zero (as a training step)."""
    def step():
        if not backward:
            return fn()
        x.grad = None
        for p in params:
            p.grad = None
        value = fn()
        value.backward()
        return value

    return step


PAIRED_FLOOR_SIDE_S = 0.5  # T_mm's calls on each side of a point's timing: about this long


class PairedFloor:
    """T_mm timed in the point's own process, just before and just after the point's timing, so the
    point's x T_mm does not move with the machine's speed between points (a 2-core cloud CPU's
    drifts up to 2x within minutes). Each side is one warm-up call, then about PAIRED_FLOOR_SIDE_S
    of calls (1 to 25, sized on the first side). Its operands (a class point's W, a row-block
    buffer) exist only during a side, so the point's own timing runs with the memory it had. On CPU
    only (calls are synchronous)."""

    def __init__(self, torch, x, c):
        self.torch, self.x, self.c = torch, x.detach(), c
        self.samples, self.calls = [], None

    def _side(self):
        fn = _floor_callable(self.torch, self.x, _floor_operand(self.torch, self.x, self.c))[0]
        t0 = time.perf_counter()
        fn()  # warm-up: a row-block buffer is page-faulted here, as in the floor point's warm-up
        if self.calls is None:
            self.calls = max(1, min(25, round(PAIRED_FLOOR_SIDE_S / max(time.perf_counter() - t0, 1e-9))))
        for _ in range(self.calls):
            t0 = time.perf_counter()
            fn()
            self.samples.append(time.perf_counter() - t0)

    def before(self):
        self._side()

    def after(self):
        self._side()
        return statistics.median(self.samples)


def run_point(spec) -> dict:
    """Build, warm up, measure memory and time of one point in this process. Never raises."""
    out = {"status": "error"}  # first: the key order of points.jsonl
    try:
        if spec["provider"] in ENV_BACKEND:
            os.environ.pop("DMLKERN_BACKEND", None)
            if ENV_BACKEND[spec["provider"]]:
                os.environ["DMLKERN_BACKEND"] = ENV_BACKEND[spec["provider"]]
        import torch

        if spec.get("threads"):
            torch.set_num_threads(int(spec["threads"]))
        device = torch.device(spec["device"])
        if device.type == "cuda":
            torch.cuda.set_device(device.index or 0)
        limit_memory(torch, device, spec.get("mem_budget_gb"))
        torch.manual_seed(int(spec.get("seed", 0)))
        fn, backend, x, params = build(spec, torch, device)
        if os.environ.get("DMLKERN_BENCH_HANG") == f"{spec['loss']}:{spec['provider']}:{spec['n']}":
            time.sleep(10**6)  # test hook: this point never finishes
        step = train_step(fn, x, params, spec["mode"] == "fwdbwd" and spec["loss"] != FLOOR_LOSS)

        def call():  # one synchronised call, seconds (sizes the timing; not a reported number)
            t0 = time.perf_counter()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter() - t0

        limit, clock = float(spec["time_limit"]), time.perf_counter()
        # t: the last warm-up call's time, which sizes the timing (the first call's, unless it
        # compiled or autotuned: then one more call)
        t = None
        for i in range(int(spec["warmup"])):
            t = call()
            if i == 0:
                out["first_call_s"] = t
                if spec.get("jit_grace"):
                    clock = time.perf_counter()  # compilation / autotuning is not counted
                    t = None
            elif time.perf_counter() - clock + t > 0.5 * limit:
                break
        if t is None:
            t = call()
        # Time first, under the default allocator; then the memory call (return_freed_memory fixes
        # the allocator's threshold for the rest of this process).
        paired = (PairedFloor(torch, x, spec.get("c")) if spec.get("paired_t_mm") and device.type == "cpu"
                  and spec["loss"] != FLOOR_LOSS else None)
        if paired:
            paired.before()
        left = 0.6 * limit - (time.perf_counter() - clock)
        seconds, most = timing_window(int(spec["repeats"]), t, left, limit)
        if device.type == "cpu" and left < 2 * t:  # no room for the timer's two calls: that call's time
            med = p20 = p80 = t
            calls = 1
        else:
            heap = DefaultAllocatorPeak() if device.type == "cpu" else None
            med, p20, p80, calls = time_call(torch, device, step, seconds, most)
            growth = heap.growth() if heap else None
            if growth is not None:
                out["rss_default_mb"] = growth / 2**20
        if paired:
            out["t_mm"] = paired.after()
        for p in [x, *params]:  # a gradient from earlier calls would hide the call's own in the baseline
            p.grad = None
        _, peak, out["mem_method"] = peak_memory(torch, device, call)
        out.update(status="ok", median=med, p20=p20, p80=p80, calls=calls, peak_mem_mb=peak / 2**20,
                   backend=str(backend()))
    except BaseException as exc:  # noqa: BLE001 - everything is recorded, nothing escapes
        out.update(status="oom" if is_oom(exc) else "error", note=f"{type(exc).__name__}: {exc}"[:600],
                   traceback="".join(traceback.format_exception(type(exc), exc, exc.__traceback__))[-4000:])
    return out


def machine_info() -> dict:
    """What the report header needs (in a child: the forkserver never initialises CUDA)."""
    import platform

    import torch

    import dmlkern

    info = {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "nproc": os.cpu_count(), "cpu_model": platform.processor() or platform.machine()}
    for path, key, field in (("/proc/cpuinfo", "cpu_model", "model name"),
                             ("/proc/meminfo", "mem_available_bytes", "MemAvailable:")):
        try:
            with open(path) as f:
                line = next(line for line in f if line.startswith(field))
            info[key] = int(line.split()[1]) * 1024 if key.startswith("mem") else line.split(":", 1)[1].strip()
        except (OSError, StopIteration):
            info.setdefault(key, None)
    try:
        info["build_info"] = dmlkern.build_info()
    except Exception as exc:  # noqa: BLE001
        info["build_info"] = {"error": repr(exc)}
    info["cuda_available"] = torch.cuda.is_available()
    if info["cuda_available"]:
        props = torch.cuda.get_device_properties(0)
        info.update(gpu_name=props.name, gpu_total_bytes=props.total_memory)
    for mod, key in (("pytorch_metric_learning", "pml_version"), ("triton", "triton_version")):
        try:
            info[key] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            info[key] = None
    return info


def child(job, conn, log_path):
    """Process target: own process group (a timeout kills compile workers too), output to the log."""
    os.setpgid(0, 0)
    if log_path:
        fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
    if job != "info" and job.get("kill_after_s"):  # a point killed at its limit leaves its stack in the log
        faulthandler.dump_traceback_later(max(1.0, float(job["kill_after_s"]) - 1.0))
    res = machine_info() if job == "info" else run_point(job)
    faulthandler.cancel_dump_traceback_later()
    if res.get("traceback"):
        os.write(2, f"--- {job['loss']}/{job['provider']} N={job['n']}\n{res['traceback']}\n".encode())
    conn.send(res)
