"""python -m dmlkern.bench: time and memory of dmlkern's fused losses against the materialising
reference, torch.compile of the reference, and pytorch-metric-learning, as the batch grows.

Every point (loss x provider x N x dtype x mode) runs in its own process, forked from a server
that has already imported torch (so each costs ~0.1 s, not ~4 s of imports): an out-of-memory
error, a crash or a timeout is recorded as status oom/error/timeout and the sweep goes on,
skipping the larger N of that provider and loss. Timing: median and 20th/80th percentiles over
the timed calls after warm-up (time.perf_counter on CPU, CUDA events on a GPU). Memory: peak
growth of one call (CPU: peak RSS, reset after warm-up; CUDA: max_memory_allocated). The
matmul floor T_mm (one x @ x.T, N x N x D, same dtype) is measured in the same run; x_mm is a
provider's time over T_mm.

With no arguments: the default CPU sweep (N = 1024 2048 4096 8192, D = 128, fp32, forward +
backward; providers dmlkern, pml, reference, compile), bounded by --budget (540 s).

Outputs in --out: results.csv (long format), points.jsonl (every point with its samples and
notes), summary.md, time_*.png / memory_*.png, meta.json, sweep.log, worker.log.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import time

from . import report
from .runner import RunnerError, make_runner
from .specs import (FLOOR_LOSS, FLOOR_PROVIDER, LOSSES, MATERIALISING, PROVIDER_PRIORITY, PROVIDERS,
                    canonical_dtype, estimate_bytes, fmt_bytes, jit_provider, supported)

DEFAULT_N = {"cpu": [1024, 2048, 4096, 8192], "cuda": [4096, 16384, 65536]}
DEFAULT_PROVIDERS = {"cpu": ["dmlkern", "reference", "compile", "pml"],
                     "cuda": ["dmlkern", "dmlkern-cpp", "dmlkern-triton", "reference", "compile", "pml"]}
DEFAULTS = dict(d=128, dtypes=["fp32"], modes=["fwdbwd"], repeats=5, warmup=1, time_limit=20.0,
                compile_limit=240.0, budget=540.0)
QUICK = dict(n=[256, 1024], repeats=3, warmup=1, time_limit=10.0, budget=180.0)


def setup_slack(device, time_limit):
    """Seconds a point gets on top of its limit for creating inputs (and a CUDA context)."""
    return 30.0 if device == "cuda" else min(15.0, 2.0 + time_limit)


def build_parser():
    ap = argparse.ArgumentParser(
        prog="python -m dmlkern.bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--losses", nargs="+", choices=list(LOSSES), metavar="LOSS",
                    help="losses to run (default: all): " + ", ".join(LOSSES)
                    + ". Labels have N/8 classes (ntxent: SimCLR pairs; proxy_anchor: C = N/8 proxies)")
    ap.add_argument("--providers", nargs="+", choices=list(PROVIDERS), metavar="PROVIDER",
                    help="what computes each loss (default cpu: dmlkern reference compile pml; cuda: also "
                    "dmlkern-cpp dmlkern-triton). "
                    + "; ".join(f"{k}: {v}" for k, v in PROVIDERS.items()))
    ap.add_argument("--n", nargs="+", type=int, metavar="N",
                    help="batch sizes (default cpu: 1024 2048 4096 8192; cuda: 4096 16384 65536)")
    ap.add_argument("--d", type=int, help="embedding width D (default 128)")
    ap.add_argument("--dtypes", nargs="+", metavar="DTYPE", help="fp32 (default), bf16, fp16, fp64")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="default cpu")
    ap.add_argument("--modes", nargs="+", choices=["fwd", "fwdbwd"],
                    help="fwd: forward only (with autograd recording, as in training); fwdbwd: forward + "
                    "backward (default)")
    ap.add_argument("--repeats", type=int,
                    help="timed calls per point after warm-up (default 5; fewer when a call is slow, so a "
                    "point stays within --time-limit)")
    ap.add_argument("--warmup", type=int, help="untimed calls first (default 1; the compile provider compiles here)")
    ap.add_argument("--time-limit", type=float, metavar="SECONDS",
                    help="wall-clock limit per point (default 20): a point that cannot finish warm-up and "
                    "one timed call within it is killed and recorded as 'timeout'; a point whose time, "
                    "extrapolated from the smaller N, would exceed it is skipped")
    ap.add_argument("--compile-limit", type=float, metavar="SECONDS",
                    help="extra time for the first call of torch.compile (and of dmlkern on a GPU: Triton "
                    "autotuning), excluded from the timing (default 240)")
    ap.add_argument("--mem-budget", type=float, metavar="GIB",
                    help="memory a point may use (default: half the available RAM on cpu, 90%% of the GPU's "
                    "memory on cuda). Materialising providers (reference, compile, pml) skip points whose "
                    "estimated footprint exceeds it; every point is also capped at it (RLIMIT_DATA on cpu, "
                    "the allocator's memory fraction on cuda) so a real overrun is an 'oom', not a crash")
    ap.add_argument("--budget", type=float, metavar="SECONDS",
                    help="stop starting points after this many seconds of sweep; the rest are recorded as "
                    "skipped (default 540, so the default sweep ends within 10 minutes; 0 = no limit). "
                    "Points run in this order: the matmul floor, dmlkern at every N, then pml, reference "
                    "and compile N by N")
    ap.add_argument("--out", help="output directory (default benchmarks/results/<machine-tag>)")
    ap.add_argument("--quick", action="store_true",
                    help="a small sweep to check the set-up: N = 256 1024, 3 repeats, 10 s limit, 180 s budget, "
                    "no compile provider unless --providers names it (explicit options still win)")
    ap.add_argument("--isolation", choices=["fork", "spawn"], default="fork",
                    help="fork (default): a server process imports torch once and forks each point; spawn: a "
                    "fresh interpreter per point (slower, for debugging)")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads in each point (default: torch's)")
    ap.add_argument("--compile-dynamic", action=argparse.BooleanOptionalAction, default=True,
                    help="torch.compile(..., dynamic=True) so Inductor's cache is reused across N (default); "
                    "--no-compile-dynamic compiles static shapes (slower to compile)")
    ap.add_argument("--seed", type=int, default=0, help="seed for the inputs (default 0)")
    ap.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar (one line per point instead)")
    ap.add_argument("--append", action="store_true",
                    help="add to the points already in --out (points.jsonl; a re-run point replaces the old "
                    "one) and rewrite the CSV, summary and plots from all of them")
    ap.add_argument("--report-only", action="store_true",
                    help="run nothing: rebuild results.csv, summary.md and the plots from --out's points.jsonl "
                    "and meta.json (e.g. for results fetched from a machine without matplotlib)")
    ap.add_argument("--dry-run", action="store_true", help="print the planned points and exit")
    return ap


def resolve_args(args):
    quick = QUICK if args.quick else {}
    for key, default in DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, quick.get(key, default))
    if args.n is None:
        args.n = quick.get("n", DEFAULT_N[args.device])
    if args.providers is None:
        provs = list(DEFAULT_PROVIDERS[args.device])
        if args.quick:
            provs = [p for p in provs if p != "compile"]
        args.providers = provs
    if args.losses is None:
        args.losses = list(LOSSES)
    args.dtypes = [canonical_dtype(t) for t in args.dtypes]
    args.n = sorted(set(args.n))
    if any(n < 8 for n in args.n):
        raise SystemExit("--n: every N must be >= 8")
    return args


# ------------------------------------------------------------------------------------- metadata

def slug(text, maxlen=48):
    text = re.sub(r"\((r|tm)\)|\bcpu\b|\bprocessor\b|@.*$|\bwith\b.*$", " ", text.lower())
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-")[:maxlen].strip("-") or "unknown"


def machine_tag(info, device):
    if device == "cuda":
        return "cuda-" + slug(info.get("gpu_name") or "gpu")
    return f"cpu-{slug(info.get('cpu_model') or 'cpu')}-{info.get('nproc') or 0}c"


def dmlkern_version():
    import dmlkern  # light: no torch at import time

    version = dmlkern.__version__
    root = os.path.dirname(os.path.dirname(os.path.abspath(dmlkern.__file__)))
    try:
        rev = subprocess.run(["git", "-C", root, "describe", "--always", "--dirty", "--exclude", "*"],
                             capture_output=True, text=True, timeout=10)
        if rev.returncode == 0 and rev.stdout.strip():
            version += "+g" + rev.stdout.strip().replace("-dirty", ".dirty")
    except (OSError, subprocess.SubprocessError):
        pass
    return version


def now_iso():
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


# ------------------------------------------------------------------------------------------ plan

def plan_points(args):
    pts = []
    base = dict(device=args.device, d=args.d, warmup=args.warmup, repeats=args.repeats,
                time_limit=args.time_limit, seed=args.seed, threads=args.threads,
                compile_dynamic=args.compile_dynamic)
    for dtype in args.dtypes:
        for n in args.n:
            pts.append(dict(base, loss=FLOOR_LOSS, provider=FLOOR_PROVIDER, dtype=dtype, n=n, mode="fwd"))
    # Order (what survives when --budget runs out): the floor, then every dmlkern provider at every N,
    # then the others N by N (so each gets its small N before any gets its largest).
    order = {p: i for i, p in enumerate(PROVIDER_PRIORITY)}
    provs = sorted(dict.fromkeys(args.providers), key=lambda p: order.get(p, 99))
    ours = [p for p in provs if p.startswith("dmlkern")]
    others = [p for p in provs if not p.startswith("dmlkern")]

    def point(prov, loss, dtype, mode, n):
        return dict(base, loss=loss, provider=prov, dtype=dtype, n=n, mode=mode)

    for prov in ours:
        for loss in args.losses:
            for dtype in args.dtypes:
                for mode in args.modes:
                    pts += [point(prov, loss, dtype, mode, n) for n in args.n]
    for n in args.n:
        for prov in others:
            for loss in args.losses:
                if supported(loss, prov):
                    pts += [point(prov, loss, dtype, mode, n) for dtype in args.dtypes for mode in args.modes]
    return pts


def _chain(pt):
    return (pt["loss"], pt["provider"], pt["dtype"], pt["mode"])


def predict_call_s(history, n, cubic):
    """Seconds per call at N, extrapolated from the last two (or one) ok points of the chain."""
    if not history:
        return None
    n1, t1 = history[-1]
    p = 3.0 if cubic else 2.0
    if len(history) >= 2:
        n0, t0 = history[-2]
        if t0 > 0 and t1 > 0 and n1 > n0:
            p = min(3.0, max(1.0, math.log(t1 / t0) / math.log(n1 / n0)))
    return t1 * (n / n1) ** p


# ------------------------------------------------------------------------------------------- run

class Progress:
    def __init__(self, total, enabled):
        self.bar = None
        self.total = total
        self.done = 0
        if enabled and sys.stderr.isatty():
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, unit="pt", dynamic_ncols=True, file=sys.stderr, smoothing=0.05)
            except ImportError:
                self.bar = None
        self.t0 = time.monotonic()

    def start(self, text):
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=True)

    def finish(self, line):
        self.done += 1
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)
            self.bar.update(1)
        else:
            el = time.monotonic() - self.t0
            eta = el / self.done * (self.total - self.done)
            print(f"[{self.done}/{self.total} {el:5.0f}s eta {eta:4.0f}s] {line}", file=sys.stderr, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def describe(r):
    head = f"{r['status']:<7} {r['loss']}/{r['provider']}"
    if r.get("backend"):
        head += f"[{r['backend']}]"
    head += f" N={r['n']} {r['dtype']} {r['mode']}"
    if r["status"] == "ok":
        return (f"{head}: {report.fmt_time(r['median'])} (p20 {report.fmt_time(r['p20'])}, "
                f"p80 {report.fmt_time(r['p80'])}, {len(r.get('samples') or [])} calls), "
                f"{report.fmt_mb(r['peak_mem_mb'])}")
    return f"{head}: {(r.get('note') or '').splitlines()[0][:160] if r.get('note') else ''}"


def run_sweep(args, runner, plan, mem_budget_gb, log, progress):
    results = []
    history, failed = {}, {}
    t_start = time.monotonic()
    jsonl = open(os.path.join(args.out, "points.jsonl"), "a" if args.append else "w")
    try:
        for pt in plan:
            key = _chain(pt)
            progress.start(f"{pt['loss']}/{pt['provider']} N={pt['n']} {pt['dtype']} {pt['mode']}")
            elapsed = time.monotonic() - t_start
            remaining = args.budget - elapsed if args.budget else None
            skip = None
            if remaining is not None and remaining <= 0:
                skip = "sweep budget exhausted"
            elif key in failed:
                st, n0 = failed[key]
                skip = f"not run: {st} at N={n0}"
            elif pt["provider"] in MATERIALISING and pt["loss"] in LOSSES:
                est = estimate_bytes(pt["loss"], pt["n"], pt["dtype"])
                if est > mem_budget_gb * 2**30:
                    skip = f"est. {fmt_bytes(est)} > mem budget {mem_budget_gb:.3g} GiB"
            jit = jit_provider(pt["provider"], pt["device"]) and pt["loss"] != FLOOR_LOSS
            if skip is None and key in history:
                cubic = pt["loss"] in LOSSES and LOSSES[pt["loss"]].pair_coef > 0 and pt["provider"] in MATERIALISING
                pred = predict_call_s(history[key], pt["n"], cubic)
                calls = 1 + (max(0, args.warmup - 1) if jit else args.warmup)
                if pred is not None and pred * calls > 0.9 * args.time_limit:
                    skip = f"predicted {pred:.3g} s/call x {calls} calls > time limit {args.time_limit:g} s"
            res = dict(pt, timestamp=now_iso(), backend="", median=None, p20=None, p80=None, peak_mem_mb=None)
            if skip is not None:
                res.update(status="skipped", note=skip)
            else:
                spec = dict(pt, jit_grace=jit, mem_budget_gb=mem_budget_gb)
                hard = args.time_limit + (args.compile_limit if jit else 0.0) + setup_slack(pt["device"], args.time_limit)
                capped = remaining is not None and remaining < hard
                out = runner.run(spec, min(hard, remaining) if capped else hard)
                res.update({k: v for k, v in out.items() if k != "traceback"})
                if capped and out.get("status") == "timeout":
                    res.update(status="skipped", note="sweep budget exhausted (point stopped)")
                if out.get("traceback"):
                    log.write(f"--- {describe(res)}\n{out['traceback']}\n")
                res.setdefault("note", "")
                samples = out.get("samples") or []
                if res["status"] == "ok" and samples:
                    res["median"] = report.percentile(samples, 50)
                    res["p20"] = report.percentile(samples, 20)
                    res["p80"] = report.percentile(samples, 80)
                    pm = out.get("peak_mem_bytes")
                    res["peak_mem_mb"] = pm / 2**20 if pm is not None else None
                elif res["status"] == "ok":
                    res.update(status="error", note="no timed samples")
            if res["status"] == "ok":
                history.setdefault(key, []).append((pt["n"], res["median"]))
            elif "budget exhausted" not in (res.get("note") or ""):
                failed.setdefault(key, (res["status"] if res["status"] != "skipped" else "skipped", pt["n"]))
            results.append(res)
            jsonl.write(json.dumps(res) + "\n")
            jsonl.flush()
            line = describe(res)
            log.write(line + "\n")
            log.flush()
            progress.finish(line)
    finally:
        jsonl.close()
    return results


def main(argv=None):
    args = resolve_args(build_parser().parse_args(argv))
    signal.signal(signal.SIGTERM, _sigterm)  # `timeout` sends SIGTERM: still write what was measured
    if args.report_only:
        return report_only(args)
    import tempfile

    wlog = tempfile.NamedTemporaryFile(prefix="dmlkern-bench-worker-", suffix=".log", delete=False)
    wlog.close()
    runner = make_runner(args.isolation, wlog.name)
    started = now_iso()
    try:
        try:
            info = runner.info()
        except RunnerError as exc:
            print(f"error: {exc}", file=sys.stderr)
            with open(wlog.name) as f:
                sys.stderr.write(f.read()[-4000:])
            return 2
        if args.device == "cuda" and not info.get("cuda_available"):
            print("error: --device cuda but torch sees no CUDA device", file=sys.stderr)
            return 2
        if args.mem_budget is None:
            if args.device == "cuda":
                args.mem_budget = 0.9 * info.get("gpu_total_bytes", 0) / 2**30
            else:
                avail = info.get("mem_available_bytes") or 8 * 2**30
                args.mem_budget = 0.5 * avail / 2**30
        tag = machine_tag(info, args.device)
        if args.out is None:
            args.out = os.path.join("benchmarks", "results", tag)
        plan = plan_points(args)
        if args.dry_run:
            for pt in plan:
                print(f"{pt['loss']:<24} {pt['provider']:<15} N={pt['n']:<7} {pt['dtype']} {pt['mode']}")
            print(f"{len(plan)} points; out={args.out}; mem budget {args.mem_budget:.3g} GiB; machine {tag}")
            return 0
        os.makedirs(args.out, exist_ok=True)
        previous = _read_jsonl(os.path.join(args.out, "points.jsonl")) if args.append else []
        version = dmlkern_version()
        meta = dict(machine=tag, version=version, started=started, info=info, mem_budget_gb=args.mem_budget,
                    args={k: v for k, v in vars(args).items()},
                    command="python -m dmlkern.bench " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])))
        if previous:
            try:
                with open(os.path.join(args.out, "meta.json")) as f:
                    old_meta = json.load(f)
                meta["previous_runs"] = old_meta.get("previous_runs", []) + [
                    {k: old_meta.get(k) for k in ("command", "started", "finished", "version")}]
            except (OSError, ValueError):
                pass
        meta["loadavg_start"] = _loadavg()
        if meta["loadavg_start"] and meta["loadavg_start"][0] > 0.5 * (info.get("nproc") or 1):
            print(f"warning: load average {meta['loadavg_start'][0]:.2f} on {info.get('nproc')} CPUs: other "
                  "processes are running; CPU times will be noisy (multi-threaded small ops suffer most)",
                  file=sys.stderr)
        with open(os.path.join(args.out, "meta.json"), "w") as f:  # rewritten at the end
            json.dump(meta, f, indent=1, default=str)
        print(f"dmlkern.bench: {len(plan)} points on {tag} (dmlkern {version}); "
              f"time limit {args.time_limit:g} s/point, memory budget {args.mem_budget:.3g} GiB, "
              f"sweep budget {args.budget:g} s; writing {args.out}", file=sys.stderr)
        progress = Progress(len(plan), not args.no_progress)
        results = []
        with open(os.path.join(args.out, "sweep.log"), "a" if args.append else "w") as log:
            try:
                results = previous + run_sweep(args, runner, plan, args.mem_budget, log, progress)
            except KeyboardInterrupt:
                print("\ninterrupted: writing what was measured", file=sys.stderr)
                results = _read_jsonl(os.path.join(args.out, "points.jsonl"))
            finally:
                progress.close()
        results = _dedupe(results)
    finally:
        runner.close()
        if args.out and os.path.isdir(args.out):
            with open(wlog.name) as src, open(os.path.join(args.out, "worker.log"), "a" if args.append else "w") as dst:
                dst.write(src.read())
        os.unlink(wlog.name)
    meta["finished"] = now_iso()
    meta["loadavg_end"] = _loadavg()
    write_outputs(results, meta, args)
    return 0


def _loadavg():
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def _sigterm(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # `timeout` signals the whole group again
    raise KeyboardInterrupt


def report_only(args):
    if not args.out:
        raise SystemExit("--report-only needs --out DIR (with points.jsonl and meta.json)")
    results = _dedupe(_read_jsonl(os.path.join(args.out, "points.jsonl")))
    if not results:
        raise SystemExit(f"no points in {os.path.join(args.out, 'points.jsonl')}")
    try:
        with open(os.path.join(args.out, "meta.json")) as f:
            meta = json.load(f)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"cannot read {os.path.join(args.out, 'meta.json')}: {exc}")
    saved = argparse.Namespace(**meta["args"])
    saved.out, saved.no_plots = args.out, args.no_plots
    write_outputs(results, meta, saved)
    return 0


def _dedupe(results):
    """One result per point (the last one wins), in first-seen order."""
    keyed = {}
    for r in results:
        keyed[(r["loss"], r["provider"], r["device"], r["dtype"], r["n"], r["d"], r["mode"])] = r
    return list(keyed.values())


def _read_jsonl(path):
    out = []
    try:
        with open(path) as f:
            for line in f:
                if line.strip():
                    out.append(json.loads(line))
    except OSError:
        pass
    return out


def write_outputs(results, meta, args):
    report.attach_x_mm(results)
    out = args.out
    report.write_csv(os.path.join(out, "results.csv"), report.csv_rows(results, meta["machine"], meta["version"]))
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(report.summary_md(results, meta))
    with open(os.path.join(out, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1, default=str)
    files = []
    if not args.no_plots:
        try:
            files = report.plot(results, out, meta)
        except Exception as exc:  # noqa: BLE001 - a plotting problem must not lose the numbers
            print(f"warning: plotting failed: {exc!r}", file=sys.stderr)
    print(report.terminal_table(results))
    print(f"wrote {os.path.join(out, 'results.csv')}, summary.md, points.jsonl"
          + (", " + ", ".join(os.path.basename(f) for f in files) if files else ""))
