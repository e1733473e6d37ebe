"""Point results -> results.csv (long format), the terminal table, summary.md and the plots."""
from __future__ import annotations

import csv
import math
import os

from .specs import FLOOR_LOSS, ITEMSIZE, LOSSES, PROVIDER_PRIORITY, point_label, size, weight_bytes

CSV_COLUMNS = ["loss", "provider", "backend", "device", "dtype", "n", "c", "d", "mode", "metric", "median", "p20",
               "p80", "status", "machine", "version", "timestamp"]
# t_mm_s: the T_mm that the point's x_mm divides by; rss_default_mb: peak RSS growth over the timed calls
# under glibc's default allocator (CPU), which shows heap fragmentation that peak_mem_mb cannot
METRICS = ["time_s", "peak_mem_mb", "x_mm", "t_mm_s", "rss_default_mb"]
STATUSES = ["ok", "oom", "timeout", "error", "skipped"]
COLORS = {"dmlkern": "C0", "dmlkern-triton": "C9", "dmlkern-cpp": "C4", "pml": "C3", "reference": "C1",
          "compile": "C2"}


def provider_rank(provider):
    return PROVIDER_PRIORITY.index(provider) if provider in PROVIDER_PRIORITY else 99


def _fkey(r):
    return r["device"], r["dtype"], r["n"], r.get("c")


def _floor_key(group, n):
    """The T_mm key of size n (N, or C for a class-weight group) in a groups() key's section."""
    device, dtype, _, cn = group
    return (device, dtype, cn, n) if cn else (device, dtype, n, None)


def floor_times(results):
    """(device, dtype, n, c) -> T_mm median seconds."""
    return {_fkey(r): r["median"] for r in results if r["loss"] == FLOOR_LOSS and r["status"] == "ok"}


def attach_x_mm(results):
    """x_mm (and its percentiles): time over the point's own T_mm (paired: timed in its process), else
    over the floor point's of the same size and dtype."""
    floors = floor_times(results)
    for r in results:
        t_mm = (r.get("t_mm") or floors.get(_fkey(r))) if r["status"] == "ok" else None
        r["t_mm_s"] = t_mm
        for q in ("", "_p20", "_p80"):
            r["x_mm" + q] = r[q[1:] or "median"] / t_mm if t_mm else None


def _num(v):
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.6g}"


def write_csv(path, results, machine, version):
    """One row per point and metric; values only where the point is ok."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        w.writeheader()
        for r in results:
            base = {k: r[k] for k in ("loss", "provider", "device", "dtype", "n", "d", "mode", "status", "timestamp")}
            base.update(backend=r.get("backend") or "", c=r.get("c") or "", machine=machine, version=version)
            ok = r["status"] == "ok"
            values = {"time_s": (r.get("median"), r.get("p20"), r.get("p80")) if ok else (None,) * 3,
                      "peak_mem_mb": (r.get("peak_mem_mb") if ok else None, None, None),
                      "x_mm": (r.get("x_mm"), r.get("x_mm_p20"), r.get("x_mm_p80")),
                      "t_mm_s": (r.get("t_mm_s"), None, None),
                      "rss_default_mb": (r.get("rss_default_mb") if ok else None, None, None)}
            w.writerows(dict(base, metric=m, **dict(zip(("median", "p20", "p80"), map(_num, values[m]))))
                        for m in METRICS)


def fmt_time(s):
    if s is None:
        return "-"
    return f"{s:.3g} s" if s >= 1 else f"{s * 1e3:.3g} ms" if s >= 1e-3 else f"{s * 1e6:.3g} us"


def fmt_mb(mb):
    if mb is None:
        return "-"
    return f"{mb / 1024:.3g} GiB" if mb >= 1024 else f"{mb:.3g} MiB" if mb >= 1 else f"{mb * 1024:.3g} KiB"


def short_status(r):
    if r["status"] != "skipped":
        return r["status"]
    note = r.get("note") or ""
    return ("skip (mem est.)" if note.startswith("est.") else "skip (time est.)" if note.startswith("predicted")
            else "skip (budget)" if "budget" in note else "skip (columns)" if note.startswith("W has") else "skip")


def cell(r, sep=" "):
    if r is None:
        return ""
    if r["status"] != "ok":
        return short_status(r)
    mm = [f"{r['x_mm']:.3g}x mm"] if r.get("x_mm") is not None else []
    mem = fmt_mb(r.get("peak_mem_mb"))
    if r.get("c") and r.get("peak_mem_mb") is not None:  # the class-weight losses' yardstick: the size of W
        mem += f" ({r['peak_mem_mb'] * 2**20 / weight_bytes(r['loss'], r['c'], r['d'], r['dtype']):.2g}x W)"
    return sep.join([fmt_time(r["median"])] + mm + [mem])


def groups(results):
    """{(device, dtype, mode, class N or None): {loss: {provider: {N or C: result}}}}, providers in
    PROVIDER_PRIORITY order; the class-weight losses (swept over C at one N) in groups of their own."""
    out = {}
    for r in results:
        if r["loss"] != FLOOR_LOSS:
            key = (r["device"], r["dtype"], r["mode"], r["n"] if r.get("c") else None)
            out.setdefault(key, {}).setdefault(r["loss"], {}).setdefault(r["provider"], {})[size(r)] = r
    return {k: {loss: dict(sorted(bp.items(), key=lambda kv: provider_rank(kv[0]))) for loss, bp in g.items()}
            for k, g in out.items()}


def _ns(byprov):
    return sorted({n for per in byprov.values() for n in per})


def largest_ok(per_n):
    return max((n for n, r in per_n.items() if r["status"] == "ok"), default=None)


def _backend_of(per_n):
    return ",".join(dict.fromkeys(per_n[n].get("backend") for n in sorted(per_n) if per_n[n].get("backend"))) or "-"


def _ratio(r, better, worse):
    return f"{r:.3g}x {better}" if r >= 1 else f"{1 / r:.3g}x {worse}"


def vs_pml(per_n, pml, ax="N"):
    """This provider against PML at the largest N (C) both handled, and where PML stopped if earlier."""
    if not pml:
        return "-"
    out = []
    common = [n for n, r in per_n.items() if r["status"] == "ok" and pml.get(n, {}).get("status") == "ok"]
    if common:
        n = max(common)
        a, b = per_n[n], pml[n]
        s = f"{ax}={n}: " + (_ratio(b["median"] / a["median"], "faster", "slower") if a["median"] else "")
        m = b["peak_mem_mb"] / a["peak_mem_mb"] if a.get("peak_mem_mb") and b.get("peak_mem_mb") is not None else 0
        s += ", " + _ratio(m, "less mem", "more mem") if m else ""
        out.append(s)
    mine, theirs = largest_ok(per_n), largest_ok(pml)
    stop = [n for n in sorted(pml) if pml[n]["status"] != "ok"]
    if mine is not None and (theirs is None or theirs < mine) and stop:
        out.append(f"PML stops at {ax}={stop[0]} ({short_status(pml[stop[0]])})")
    return "; ".join(out) or "-"


def _table(loss, byprov, floors, key, md):
    """Header, a row per provider, the T_mm row (class losses: and the size of W); md: summary.md's,
    with 'vs PML'."""
    (_, dtype, _, cn), ns, pml = key, _ns(byprov), byprov.get("pml")
    ax = "C" if cn else "N"
    rows = [["provider", "backend"] + [f"{ax}={n}" for n in ns]
            + ([f"largest {ax}", "vs PML"] if md else [f"max {ax}"])]
    for prov, per in byprov.items():
        row = [f"**{prov}**" if md and prov.startswith("dmlkern") else prov, _backend_of(per)]
        row += [cell(per.get(n), "<br>" if md else " ") for n in ns] + [str(largest_ok(per) or "-")]
        rows.append(row + ([vs_pml(per, pml, ax) if prov != "pml" else ""] if md else []))
    rows.append(["T_mm", "x @ W" if cn else "x @ x.T"] + [fmt_time(floors.get(_floor_key(key, n))) for n in ns]
                + [""] * (1 + md))
    if cn:
        d, k = next(r["d"] for per in byprov.values() for r in per.values()), LOSSES[loss].per_class
        rows.append(["size of W", f"D x {k}C" if k > 1 else "D x C"]
                    + [fmt_mb(weight_bytes(loss, n, d, dtype) / 2**20) for n in ns] + [""] * (1 + md))
    return rows


def _heading(key):
    device, dtype, mode, cn = key
    return f"{device}, {dtype}, {mode}" + (f", class-weight losses at N={cn}" if cn else "")


def terminal_table(results):
    floors, lines = floor_times(results), []
    for key, losses in groups(results).items():
        lines.append(f"== {_heading(key)}: median time (x T_mm) and peak memory ==")
        for loss, byprov in losses.items():
            rows = _table(loss, byprov, floors, key, md=False)
            widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
            lines.append(f"-- {loss}")
            lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
        lines.append("")
    return "\n".join(lines)


def summary_md(results, meta):
    floors, info, a = floor_times(results), meta.get("info", {}), meta["args"]
    bi, load, nproc = info.get("build_info", {}), meta.get("loadavg_start"), info.get("nproc") or 1
    classes = any(r.get("c") for r in results)
    out = ["# dmlkern benchmark summary", "",
           f"- machine: `{meta['machine']}` ({info.get('gpu_name') or info.get('cpu_model', '?')}, "
           f"{info.get('nproc', '?')} CPUs, torch threads {info.get('threads', '?')})",
           f"- dmlkern {meta['version']}, torch {info.get('torch', '?')}, triton {info.get('triton_version') or '-'}, "
           f"pytorch-metric-learning {info.get('pml_version') or 'not installed'}; "
           f"compiled: cpu={bi.get('cpu')}, cuda={bi.get('cuda')} {bi.get('cuda_arch_list') or ''}".rstrip(),
           f"- run {meta['started']} .. {meta.get('finished', '?')}; D={a['d']}; warm-up {a['warmup']}, "
           f"--repeats {a['repeats']}, time limit {a['time_limit']:g} s/point"
           + (f" (class-weight losses {a['class_time_limit']:g} s)" if classes else "")
           + f", memory budget {meta['mem_budget_gb']:.3g} GiB",
           f"- command: `{meta['command']}`; load average (1/5/15 min) at start {load}, at end "
           f"{meta.get('loadavg_end')}", ""]
    if load and load[0] > 0.5 * nproc and a.get("device") == "cpu" and a.get("threads") != 1:
        out += [f"**Warning: the machine was busy (load {load[0]:.2f} on {nproc} CPUs).** With several torch "
                "threads, paths made of many small ops (reference, PML, compile) can be slowed 10-100x by OpenMP "
                "threads waiting for a core; fused kernels suffer far less. Re-run on a quiet machine, or with "
                "`--threads 1`, before quoting these numbers.", ""]
    when = ("timed in the point's own process just before and after its timing, as the machine's speed drifts; "
            "the T_mm row gives the separate floor points" if a.get("paired_t_mm") else "the T_mm row")
    out += ["Each cell: median time per call (x T_mm = that time over one `x @ x.T` of the same size and dtype, "
            f"{when}) and peak memory growth of one call. `oom`/`timeout`/`error`: the point ran and failed; "
            "`skip (mem est.)`: a materialising provider's estimated footprint exceeded the budget; "
            "`skip (time est.)`: extrapolated past the time limit; `skip`: a smaller N already failed. "
            "'vs PML' compares at the largest N both ran." + (
                " The class-weight losses are swept over the class count C at a fixed N: their T_mm is one `x @ W` "
                "(N x C x D), and their memory is also given as a multiple of the size of W (allocated before the "
                "call; its gradient is counted)." if classes else ""), ""]
    for key, losses in groups(results).items():
        out += [f"## {_heading(key)}", ""]
        for loss, byprov in losses.items():
            header, *body = _table(loss, byprov, floors, key, md=True)
            out += [f"### {loss}", "", f"`{LOSSES[loss].title if loss in LOSSES else loss}`", "",
                    "| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
            out += ["| " + " | ".join(row) + " |" for row in body] + [""]
    out += heap_growth_md(results)
    fails = [r for r in results if r["status"] in ("error", "oom", "timeout") and r.get("note")]
    if fails:
        out += ["## Notes on failed points", ""]
        out += [f"- {r['loss']} / {r['provider']} {point_label(r)} {r['dtype']} {r['mode']}: {r['status']}: "
                + r["note"].replace("\n", " ").replace("|", "/")[:200] for r in fails] + [""]
    return "\n".join(out)


HEAP_GROWTH_FACTOR, HEAP_GROWTH_SLACK_MB = 1.5, 64.0


def heap_grew(r) -> bool:
    """The point's RSS under the default allocator outgrew its own peak memory: freed blocks left pinned
    in the heap (fragmentation), a memory cost a user's process pays that peak_mem_mb does not show."""
    rss, peak = r.get("rss_default_mb"), r.get("peak_mem_mb")
    return (r["status"] == "ok" and rss is not None and peak is not None
            and rss > HEAP_GROWTH_FACTOR * peak + HEAP_GROWTH_SLACK_MB)


def heap_growth_md(results):
    """summary.md's section on the default allocator's RSS (CPU points only)."""
    measured = [r for r in results if r["status"] == "ok" and r.get("rss_default_mb") is not None
                and r["loss"] != FLOOR_LOSS]  # (torch's product: OpenMP threads' arenas, not a loss's memory)
    if not measured:
        return []
    grew = [r for r in measured if heap_grew(r)]
    out = ["## Memory under glibc's default allocator", "",
           f"The peak memory above is measured under a fixed mmap threshold, so it shows one call's own memory. "
           f"The timed calls run under the default allocator, as in a user's process; their peak RSS growth is "
           f"`rss_default_mb` in results.csv. A point is listed here when it exceeds {HEAP_GROWTH_FACTOR:g}x the "
           f"peak memory + {HEAP_GROWTH_SLACK_MB:g} MiB (freed blocks pinned in the heap).", ""]
    if not grew:
        return out + [f"None of the {len(measured)} measured points.", ""]
    return out + [f"- {r['loss']} / {r['provider']} {point_label(r)} {r['dtype']} {r['mode']}: "
                  f"{fmt_mb(r['rss_default_mb'])} against a peak of {fmt_mb(r['peak_mem_mb'])}"
                  for r in grew] + [""]


def plot(results, out_dir, meta):
    """time_<device>_<dtype>_<mode>[_classes_n<N>].png and memory_<...>.png: one log-log panel per loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    floors, files = floor_times(results), []
    for key, losses in groups(results).items():
        device, dtype, mode, cn = key
        ax_name = f"C (classes), N={cn}" if cn else "N (batch size)"
        for kind in ("time", "memory"):
            ncols = min(3, len(losses))
            nrows = math.ceil(len(losses) / ncols)
            fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 3.9 * nrows), squeeze=False)
            for ax in axes.flat[len(losses):]:
                ax.set_visible(False)
            for ax, (loss, byprov) in zip(axes.flat, losses.items()):
                ns = _ns(byprov)
                for i, (prov, per) in enumerate(byprov.items()):
                    _plot_line(ax, prov, per, kind, meta, jitter=1 + 0.03 * i, cls=bool(cn))
                fl = [(n, floors[_floor_key(key, n)]) for n in ns if _floor_key(key, n) in floors]
                if kind == "memory":
                    guide = [weight_bytes(loss, n, meta["args"]["d"], dtype) if cn else n * n * ITEMSIZE[dtype]
                             for n in ns]
                    ax.plot(ns, [b / 2**20 for b in guide], ":", color="gray", lw=1,
                            label=f"size of W ({dtype})" if cn else f"one NxN {dtype} matrix")
                elif fl:
                    ax.plot(*zip(*fl), "k--", lw=1, label="T_mm (x @ W)" if cn else "T_mm (x @ x.T)")
                ax.set_xscale("log", base=2)
                ax.set(yscale="log", xlabel=ax_name,
                       ylabel="median time per call [s]" if kind == "time" else "peak memory growth [MiB]")
                ax.margins(x=0.12)
                ax.set_title(loss, fontsize=10)
                ax.grid(True, which="both", alpha=0.25)
                ax.legend(fontsize=7)
            fig.suptitle(f"dmlkern {meta['version']} on {meta['machine']}: {kind}, {device} {dtype} {mode}, "
                         f"D={meta['args']['d']} (X = failed/stopped at that {ax_name[0]})", fontsize=10)
            fig.tight_layout()
            files.append(os.path.join(out_dir, f"{kind}_{device}_{dtype}_{mode}{f'_classes_n{cn}' if cn else ''}.png"))
            fig.savefig(files[-1], dpi=110)
            plt.close(fig)
    return files


def _plot_line(ax, prov, per_n, kind, meta, jitter=1.0, cls=False):
    ok = [(n, r) for n, r in sorted(per_n.items()) if r["status"] == "ok"]
    ys = [r["median"] if kind == "time" else max(r.get("peak_mem_mb") or 0.0, 1e-3) for _, r in ok]
    line = None
    if ok:
        line, = ax.plot([n for n, _ in ok], ys, "o-", color=COLORS.get(prov), ms=4, label=prov)
        if kind == "time":
            ax.fill_between([n for n, _ in ok], [r["p20"] for _, r in ok], [r["p80"] for _, r in ok],
                            color=line.get_color(), alpha=0.2)
    # X at the first N where this provider stopped (oom/timeout/error, or skipped after an estimate)
    bad = [(n, r) for n, r in sorted(per_n.items())
           if r["status"] != "ok" and "sweep budget" not in (r.get("note") or "")]
    if bad:
        n, why = bad[0][0] * jitter, short_status(bad[0][1])  # jitter: same-N stops stay distinguishable
        at_limit = ("timeout", "skip (time est.)") if kind == "time" else ("oom", "skip (mem est.)")
        limit = meta["args"]["class_time_limit" if cls else "time_limit"]
        y = (limit if kind == "time" else meta["mem_budget_gb"] * 1024) \
            if why in at_limit or not ys else ys[-1]
        c = line.get_color() if line is not None else COLORS.get(prov)
        ax.plot([n], [y], "x", color=c, ms=10, mew=2.5, label=None if line is not None else f"{prov} (none ok)")
        ax.annotate(why, (n, y), textcoords="offset points", xytext=(4, 4), fontsize=6, color=c)
