"""Turn point results into the long CSV, the terminal table, summary.md and the plots."""
from __future__ import annotations

import csv
import math
import os
from collections import OrderedDict

from .specs import FLOOR_LOSS, LOSSES, PROVIDER_PRIORITY, matrix_bytes

CSV_COLUMNS = ["loss", "provider", "backend", "device", "dtype", "n", "d", "mode", "metric", "median", "p20",
               "p80", "status", "machine", "version", "timestamp"]
METRICS = ["time_s", "peak_mem_mb", "x_mm"]
STATUSES = ["ok", "oom", "timeout", "error", "skipped"]


def percentile(values, q):
    """Linear-interpolation percentile (numpy's default), q in [0, 100]."""
    s = sorted(values)
    if not s:
        return float("nan")
    pos = (len(s) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _num(v):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return f"{v:.6g}"


def floor_times(results):
    """(device, dtype, n) -> T_mm median seconds."""
    out = {}
    for r in results:
        if r["loss"] == FLOOR_LOSS and r["status"] == "ok":
            out[(r["device"], r["dtype"], r["n"])] = r["median"]
    return out


def attach_x_mm(results):
    floors = floor_times(results)
    for r in results:
        t_mm = floors.get((r["device"], r["dtype"], r["n"]))
        r["t_mm"] = t_mm
        ok = r["status"] == "ok" and t_mm
        r["x_mm"] = r["median"] / t_mm if ok else None
        r["x_mm_p20"] = r["p20"] / t_mm if ok else None
        r["x_mm_p80"] = r["p80"] / t_mm if ok else None


def csv_rows(results, machine, version):
    rows = []
    for r in results:
        base = {k: r[k] for k in ("loss", "provider", "device", "dtype", "n", "d", "mode", "status")}
        base.update(backend=r.get("backend") or "", machine=machine, version=version, timestamp=r["timestamp"])
        ok = r["status"] == "ok"
        mem = r.get("peak_mem_mb") if ok else None
        values = {
            "time_s": (r.get("median"), r.get("p20"), r.get("p80")) if ok else (None, None, None),
            "peak_mem_mb": (mem, None, None),
            "x_mm": (r.get("x_mm"), r.get("x_mm_p20"), r.get("x_mm_p80")),
        }
        for metric in METRICS:
            med, p20, p80 = values[metric]
            rows.append(dict(base, metric=metric, median=_num(med), p20=_num(p20), p80=_num(p80)))
    return rows


def write_csv(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        w.writeheader()
        w.writerows(rows)


# ----------------------------------------------------------------------------------- formatting

def fmt_time(s):
    if s is None:
        return "-"
    if s >= 1:
        return f"{s:.3g} s"
    if s >= 1e-3:
        return f"{s * 1e3:.3g} ms"
    return f"{s * 1e6:.3g} us"


def fmt_mb(mb):
    if mb is None:
        return "-"
    if mb >= 1024:
        return f"{mb / 1024:.3g} GiB"
    if mb >= 1:
        return f"{mb:.3g} MiB"
    return f"{mb * 1024:.3g} KiB"


def short_status(r):
    note = r.get("note") or ""
    if r["status"] == "skipped":
        if note.startswith("est."):
            return "skip (mem est.)"
        if note.startswith("predicted"):
            return "skip (time est.)"
        if "budget" in note:
            return "skip (budget)"
        return "skip"
    return r["status"]


def cell(r, with_mm=True, sep=" "):
    if r is None:
        return ""
    if r["status"] != "ok":
        return short_status(r)
    parts = [fmt_time(r["median"])]
    if with_mm and r.get("x_mm") is not None:
        parts.append(f"{r['x_mm']:.3g}x mm")
    parts.append(fmt_mb(r.get("peak_mem_mb")))
    return sep.join(parts)


def groups(results):
    """OrderedDict (device, dtype, mode) -> loss -> provider -> {n: result}; and the N list."""
    out = OrderedDict()
    for r in results:
        if r["loss"] == FLOOR_LOSS:
            continue
        g = out.setdefault((r["device"], r["dtype"], r["mode"]), OrderedDict())
        g.setdefault(r["loss"], OrderedDict()).setdefault(r["provider"], {})[r["n"]] = r
    return out


def _providers_sorted(provs):
    order = {p: i for i, p in enumerate(PROVIDER_PRIORITY)}
    return sorted(provs, key=lambda p: order.get(p, 99))


def _ns(byprov):
    return sorted({n for per in byprov.values() for n in per})


def largest_ok(per_n):
    ok = [n for n, r in per_n.items() if r["status"] == "ok"]
    return max(ok) if ok else None


def _backend_of(per_n):
    bs = []
    for n in sorted(per_n):
        b = per_n[n].get("backend")
        if b and b not in bs:
            bs.append(b)
    return ",".join(bs) or "-"


def vs(per_n, ref_per_n):
    """(n, time ratio ref/this, memory ratio ref/this) at the largest N both handled."""
    if ref_per_n is None:
        return None
    common = [n for n in per_n if per_n[n]["status"] == "ok" and n in ref_per_n and ref_per_n[n]["status"] == "ok"]
    if not common:
        return None
    n = max(common)
    a, b = per_n[n], ref_per_n[n]
    t = b["median"] / a["median"] if a["median"] else None
    m = (b["peak_mem_mb"] / a["peak_mem_mb"]) if a.get("peak_mem_mb") and b.get("peak_mem_mb") is not None else None
    return n, t, m


def _ratio(r, better, worse):
    return f"{r:.3g}x {better}" if r >= 1 else f"{1 / r:.3g}x {worse}"


def _fmt_vs(v, per_n=None, pml=None):
    out = []
    if v is not None:
        n, t, m = v
        s = f"N={n}: " + (_ratio(t, "faster", "slower") if t else "")
        if m:
            s += ", " + _ratio(m, "less mem", "more mem")
        out.append(s)
    if per_n is not None and pml:
        mine, theirs = largest_ok(per_n), largest_ok(pml)
        if mine is not None and (theirs is None or theirs < mine):
            stop = [n for n in sorted(pml) if pml[n]["status"] != "ok"]
            if stop:
                out.append(f"PML stops at N={stop[0]} ({short_status(pml[stop[0]])})")
    return "; ".join(out) or "-"


def terminal_table(results, floors=None):
    floors = floor_times(results) if floors is None else floors
    lines = []
    for (device, dtype, mode), losses in groups(results).items():
        lines.append(f"== {device} {dtype} {mode}: median time (x T_mm) and peak memory ==")
        for loss, byprov in losses.items():
            ns = _ns(byprov)
            header = ["provider", "backend"] + [f"N={n}" for n in ns] + ["max N"]
            rows = []
            for prov in _providers_sorted(byprov):
                per = byprov[prov]
                rows.append([prov, _backend_of(per)] + [cell(per.get(n)) for n in ns]
                            + [str(largest_ok(per) or "-")])
            rows.append(["T_mm", "x @ x.T"] + [fmt_time(floors.get((device, dtype, n))) for n in ns] + [""])
            widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
            lines.append(f"-- {loss}")
            fmt = "  ".join("{:<%d}" % w for w in widths)
            lines.append(fmt.format(*header))
            for r in rows:
                lines.append(fmt.format(*r))
        lines.append("")
    return "\n".join(lines)


def summary_md(results, meta):
    floors = floor_times(results)
    out = ["# dmlkern benchmark summary", ""]
    info = meta.get("info", {})
    bi = info.get("build_info", {})
    out += [
        f"- machine: `{meta['machine']}` ({info.get('gpu_name') or info.get('cpu_model', '?')}, "
        f"{info.get('nproc', '?')} CPUs, torch threads {info.get('threads', '?')})",
        f"- dmlkern {meta['version']}, torch {info.get('torch', '?')}, triton {info.get('triton_version') or '-'}, "
        f"pytorch-metric-learning {info.get('pml_version') or 'not installed'}; "
        f"compiled: cpu={bi.get('cpu')}, cuda={bi.get('cuda')} {bi.get('cuda_arch_list') or ''}".rstrip(),
        f"- run {meta['started']} .. {meta.get('finished', '?')}; D={meta['args']['d']}; "
        f"warm-up {meta['args']['warmup']}, up to {meta['args']['repeats']} timed calls, "
        f"time limit {meta['args']['time_limit']:g} s/point, memory budget {meta['mem_budget_gb']:.3g} GiB",
        f"- command: `{meta['command']}`; load average (1/5/15 min) at start {meta.get('loadavg_start')}, "
        f"at end {meta.get('loadavg_end')}",
        "",
    ]
    load = meta.get("loadavg_start")
    nproc = info.get("nproc") or 1
    if load and load[0] > 0.5 * nproc and meta["args"].get("device") == "cpu" and meta["args"].get("threads") != 1:
        out += [
            f"**Warning: the machine was busy (load {load[0]:.2f} on {nproc} CPUs).** With several torch threads, "
            "paths made of many small ops (reference, PML, compile) can be slowed 10-100x by OpenMP threads "
            "waiting for a core; fused kernels suffer far less. Re-run on a quiet machine, or with "
            "`--threads 1`, before quoting these numbers.",
            "",
        ]
    out += [
        "Each cell: median time per call (x T_mm = that time over one `x @ x.T` of the same size and dtype) "
        "and peak memory growth of one call. `oom`/`timeout`/`error`: the point ran and failed; "
        "`skip (mem est.)`: a materialising provider's estimated footprint exceeded the budget; "
        "`skip (time est.)`: extrapolated past the time limit; `skip`: a smaller N already failed. "
        "'vs PML' compares at the largest N both ran.",
        "",
    ]
    for (device, dtype, mode), losses in groups(results).items():
        out.append(f"## {device}, {dtype}, {mode}")
        out.append("")
        for loss, byprov in losses.items():
            ns = _ns(byprov)
            title = LOSSES[loss].title if loss in LOSSES else loss
            out += [f"### {loss}", "", f"`{title}`", ""]
            header = ["provider", "backend"] + [f"N={n}" for n in ns] + ["largest N", "vs PML"]
            out.append("| " + " | ".join(header) + " |")
            out.append("|" + "|".join(["---"] * len(header)) + "|")
            pml = byprov.get("pml")
            for prov in _providers_sorted(byprov):
                per = byprov[prov]
                v = vs(per, pml) if prov != "pml" else None
                row = [f"**{prov}**" if prov.startswith("dmlkern") else prov, _backend_of(per)]
                row += [cell(per.get(n), sep="<br>") for n in ns]
                row += [str(largest_ok(per) or "-"), _fmt_vs(v, per, pml) if prov != "pml" else ""]
                out.append("| " + " | ".join(row) + " |")
            row = ["T_mm", "x @ x.T"] + [fmt_time(floors.get((device, dtype, n))) for n in ns] + ["", ""]
            out.append("| " + " | ".join(row) + " |")
            out.append("")
    fails = [r for r in results if r["status"] in ("error", "oom", "timeout") and r.get("note")]
    if fails:
        out += ["## Notes on failed points", ""]
        for r in fails:
            note = r["note"].replace("\n", " ").replace("|", "/")[:200]
            out.append(f"- {r['loss']} / {r['provider']} N={r['n']} {r['dtype']} {r['mode']}: "
                       f"{r['status']}: {note}")
        out.append("")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------- plots

_COLORS = {"dmlkern": "C0", "dmlkern-triton": "C9", "dmlkern-cpp": "C4", "pml": "C3", "reference": "C1",
           "compile": "C2"}


def plot(results, out_dir, meta):
    """time_<device>_<dtype>_<mode>.png and memory_<...>.png: one log-log panel per loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    floors = floor_times(results)
    files = []
    limit = meta["args"]["time_limit"]
    budget_mb = meta["mem_budget_gb"] * 1024
    for (device, dtype, mode), losses in groups(results).items():
        for kind in ("time", "memory"):
            k = len(losses)
            ncols = min(3, k)
            nrows = math.ceil(k / ncols)
            fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 3.9 * nrows), squeeze=False)
            for ax in axes.flat[k:]:
                ax.set_visible(False)
            for ax, (loss, byprov) in zip(axes.flat, losses.items()):
                ns_all = _ns(byprov)
                for i, prov in enumerate(_providers_sorted(byprov)):
                    _plot_line(ax, prov, byprov[prov], kind, limit, budget_mb, jitter=1 + 0.03 * i)
                if kind == "time":
                    fl = [(n, floors[(device, dtype, n)]) for n in ns_all if (device, dtype, n) in floors]
                    if fl:
                        ax.plot(*zip(*fl), "k--", lw=1, label="T_mm (x @ x.T)")
                else:
                    ax.plot(ns_all, [matrix_bytes(n, dtype) / 2**20 for n in ns_all], ":", color="gray", lw=1,
                            label=f"one NxN {dtype} matrix")
                ax.set_xscale("log", base=2)
                ax.margins(x=0.12)
                ax.set_yscale("log")
                ax.set_title(loss, fontsize=10)
                ax.set_xlabel("N (batch size)")
                ax.set_ylabel("median time per call [s]" if kind == "time" else "peak memory growth [MiB]")
                ax.grid(True, which="both", alpha=0.25)
                ax.legend(fontsize=7)
            fig.suptitle(f"dmlkern {meta['version']} on {meta['machine']}: {kind}, {device} {dtype} {mode}, "
                         f"D={meta['args']['d']} (X = failed/stopped at that N)", fontsize=10)
            fig.tight_layout()
            path = os.path.join(out_dir, f"{kind}_{device}_{dtype}_{mode}.png")
            fig.savefig(path, dpi=110)
            plt.close(fig)
            files.append(path)
    return files


def _plot_line(ax, prov, per_n, kind, limit, budget_mb, jitter=1.0):
    color = _COLORS.get(prov)
    ok = [(n, r) for n, r in sorted(per_n.items()) if r["status"] == "ok"]
    if kind == "time":
        pts = [(n, r["median"], r["p20"], r["p80"]) for n, r in ok]
    else:
        pts = [(n, max(r.get("peak_mem_mb") or 0.0, 1e-3), None, None) for n, r in ok]
    line = None
    if pts:
        xs = [p[0] for p in pts]
        line, = ax.plot(xs, [p[1] for p in pts], "o-", color=color, ms=4, label=prov)
        if kind == "time":
            ax.fill_between(xs, [p[2] for p in pts], [p[3] for p in pts], color=line.get_color(), alpha=0.2)
    # X at the first N where this provider stopped (oom/timeout/error, or skipped after an estimate)
    bad = [(n, r) for n, r in sorted(per_n.items())
           if r["status"] != "ok" and "sweep budget" not in (r.get("note") or "")]
    if bad:
        n, r = bad[0]
        why = short_status(r)
        if kind == "time":
            y = limit if why in ("timeout", "skip (time est.)") or not pts else pts[-1][1]
        else:
            y = budget_mb if why in ("oom", "skip (mem est.)") or not pts else pts[-1][1]
        c = line.get_color() if line is not None else color
        n = n * jitter  # providers stopping at the same N and y stay distinguishable
        ax.plot([n], [y], "x", color=c, ms=10, mew=2.5, label=None if line is not None else f"{prov} (none ok)")
        ax.annotate(why, (n, y), textcoords="offset points", xytext=(4, 4), fontsize=6, color=c)
