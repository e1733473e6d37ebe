"""python -m dmlkern.bench: time and peak memory of dmlkern's fused losses against the materialising
reference, torch.compile of it and pytorch-metric-learning, as N grows (details: benchmarks/README.md).

Each point (loss x provider x N x dtype x mode) runs in a forkserver child preloaded with torch, under
a time limit and a memory cap; an oom, timeout or error is recorded and the larger N of that provider
and loss are skipped. Timing: triton.testing.do_bench on CUDA, torch.utils.benchmark on CPU (median,
20th/80th percentiles); x_mm = time over T_mm, one x @ x.T of the same size and dtype. The class-weight
losses (ArcFace ... SoftTriple) are swept over the class count C at a fixed N, with T_mm one x @ W.
Writes to --out: results.csv, points.jsonl, summary.md, meta.json, time_*/memory_*.png, sweep.log,
worker.log (the points' output; a point killed at its time limit leaves its Python stack there). No
arguments: the default CPU sweep (N = 1024..8192, fp32, fwdbwd), within 540 s, then the class-weight
losses at N = 1024, C = 16384..1048576, within 900 s (--class-budget).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import multiprocessing
import os
import re
import shlex
import signal
import subprocess
import sys
import time

from . import report
from .specs import (FLOOR_LOSS, FLOOR_PROVIDER, LOSSES, MATERIALISING, PROVIDER_PRIORITY, PROVIDERS,
                    canonical_dtype, estimate_bytes, fmt_bytes, jit_provider, point_label, size, supported)
from .worker import PRELOAD, child  # torch-free at import

DEFAULT_N = {"cpu": [1024, 2048, 4096, 8192], "cuda": [4096, 16384, 65536]}
DEFAULT_PROVIDERS = {"cpu": ["dmlkern", "reference", "compile", "pml"],
                     "cuda": ["dmlkern", "dmlkern-cpp", "dmlkern-triton", "reference", "compile", "pml"]}
# the class-weight losses: C values, N, --max-columns, --class-time-limit
DEFAULT_C = {"cpu": ([16384, 131072, 1048576], 1024, 2**22, 120.0),
             "cuda": ([131072, 1048576, 10**7], 8192, 2**25, 60.0)}
QUICK = dict(n=[256, 1024], classes=[1024, 8192], class_n=256, repeats=3, time_limit=10.0, class_time_limit=10.0,
             budget=180.0, class_budget=180.0)  # --quick's defaults
# the C sweep's budget when --budget is not given: dmlkern's ten class losses at C = 2^20 take ~60 s
# each on 2 cores, after every loss at the smaller C with PML and the reference at the smallest
DEFAULT_BUDGET, DEFAULT_CLASS_BUDGET = 540.0, 900.0
POINT_KEY = ("loss", "provider", "device", "dtype", "n", "c", "d", "mode")


def build_parser():
    ap = argparse.ArgumentParser(prog="python -m dmlkern.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add = ap.add_argument
    add("--losses", nargs="+", choices=list(LOSSES), metavar="LOSS", help="default: " + ", ".join(
        k for k, v in LOSSES.items() if v.default) + "; also: " + ", ".join(k for k, v in LOSSES.items() if not v.default))
    add("--providers", nargs="+", choices=list(PROVIDERS), metavar="PROVIDER", help="default cpu: dmlkern reference "
        "compile pml; cuda: also dmlkern-cpp dmlkern-triton. " + "; ".join(f"{k}: {v}" for k, v in PROVIDERS.items()))
    add("--n", nargs="+", type=int, metavar="N", help="batch sizes (default cpu: 1024 2048 4096 8192; cuda: 4096 "
        "16384 65536)")
    add("--classes", nargs="+", type=int, metavar="C", help="class counts of the class-weight losses (default cpu: "
        "16384 131072 1048576; cuda: 131072 1048576 10000000)")
    add("--class-n", type=int, metavar="N", help="their batch size (default cpu: 1024; cuda: 8192)")
    add("--max-columns", type=int, metavar="K", help="skip class points whose W has more than K columns (C x "
        "centers per class; default cpu: 2^22, so SoftTriple stops at C=131072; cuda: 2^25)")
    add("--class-time-limit", type=float, metavar="SECONDS", help="--time-limit of the class points (default cpu: "
        "120: a C=1048576 call takes ~13 s on an AMD EPYC (2 cores), and a point makes three; cuda: 60)")
    add("--d", type=int, default=128, help="embedding width D (default %(default)s)")
    add("--dtypes", nargs="+", default=["fp32"], metavar="DTYPE", help="fp32 (default), bf16, fp16, fp64")
    add("--device", choices=["cpu", "cuda"], default="cpu", help="default %(default)s")
    add("--modes", nargs="+", choices=["fwd", "fwdbwd"], default=["fwdbwd"], help="fwd: forward only; fwdbwd: "
        "forward + backward (default)")
    add("--repeats", type=int, default=5, help="time about this many calls' worth per point (default %(default)s; "
        "at most max(10 s, two calls))")
    add("--warmup", type=int, default=1, help="untimed calls first (default %(default)s; compilers compile here)")
    add("--time-limit", type=float, default=20.0, metavar="SECONDS", help="per point, else 'timeout' (default "
        "%(default)g); points extrapolated past it are skipped")
    add("--compile-limit", type=float, default=240.0, metavar="SECONDS", help="extra time for a first call that "
        "compiles (default %(default)g)")
    add("--mem-budget", type=float, metavar="GIB", help="memory cap per point (default: half the free RAM; cuda: "
        "90%% of the GPU); materialising providers skip points estimated above it")
    add("--budget", type=float, metavar="SECONDS", help="skip the points left after this long, "
        f"for the N sweep (default {DEFAULT_BUDGET:g}; 0: no limit) and again for the C sweep (default: the same "
        f"when given, else {DEFAULT_CLASS_BUDGET:g}; or --class-budget); order: the matmul floor, "
        "dmlkern at every N but the largest, PML and the reference at the smallest N, dmlkern at the largest, "
        "the rest N by N")
    add("--class-budget", type=float, metavar="SECONDS", help="--budget of the C sweep alone")
    add("--out", help="output directory (default benchmarks/results/<machine-tag>)")
    add("--quick", action="store_true", help="set-up check: N = 256 1024, C = 1024 8192 at "
        "N = 256, 3 repeats, 10 s limit, 180 s budgets, no compile provider unless named (explicit options win)")
    add("--threads", type=int, default=0, help="torch.set_num_threads in each point (default: torch's)")
    add("--paired-t-mm", action=argparse.BooleanOptionalAction, help="time T_mm again in each point's process, "
        "just before and after its timing, and divide by that (default: on for cpu, where the machine's speed "
        "drifts between points; the T_mm row still shows the floor points)")
    add("--compile-dynamic", action=argparse.BooleanOptionalAction, default=True,
        help="torch.compile(dynamic=True): one compilation for every N (default)")
    add("--seed", type=int, default=0, help="seed for the inputs (default %(default)s)")
    add("--no-plots", action="store_true", help="skip the PNG plots")
    add("--no-progress", action="store_true", help="one line per point instead of a progress bar")
    add("--append", action="store_true", help="add to --out's points (a re-run point replaces the old one)")
    add("--report-only", action="store_true", help="run nothing: rewrite the reports from --out's points.jsonl")
    add("--dry-run", action="store_true", help="print the planned points and exit")
    return ap


def parse_args(argv=None):
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.quick:  # other defaults; explicit options still win
        ap.set_defaults(**QUICK)
        args = ap.parse_args(argv)
    args.n = sorted(set(args.n or DEFAULT_N[args.device]))
    classes, class_n, max_columns, class_limit = DEFAULT_C[args.device]
    args.classes = sorted(set(args.classes or classes))
    args.class_n, args.max_columns = args.class_n or class_n, args.max_columns or max_columns
    args.class_time_limit = args.class_time_limit or class_limit
    if args.class_budget is None:
        args.class_budget = DEFAULT_CLASS_BUDGET if args.budget is None else args.budget
    if args.budget is None:
        args.budget = DEFAULT_BUDGET
    if args.paired_t_mm is None:
        args.paired_t_mm = args.device == "cpu"
    if args.providers is None:
        args.providers = [p for p in DEFAULT_PROVIDERS[args.device] if not (args.quick and p == "compile")]
    args.losses = args.losses or [k for k, v in LOSSES.items() if v.default]
    args.dtypes = [canonical_dtype(t) for t in args.dtypes]
    if any(n < 8 for n in args.n + [args.class_n]) or min(args.classes) < 1:
        raise SystemExit("--n, --class-n: every N must be >= 8; --classes: C >= 1")
    return args


def slug(text, maxlen=48):
    text = re.sub(r"\((r|tm)\)|\bcpu\b|\bprocessor\b|@.*$|\bwith\b.*$", " ", text.lower())
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-")[:maxlen].strip("-") or "unknown"


def machine_tag(info, device):
    if device == "cuda":
        return "cuda-" + slug(info.get("gpu_name") or "gpu")
    return f"cpu-{slug(info.get('cpu_model') or 'cpu')}-{info.get('nproc') or 0}c"


def dmlkern_version():
    import dmlkern  # no torch at import time

    root = os.path.dirname(os.path.dirname(os.path.abspath(dmlkern.__file__)))
    try:
        rev = subprocess.run(["git", "-C", root, "describe", "--always", "--dirty", "--exclude", "*"],
                             capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        rev = ""
    return dmlkern.__version__ + ("+g" + rev.replace("-dirty", ".dirty") if rev else "")


def now_iso():
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


# The materialising providers that the "vs PML" comparison needs at the smallest size before
# dmlkern's largest (compile is left to the size-by-size tail: its first calls compile for minutes).
EARLY_PROVIDERS = ("pml", "reference")


def plan_points(args):
    """The pair losses over N, then the class-weight losses over C at N = --class-n; in each part the
    floor, every dmlkern provider at every size but the largest, PML and the reference at the
    smallest size, dmlkern at the largest, then the others size by size: so when --budget runs out,
    every loss still has dmlkern's sizes and a PML comparison, and the later providers lose their
    largest sizes first."""
    base = dict(device=args.device, d=args.d, warmup=args.warmup, repeats=args.repeats, seed=args.seed,
                threads=args.threads, compile_dynamic=args.compile_dynamic, paired_t_mm=args.paired_t_mm)
    pts = []
    for classes in (False, True):
        losses = [loss for loss in args.losses if LOSSES[loss].classes == classes]
        sizes = [dict(n=args.class_n, c=c) for c in args.classes] if classes else [dict(n=n) for n in args.n]
        if losses:
            pts += _plan_part(args, dict(base, time_limit=args.class_time_limit if classes else args.time_limit),
                              losses, sizes)
    return pts


def _plan_part(args, base, losses, sizes):
    pts = [dict(base, loss=FLOOR_LOSS, provider=FLOOR_PROVIDER, dtype=t, mode="fwd", **s)
           for t in args.dtypes for s in sizes]
    provs = sorted(dict.fromkeys(args.providers), key=report.provider_rank)
    combos = [(t, m) for t in args.dtypes for m in args.modes]
    ours = [p for p in provs if p.startswith("dmlkern")]

    def points(providers, size_list):
        return [dict(base, loss=loss, provider=prov, dtype=t, mode=m, **s) for prov in providers
                for loss in losses if prov in ours or supported(loss, prov) for t, m in combos for s in size_list]

    early = [p for p in provs if p in EARLY_PROVIDERS]
    pts += points(ours, sizes[:-1]) + points(early, sizes[:1]) + points(ours, sizes[-1:])
    for i, s in enumerate(sizes):
        pts += points([p for p in provs if p not in ours and (i > 0 or p not in early)], [s])
    return pts


def predict_call_s(history, n, p):
    """Seconds per call at size n, extrapolated from the last two ok (size, seconds) of the chain, or
    from the last one with the power p."""
    if not history:
        return None
    n1, t1 = history[-1]
    if len(history) >= 2:
        n0, t0 = history[-2]
        if t0 > 0 and t1 > 0 and n1 > n0:
            p = min(3.0, max(1.0, math.log(t1 / t0) / math.log(n1 / n0)))
    return t1 * (n / n1) ** p


def forkserver():
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")  # is_available() without cuInit
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def run_child(ctx, job, limit, log_path=None):
    """worker.child(job) in a fresh forkserver child, killed with its process group at the limit."""
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=child, args=(job, send, log_path), daemon=True)
    proc.start()
    send.close()
    try:
        res = recv.recv() if recv.poll(limit) else {"status": "timeout", "note": f"killed after {limit:.0f} s"}
    except EOFError:
        res = None
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # compile workers too
        except OSError:
            proc.kill()
        proc.join()
    if res is None and proc.exitcode == -signal.SIGKILL:
        return {"status": "oom", "note": "killed by SIGKILL (most likely the out-of-memory killer)"}
    return res or {"status": "error", "note": f"the point's process ended with exit code {proc.exitcode}, no result"}


def describe(r):
    head = f"{r['status']:<7} {r['loss']}/{r['provider']}" + (f"[{r['backend']}]" if r.get("backend") else "")
    head += f" {point_label(r)} {r['dtype']} {r['mode']}"
    if r["status"] == "ok":
        return (f"{head}: {report.fmt_time(r['median'])} (p20 {report.fmt_time(r['p20'])}, p80 "
                f"{report.fmt_time(r['p80'])}), {report.fmt_mb(r['peak_mem_mb'])}")
    return f"{head}: {(r.get('note') or ' ').splitlines()[0][:160]}"


def skip_reason(args, pt, history, failed, remaining):
    key = (pt["loss"], pt["provider"], pt["dtype"], pt["mode"])
    if key in failed:
        return f"not run: {failed[key][0]} at {failed[key][1]}"
    info = LOSSES.get(pt["loss"])
    if info and pt.get("c") and pt["c"] * info.per_class > args.max_columns:
        return f"W has {pt['c'] * info.per_class} columns > --max-columns {args.max_columns}"
    est = estimate_bytes(pt["loss"], pt["n"], pt["dtype"], pt.get("c"), pt["d"]) \
        if pt["provider"] in MATERIALISING else 0
    if est > args.mem_budget * 2**30:
        return f"est. {fmt_bytes(est)} > mem budget {args.mem_budget:.3g} GiB"
    if remaining is not None and remaining <= 0:
        return "sweep budget exhausted"
    cubic = info and info.pair_coef > 0 and pt["provider"] in MATERIALISING
    pred = predict_call_s(history.get(key), size(pt), 3.0 if cubic else 1.0 if pt.get("c") else 2.0)
    calls = args.warmup + (2 if args.device == "cpu" else 8) - int(jit_provider(pt["provider"], pt["device"]))
    if pred is not None and pred * calls > 0.9 * pt["time_limit"]:
        return f"predicted {pred:.3g} s/call x {calls} calls > time limit {pt['time_limit']:g} s"
    return None


def run_sweep(args, ctx, plan, log, jsonl, progress, log_path):
    history, failed, t_start = {}, {}, time.monotonic()
    part_start = {}  # the N sweep gets --budget, the C sweep --class-budget
    for i, pt in enumerate(plan):
        key = (pt["loss"], pt["provider"], pt["dtype"], pt["mode"])
        started = part_start.setdefault("c" in pt, time.monotonic())
        budget = args.class_budget if "c" in pt else args.budget
        remaining = budget - (time.monotonic() - started) if budget else None
        res = dict(pt, timestamp=now_iso(), backend="", median=None, p20=None, p80=None, peak_mem_mb=None, note="")
        skip = skip_reason(args, pt, history, failed, remaining)
        if progress is not None:
            progress.set_postfix_str(f"{pt['loss']}/{pt['provider']} N={pt['n']} {pt['dtype']}", refresh=True)
        if skip is not None:
            res.update(status="skipped", note=skip)
        else:
            jit = jit_provider(pt["provider"], pt["device"]) and pt["loss"] != FLOOR_LOSS
            hard = pt["time_limit"] + (args.compile_limit if jit else 0) + (30 if args.device == "cuda" else 5)
            limit = min(hard, remaining) if remaining is not None else hard
            out = run_child(ctx, dict(pt, jit_grace=jit, mem_budget_gb=args.mem_budget, kill_after_s=limit),
                            limit, log_path)
            res.update({k: v for k, v in out.items() if k != "traceback"})
            if remaining is not None and remaining < hard and res["status"] == "timeout":
                res.update(status="skipped", note="sweep budget exhausted (point stopped)")
        if res["status"] == "ok":
            history.setdefault(key, []).append((size(pt), res["median"]))
        elif "budget exhausted" not in res["note"]:
            failed.setdefault(key, (res["status"], point_label(pt)))
        jsonl.write(json.dumps(res) + "\n")
        jsonl.flush()
        line = describe(res)
        log.write(line + "\n")
        log.flush()
        if progress is not None:
            progress.write(line, file=sys.stderr)
            progress.update(1)
        else:
            el = time.monotonic() - t_start
            print(f"[{i + 1}/{len(plan)} {el:5.0f}s eta {el / (i + 1) * (len(plan) - i - 1):4.0f}s] {line}",
                  file=sys.stderr, flush=True)


def _sigterm(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # `timeout` signals the whole group again
    raise KeyboardInterrupt


def _loadavg():
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def _read_jsonl(path):
    """One result per point (the last one wins), in first-seen order."""
    keyed = {}
    if os.path.exists(path):
        with open(path) as f:
            for r in (json.loads(line) for line in f if line.strip()):
                keyed[tuple(r.get(k) for k in POINT_KEY)] = r
    return list(keyed.values())


def _read_json(path):
    with open(path) as f:
        return json.load(f)


def main(argv=None):
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _sigterm)  # `timeout` sends SIGTERM: still write what was measured
    if args.report_only:
        if not args.out:
            raise SystemExit("--report-only needs --out DIR (with points.jsonl and meta.json)")
        results = _read_jsonl(os.path.join(args.out, "points.jsonl"))
        if not results:
            raise SystemExit(f"no points in {os.path.join(args.out, 'points.jsonl')}")
        return write_outputs(results, _read_json(os.path.join(args.out, "meta.json")), args.out, args.no_plots)
    ctx, started = forkserver(), now_iso()
    info = run_child(ctx, "info", 600)
    if "torch" not in info:
        print(f"error: machine info failed: {info.get('note')}", file=sys.stderr)
        return 2
    if args.device == "cuda" and not info.get("cuda_available"):
        print("error: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    if args.mem_budget is None:
        args.mem_budget = (0.9 * info.get("gpu_total_bytes", 0) if args.device == "cuda"
                           else 0.5 * (info.get("mem_available_bytes") or 8 * 2**30)) / 2**30
    tag = machine_tag(info, args.device)
    args.out = args.out or os.path.join("benchmarks", "results", tag)
    plan = plan_points(args)
    if args.dry_run:
        for pt in plan:
            print(f"{pt['loss']:<24} {pt['provider']:<15} N={pt['n']:<7} C={pt.get('c') or '-':<8} {pt['dtype']} "
                  f"{pt['mode']}")
        print(f"{len(plan)} points; out={args.out}; mem budget {args.mem_budget:.3g} GiB; machine {tag}")
        return 0
    os.makedirs(args.out, exist_ok=True)
    path = lambda name: os.path.join(args.out, name)  # noqa: E731
    meta = dict(machine=tag, version=dmlkern_version(), started=started, info=info, mem_budget_gb=args.mem_budget,
                args=vars(args), loadavg_start=_loadavg(),
                command="python -m dmlkern.bench " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])))
    if args.append and _read_jsonl(path("points.jsonl")) and os.path.exists(path("meta.json")):
        old = _read_json(path("meta.json"))
        meta["previous_runs"] = old.get("previous_runs", []) + [
            {k: old.get(k) for k in ("command", "started", "finished", "version")}]
    if meta["loadavg_start"] and meta["loadavg_start"][0] > 0.5 * (info.get("nproc") or 1):
        print(f"warning: load average {meta['loadavg_start'][0]:.2f} on {info.get('nproc')} CPUs: other processes "
              "are running; CPU times will be noisy (multi-threaded small ops suffer most)", file=sys.stderr)
    print(f"dmlkern.bench: {len(plan)} points on {tag} (dmlkern {meta['version']}); time limit {args.time_limit:g} "
          f"s/point (class losses {args.class_time_limit:g} s), memory budget {args.mem_budget:.3g} GiB, sweep budget "
          f"{args.budget:g} s (N) / {args.class_budget:g} s (C); writing {args.out}",
          file=sys.stderr)
    progress = None
    if not args.no_progress and sys.stderr.isatty():
        try:
            from tqdm import tqdm

            progress = tqdm(total=len(plan), unit="pt", dynamic_ncols=True, file=sys.stderr)
        except ImportError:
            pass
    mode = "a" if args.append else "w"
    with open(path("meta.json"), "w") as f:  # rewritten at the end
        json.dump(meta, f, indent=1, default=str)
    open(path("worker.log"), mode).close()
    with open(path("sweep.log"), mode) as log, open(path("points.jsonl"), mode) as jsonl:
        try:
            run_sweep(args, ctx, plan, log, jsonl, progress, path("worker.log"))
        except KeyboardInterrupt:
            print("\ninterrupted: writing what was measured", file=sys.stderr)
        finally:
            if progress is not None:
                progress.close()
    meta.update(finished=now_iso(), loadavg_end=_loadavg())
    return write_outputs(_read_jsonl(path("points.jsonl")), meta, args.out, args.no_plots)


def write_outputs(results, meta, out, no_plots):
    report.attach_x_mm(results)
    report.write_csv(os.path.join(out, "results.csv"), results, meta["machine"], meta["version"])
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(report.summary_md(results, meta))
    with open(os.path.join(out, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1, default=str)
    files = []
    if not no_plots:
        try:
            files = report.plot(results, out, meta)
        except Exception as exc:  # noqa: BLE001 - a plotting problem must not lose the numbers
            print(f"warning: plotting failed: {exc!r}", file=sys.stderr)
    print(report.terminal_table(results))
    print(f"wrote {os.path.join(out, 'results.csv')}, summary.md, points.jsonl"
          + "".join(", " + os.path.basename(f) for f in files))
    return 0
