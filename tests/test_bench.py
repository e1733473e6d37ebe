"""python -m dmlkern.bench end to end on tiny sizes: CSV, plots, summary, and failure handling."""
import csv
import fcntl
import json
import os
import struct
import subprocess
import sys
import zlib

import pytest

from dmlkern.bench import report
from dmlkern.bench.cli import parse_args, plan_points, predict_call_s, skip_reason
from dmlkern.bench.specs import LOSSES, estimate_bytes, supported, weight_bytes

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
LOSSES_RUN = ["multi_similarity_miner", "ntxent"]
CLASS_LOSSES_RUN = ["arcface", "center"]  # swept over C at N = CLASS_N; center has no PML counterpart
PROVIDERS_RUN = ["dmlkern", "reference", "pml"]
NS, CS, CLASS_N = [64, 128], [1024, 4096], 64
EXPECTED = ({("matmul_floor", "torch", n, None) for n in NS} | {("matmul_floor", "torch", CLASS_N, c) for c in CS}
            | {(loss, p, n, None) for loss in LOSSES_RUN for p in PROVIDERS_RUN for n in NS}
            | {(loss, p, CLASS_N, c) for loss in CLASS_LOSSES_RUN for p in PROVIDERS_RUN if supported(loss, p)
               for c in CS})


def run_bench(args, tmp_path, env_extra=None, timeout=120):
    env = dict(os.environ)
    env.pop("DMLKERN_BACKEND", None)
    env.update(env_extra or {})
    proc = subprocess.run([sys.executable, "-m", "dmlkern.bench", *args, "--out", str(tmp_path), "--no-progress"],
                          capture_output=True, text=True, env=env, timeout=timeout)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    return proc


def read_csv(path):
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def check_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path.name} is not a PNG"
    # First chunk is IHDR with a sane size and a matching CRC.
    length, ctype = struct.unpack(">I4s", data[8:16])
    assert ctype == b"IHDR" and length == 13
    width, height = struct.unpack(">II", data[16:24])
    assert width >= 300 and height >= 200
    crc = struct.unpack(">I", data[29:33])[0]
    assert crc == zlib.crc32(data[12:29]) & 0xFFFFFFFF
    assert data.rstrip(b"\x00").endswith(b"IEND\xaeB`\x82")
    assert len(data) > 20_000, f"{path.name} is suspiciously small ({len(data)} bytes): nothing drawn?"


# One pytest-xdist worker should run this module (its sweep, a minute, once); the fixture also
# shares the sweep between workers when the tests are spread over several.
pytestmark = pytest.mark.xdist_group("bench_sweep")


@pytest.fixture(scope="session")
def sweep(tmp_path_factory, worker_id):
    """(the sweep's folder, its CompletedProcess with stdout): run once per pytest run. When
    pytest-xdist spreads this module over several workers (any mode but loadgroup), they share the
    run's base temp folder and take turns under a file lock, the first one running the sweep."""
    base = tmp_path_factory.getbasetemp()
    root = base if worker_id == "master" else base.parent  # (this run's folder, not an earlier run's)
    out, stdout = root / "bench_sweep", root / "bench_sweep.stdout"
    args = ["--n", *map(str, NS), "--classes", *map(str, CS), "--class-n", str(CLASS_N), "--losses", *LOSSES_RUN,
            *CLASS_LOSSES_RUN, "--providers", *PROVIDERS_RUN, "--repeats", "2",
            # a point's time is sized from its limit, not spent up to it: a generous limit costs
            # nothing here and keeps a point stalled by the other test worker's load from a timeout
            "--time-limit", "90", "--class-time-limit", "90"]
    with open(root / "bench_sweep.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not stdout.exists():
            out.mkdir(exist_ok=True)
            stdout.write_text(run_bench(args, out, timeout=600).stdout)
    return out, subprocess.CompletedProcess(args, 0, stdout.read_text(), "")


def test_help_explains_every_option():
    proc = subprocess.run([sys.executable, "-m", "dmlkern.bench", "--help"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0
    for opt in ("--losses", "--providers", "--n", "--classes", "--class-n", "--class-time-limit", "--max-columns",
                "--d", "--dtypes", "--device", "--modes", "--repeats", "--warmup", "--time-limit", "--mem-budget",
                "--out", "--quick", "--budget", "--paired-t-mm"):
        assert opt in proc.stdout


def test_driver_does_not_import_torch():
    code = "import sys, dmlkern.bench.cli, dmlkern.bench.report; print('torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "False", proc.stderr


def test_csv_is_well_formed(sweep):
    out, _ = sweep
    columns, rows = read_csv(out / "results.csv")
    assert columns == report.CSV_COLUMNS
    keys = [(r["loss"], r["provider"], int(r["n"]), int(r["c"]) if r["c"] else None, r["metric"]) for r in rows]
    assert len(keys) == len(set(keys)), "duplicate (loss, provider, n, c, metric) rows"
    assert set(keys) == {k + (m,) for k in EXPECTED for m in report.METRICS}
    for r in rows:
        assert r["status"] in report.STATUSES
        assert r["device"] == "cpu" and r["dtype"] == "fp32" and r["d"] == "128"
        assert r["machine"] and r["version"] and r["timestamp"]
        assert r["metric"] in report.METRICS
    # At these sizes everything fits: all points ran, with numeric medians and ordered percentiles.
    for r in rows:
        assert r["status"] == "ok", r
        med = float(r["median"])
        assert med > 0 or r["metric"] in ("peak_mem_mb", "rss_default_mb")
        if r["metric"] in ("time_s", "x_mm"):
            assert float(r["p20"]) <= med <= float(r["p80"])
    floor_x = {float(r["median"]) for r in rows if r["loss"] == "matmul_floor" and r["metric"] == "x_mm"}
    assert floor_x == {1.0}
    backends = {r["backend"] for r in rows if r["provider"] == "reference"}
    assert backends == {"reference"}
    assert all(r["backend"].split("+")[0] in ("cpp", "triton", "reference", "zero")
               for r in rows if r["provider"] == "dmlkern")


def test_points_jsonl_keeps_every_point(sweep):
    out, _ = sweep
    lines = [json.loads(line) for line in (out / "points.jsonl").read_text().splitlines()]
    assert len(lines) == len(EXPECTED)
    for p in lines:
        assert p["status"] == "ok", (p, (out / "worker.log").read_text()[-6000:])  # a stalled point's stack
        assert p["calls"] >= 1 and p["p20"] <= p["median"] <= p["p80"]
        assert p["mem_method"] == "VmHWM after clear_refs"


def test_report_only_rerenders_the_same_outputs(sweep, tmp_path):
    out, _ = sweep
    for name in ("points.jsonl", "meta.json"):
        (tmp_path / name).write_bytes((out / name).read_bytes())
    proc = run_bench(["--report-only", "--no-plots"], tmp_path)
    assert (tmp_path / "results.csv").read_text() == (out / "results.csv").read_text()
    assert (tmp_path / "summary.md").read_text() == (out / "summary.md").read_text()
    assert "-- ntxent" in proc.stdout


def test_plots_are_pngs(sweep):
    out, _ = sweep
    for kind in ("time", "memory"):
        check_png(out / f"{kind}_cpu_fp32_fwdbwd.png")
        check_png(out / f"{kind}_cpu_fp32_fwdbwd_classes_n{CLASS_N}.png")


def test_summary_and_table(sweep):
    out, proc = sweep
    text = (out / "summary.md").read_text()
    for loss in LOSSES_RUN:
        assert f"### {loss}" in text
        assert loss in proc.stdout  # the terminal table
    for prov in PROVIDERS_RUN:
        assert prov in text
    assert "T_mm" in text and "largest N" in text
    assert "N=64" in proc.stdout and "N=128" in proc.stdout


def test_class_losses_swept_over_c(sweep):
    """The class-weight losses: a section at N = CLASS_N with a column per C, T_mm = one x @ W, the
    size of W, memory as a multiple of it (W's gradient counted: it is created by the call), vs PML."""
    out, proc = sweep
    points = [json.loads(line) for line in (out / "points.jsonl").read_text().splitlines()]
    arc = {(p["provider"], p["c"]): p for p in points if p["loss"] == "arcface"}
    w_mb = weight_bytes("arcface", CS[-1], 128, "fp32") / 2**20
    assert arc[("dmlkern", CS[-1])]["peak_mem_mb"] >= 0.9 * w_mb  # at least W's gradient
    assert arc[("dmlkern", CS[-1])]["backend"] in ("cpp", "triton", "reference")
    floors = [p for p in points if p["loss"] == "matmul_floor" and p.get("c")]
    assert sorted(p["c"] for p in floors) == CS and all(p["n"] == CLASS_N for p in floors)
    text = (out / "summary.md").read_text()
    section = text[text.index(f"class-weight losses at N={CLASS_N}"):]
    for want in ("### arcface", "### center", f"C={CS[0]}", f"C={CS[-1]}", "largest C", "| T_mm | x @ W |",
                 "| size of W | D x C | 512 KiB | 2 MiB |", "x W)", f"C={CS[-1]}: "):
        assert want in section, want
    assert "-- center" in proc.stdout and f"C={CS[-1]}" in proc.stdout


def test_paired_t_mm(sweep):
    """On CPU each point times T_mm in its own process (--paired-t-mm, the default there): x_mm is the
    point's time over that, and results.csv gives it as t_mm_s. (Its product is checked below: at
    these sizes a busy core's scheduling, ~16 ms, outweighs a product's microseconds.)"""
    out, _ = sweep
    points = [json.loads(line) for line in (out / "points.jsonl").read_text().splitlines()]
    _, rows = read_csv(out / "results.csv")
    csv_rows = {(r["loss"], r["provider"], int(r["n"]), int(r["c"]) if r["c"] else None, r["metric"]): r
                for r in rows}
    for p in points:
        key = (p["loss"], p["provider"], p["n"], p.get("c"))
        t_mm = float(csv_rows[key + ("t_mm_s",)]["median"])
        if p["loss"] == "matmul_floor":
            assert "t_mm" not in p and t_mm == pytest.approx(p["median"], rel=1e-5)
            continue
        assert p["t_mm"] > 0 and t_mm == pytest.approx(p["t_mm"], rel=1e-5), p
        x_mm = float(csv_rows[key + ("x_mm",)]["median"])
        assert x_mm == pytest.approx(p["median"] / p["t_mm"], rel=1e-5), p
    assert "just before and after its timing" in (out / "summary.md").read_text()


def test_paired_floor_times_the_floor_product(monkeypatch):
    """PairedFloor runs the floor point's product: x @ x.T, or x @ W with W (D, C) (in row blocks into
    one buffer past FLOOR_MAX_OUT_BYTES); each side one warm-up call, then the same number of calls
    (1 to 25, by PAIRED_FLOOR_SIDE_S); it returns their median."""
    import statistics

    import torch

    from dmlkern.bench import worker

    x = torch.randn(40, 16, requires_grad=True)
    xd = x.detach()
    products = []
    real = worker._floor_callable

    def spy(torch_, x_, y_):
        fn, *rest = real(torch_, x_, y_)

        def run():
            out = fn()
            products.append((x_, y_, out))
            return out
        return (run, *rest)

    monkeypatch.setattr(worker, "_floor_callable", spy)
    monkeypatch.setattr(worker, "FLOOR_MAX_OUT_BYTES", 25 * 5000 * 4)  # 25-row blocks past that
    for c, rows in ((None, slice(0, 40)), (300, slice(0, 40)), (5000, slice(25, 40))):
        products.clear()
        floor = worker.PairedFloor(torch, x, c)
        floor.before()
        x_, y, out = products[-1]
        assert x_ is not x and torch.equal(x_, xd) and y.shape == (16, c or 40) and (c or torch.equal(y, xd.T))
        assert torch.equal(out[: rows.stop - rows.start], xd[rows] @ y), c
    for side_s, calls in ((0.0, 1), (1e3, 25)):
        monkeypatch.setattr(worker, "PAIRED_FLOOR_SIDE_S", side_s)
        products.clear()
        floor = worker.PairedFloor(torch, x, None)
        floor.before()
        assert len(floor.samples) == calls and len(products) == calls + 1  # and a warm-up call
        assert floor.after() == statistics.median(floor.samples) and len(floor.samples) == 2 * calls
        assert len(products) == 2 * calls + 2


_HEAP_HELD = """
import torch
from dmlkern.bench.worker import DefaultAllocatorPeak
watch = DefaultAllocatorPeak()
held = [torch.empty(1 << 20, dtype=torch.uint8).fill_(1) for _ in range({blocks})]  # 1 MiB blocks, kept
del held
print(watch.growth() / 2**20)
"""


@pytest.mark.parametrize("blocks", [0, 96])
def test_default_allocator_peak_sees_memory_held_in_the_window(blocks):
    """rss_default_mb's measure: the peak RSS growth while the timed calls run under the default
    allocator, over the RSS before them."""
    proc = subprocess.run([sys.executable, "-c", _HEAP_HELD.format(blocks=blocks)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    growth = float(proc.stdout.split()[-1])
    assert blocks - 1 <= growth <= blocks + 8, growth


def test_heap_growth_is_listed_in_the_summary():
    """summary.md lists the points whose default-allocator RSS outgrew their own peak memory (by the
    factor and slack of report.heap_grew), and says so when none did."""
    base = dict(device="cpu", dtype="fp32", n=64, c=None, mode="fwdbwd", status="ok", provider="dmlkern")
    fine = dict(base, loss="ntxent", peak_mem_mb=100.0, rss_default_mb=150.0 + report.HEAP_GROWTH_SLACK_MB)
    grew = dict(base, loss="triplet", peak_mem_mb=100.0, rss_default_mb=151.0 + report.HEAP_GROWTH_SLACK_MB)
    unmeasured = dict(base, loss="nca", peak_mem_mb=1.0, rss_default_mb=None)
    floor = dict(base, loss="matmul_floor", provider="torch", peak_mem_mb=1.0, rss_default_mb=500.0)
    assert [report.heap_grew(r) for r in (fine, grew, unmeasured)] == [False, True, False]
    listed = "\n".join(report.heap_growth_md([fine, grew, unmeasured, floor]))
    assert "- triplet / dmlkern N=64" in listed and "ntxent" not in listed and "nca" not in listed
    assert "matmul_floor" not in listed
    assert "None of the 1 measured points" in "\n".join(report.heap_growth_md([fine, unmeasured, floor]))
    assert report.heap_growth_md([unmeasured]) == []


def test_x_mm_without_a_paired_t_mm_uses_the_floor_point():
    """--no-paired-t-mm, CUDA, or points.jsonl from before the option: x_mm divides by the floor point
    of the same device, dtype and size."""
    base = dict(device="cpu", dtype="fp32", n=64, c=None, status="ok", p20=1.0, p80=3.0)
    results = [dict(base, loss="matmul_floor", median=0.5), dict(base, loss="ntxent", median=2.0),
               dict(base, loss="nca", median=2.0, t_mm=0.25), dict(base, loss="npairs", median=1.0, n=128)]
    report.attach_x_mm(results)
    assert [r["x_mm"] for r in results] == [1.0, 4.0, 8.0, None]
    assert [r["t_mm_s"] for r in results] == [0.5, 0.5, 0.25, None]
    assert results[1]["x_mm_p20"] == 2.0 and results[1]["x_mm_p80"] == 6.0
    assert parse_args([]).paired_t_mm and not parse_args(["--device", "cuda"]).paired_t_mm
    assert not parse_args(["--no-paired-t-mm"]).paired_t_mm


def test_forced_timeout_is_recorded_and_sweep_continues(tmp_path):
    # The hook makes reference's N=64 point sleep forever: it must be killed after the limit, recorded
    # as "timeout" with its stack in worker.log, its larger N skipped, and the other provider still measured.
    args = ["--n", "64", "128", "--losses", "masked_lse", "--providers", "dmlkern", "reference",
            "--repeats", "2", "--time-limit", "2", "--no-plots"]
    run_bench(args, tmp_path, {"DMLKERN_BENCH_HANG": "masked_lse:reference:64"})
    _, rows = read_csv(tmp_path / "results.csv")
    status = {(r["provider"], int(r["n"])): r["status"] for r in rows if r["metric"] == "time_s"}
    assert status[("reference", 64)] == "timeout"
    assert status[("reference", 128)] == "skipped"
    assert status[("dmlkern", 64)] == "ok" and status[("dmlkern", 128)] == "ok"
    assert all(r["median"] == "" for r in rows if r["provider"] == "reference")
    assert "timeout" in (tmp_path / "summary.md").read_text()
    log = (tmp_path / "worker.log").read_text()  # where the killed point was: its stack, just before the kill
    assert "Timeout (" in log and "in run_point" in log, log[-3000:]


def test_compiled_dmlkern_provider_runs(tmp_path):
    """dmlkern-compiled (torch.compile of the dmlkern call; benchmarks/gpu_check.sh compares it
    with eager dmlkern to size the eager per-op overhead) runs the fused kernel, not the reference."""
    args = ["--n", "64", "--losses", "multi_similarity", "--providers", "dmlkern-compiled", "--repeats", "1",
            "--no-plots"]
    run_bench(args, tmp_path, timeout=600)
    _, rows = read_csv(tmp_path / "results.csv")
    times = [r for r in rows if r["metric"] == "time_s" and r["provider"] == "dmlkern-compiled"]
    assert len(times) == 1 and times[0]["status"] == "ok", rows
    assert times[0]["backend"] == "cpp+compile", times[0]


# ---------------------------------------------------------------------------- cheap unit checks

def test_cpu_timing_uses_torch_benchmark_timer():
    """CPU points are timed by torch.utils.benchmark.Timer.adaptive_autorange: median and the 20th /
    80th percentiles of its block times (statistics.quantiles), per call."""
    import time

    import torch

    from dmlkern.bench.worker import time_call

    med, p20, p80, calls = time_call(torch, torch.device("cpu"), lambda: time.sleep(0.002), 0.05, 0.5)
    assert calls >= 4 and p20 <= med <= p80
    assert 0.0019 < med < 0.02


def test_timing_window():
    """--repeats calls' worth, capped at max(10 s, two calls) and by what the point has left; more
    blocks up to twice that while the spread is wide, not past 10 s."""
    from dmlkern.bench.worker import timing_window

    assert timing_window(5, 0.1, 60, 20)[0] == pytest.approx(0.5)  # short calls: five calls' worth
    assert timing_window(5, 9.0, 60, 120)[0] == pytest.approx(18.0)  # long calls: two
    assert timing_window(5, 3.0, 60, 120)[0] == pytest.approx(10.0)
    assert timing_window(5, 9.0, 12, 120)[0] == pytest.approx(12.0)  # what is left
    assert timing_window(5, 0.001, 60, 20)[0] == pytest.approx(0.05)  # the floor
    # and at most: twice the window while under MAX_TIMING_S, the window past it, what is left
    assert timing_window(5, 0.1, 60, 20)[1] == pytest.approx(1.0)
    assert timing_window(5, 1.5, 60, 20)[1] == pytest.approx(10.0)
    assert timing_window(5, 9.0, 60, 120)[1] == pytest.approx(18.0)
    assert timing_window(5, 9.0, 12, 120)[1] == pytest.approx(12.0)


def test_budgets_of_the_two_parts():
    """--budget for the N sweep (540 s); the C sweep gets --class-budget, else --budget's value when
    given, else 900 s (ten class losses at C = 2^20 after PML and the reference at the smallest C)."""
    assert (lambda a: (a.budget, a.class_budget))(parse_args([])) == (540.0, 900.0)
    assert (lambda a: (a.budget, a.class_budget))(parse_args(["--budget", "35"])) == (35.0, 35.0)
    assert (lambda a: (a.budget, a.class_budget))(parse_args(["--class-budget", "99"])) == (540.0, 99.0)
    assert (lambda a: (a.budget, a.class_budget))(parse_args(["--quick"])) == (180.0, 180.0)


def test_losses_outside_the_default_sweep():
    """PNP, TCM and DynamicSoftMargin run with --losses only; they have no "compile" provider
    (no reference function of (emb, labels)), but every other one."""
    default = parse_args([]).losses
    assert "multi_similarity" in default and not {"pnp", "tcm", "dynamic_soft_margin"} & set(default)
    args = parse_args(["--losses", "pnp", "tcm", "--providers", "dmlkern", "pml", "compile", "--n", "512"])
    planned = {(p["loss"], p["provider"]) for p in plan_points(args)}
    assert {("pnp", "dmlkern"), ("pnp", "pml"), ("tcm", "pml")} <= planned
    assert not any(prov == "compile" for _, prov in planned)


def test_plan_order_gives_every_loss_a_pml_point_early():
    """In each part: the floor, dmlkern at every size but the largest, PML and the reference at the
    smallest size, dmlkern at the largest, then the rest size by size (compile after), each
    provider's sizes ascending; so a budget that ends during dmlkern's largest size leaves every
    loss a PML comparison."""
    args = parse_args(["--losses", "supcon", "contrastive", "arcface"])
    plan = plan_points(args)
    for part in ([p for p in plan if not p.get("c")], [p for p in plan if p.get("c")]):
        size = (lambda p: p["c"]) if part[0].get("c") else (lambda p: p["n"])
        sizes = sorted({size(p) for p in part})
        where = {(p["loss"], p["provider"], size(p)): i for i, p in enumerate(part)}
        losses = {p["loss"] for p in part if p["provider"] == "dmlkern"}
        last_small = max(where[(loss, "dmlkern", s)] for loss in losses for s in sizes[:-1])
        first_large = min(where[(loss, "dmlkern", sizes[-1])] for loss in losses)
        for loss in losses:
            for prov in ("pml", "reference"):
                assert last_small < where[(loss, prov, sizes[0])] < first_large, (loss, prov)
            assert where[(loss, "compile", sizes[0])] > first_large
        for (loss, prov, s), i in where.items():
            if s != sizes[0] and prov != "dmlkern" and loss in losses:
                assert i > max(where[(loss, "dmlkern", t)] for t in sizes), (loss, prov, s)
        chains = {}
        for p in part:
            chains.setdefault((p["loss"], p["provider"]), []).append(size(p))
        assert all(c == sorted(c) for c in chains.values())


def test_extrapolation_and_memory_estimate():
    assert predict_call_s([(1024, 1.0)], 2048, 2.0) == pytest.approx(4.0)
    assert predict_call_s([(1024, 1.0), (2048, 2.0)], 4096, 2.0) == pytest.approx(4.0)  # fitted p=1
    for loss in LOSSES:
        assert estimate_bytes(loss, 2048, "fp32", 4096) > estimate_bytes(loss, 1024, "fp32", 4096) > 0
        if LOSSES[loss].classes:
            assert estimate_bytes(loss, 1024, "fp32", 8192) > estimate_bytes(loss, 1024, "fp32", 4096)
    # PML-form NTXent / Lifted are O(N^3): far beyond any machine at N = 8192.
    assert estimate_bytes("ntxent", 8192, "fp32") > 2**40
    assert estimate_bytes("multi_similarity", 8192, "fp32") < 2**33


def test_triton_tile_sweep_runs_and_checks_agreement(tmp_path):
    """python -m dmlkern.bench.tiles (what gpu_check.sh runs on a GPU), here under the Triton
    interpreter on 150 rows (several 64-row tiles; NT-Xent's tile skipping under each tile shape):
    every setting runs (kslices64 is fp32's one-slice ONE_K path at D = 16), its loss and gradient
    agree with the default tiles', a setting that is the dtype's default (8 warps for fp32) is
    skipped as such, and the JSON / markdown are written. Run in a subprocess: the tool sets
    DMLKERN_BACKEND for its process."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "dmlkern.bench.tiles", "--device", "cpu", "--n", "150",
                           "--d", "16", "--dtypes", "fp32", "--losses", "multi_similarity_miner", "ntxent",
                           "--configs", "default", "kslices64", "warps8", "rows128", "cols32_bwd",
                           "--repeats", "1", "--out", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    result = json.loads((tmp_path / "tiles.json").read_text())
    rows = result["rows"]
    assert [r["config"] for r in rows] == ["default", "kslices64", "warps8", "rows128", "cols32_bwd"] * 2
    ran = [r for r in rows if r["config"] != "warps8"]
    assert all(r["status"] == "ok" and r["agrees"] and r["backend"] == "triton" for r in ran), rows
    assert all(r["status"] == "skip (this dtype's default)" for r in rows if r["config"] == "warps8"), rows
    assert "| fp32 | multi_similarity_miner | rows128 |" in (tmp_path / "tiles.md").read_text()


def test_tile_overrides_are_checked():
    """A bad tile setting is an error naming the key, not a kernel launched with it."""
    pytest.importorskip("triton", reason="Triton is a dependency of the CUDA build of torch")
    from dmlkern.triton import tiles as tk

    assert tk._with_overrides({"block_m": 64}, "fwd") == {"block_m": 64}
    for bad, key in (({"block_m": 48}, "block_m"), ({"num_warps": 0}, "num_warps"), ({"blocks": 2}, "blocks")):
        tk.TILE_OVERRIDES["fwd"] = bad
        try:
            with pytest.raises(ValueError, match=key):
                tk._with_overrides({"block_m": 64}, "fwd")
        finally:
            tk.TILE_OVERRIDES.clear()


def test_class_plan_skips_and_weight_sizes():
    """The default class sweep: after the pair losses, N = 1024 and C = 16384..1048576 with their own
    time limit; SoftTriple's 10 columns per class stop at --max-columns, PML at the memory estimate.
    weight_bytes is the size of each class's weights (parameters and CenterLoss's centers)."""
    import dmlkern.losses

    args = parse_args(["--losses", "supcon", "arcface", "soft_triple"])
    args.mem_budget = 10.0
    plan = plan_points(args)
    first = next(i for i, p in enumerate(plan) if p.get("c"))
    assert all(not p.get("c") for p in plan[:first]) and all(p.get("c") for p in plan[first:])
    assert {p["c"] for p in plan[first:]} == {16384, 131072, 1048576}
    assert {(p["n"], p["time_limit"]) for p in plan[first:]} == {(1024, 120.0)}
    pick = {(p["loss"], p["provider"], p["c"]): p for p in plan[first:]}
    assert "max-columns" in skip_reason(args, pick[("soft_triple", "dmlkern", 1048576)], {}, {}, None)
    assert skip_reason(args, pick[("soft_triple", "dmlkern", 131072)], {}, {}, None) is None
    assert skip_reason(args, pick[("arcface", "dmlkern", 1048576)], {}, {}, None) is None
    assert skip_reason(args, pick[("arcface", "pml", 1048576)], {}, {}, None).startswith("est.")
    # linear in C: 1 s at C=131072 predicts 8 s at 1048576, x 3 calls within the 40 s limit
    assert skip_reason(args, pick[("arcface", "dmlkern", 1048576)], {("arcface", "dmlkern", "fp32", "fwdbwd"):
                                                                     [(131072, 1.0)]}, {}, None) is None
    for loss, info in LOSSES.items():
        if info.classes:
            module = getattr(dmlkern.losses, info.cls)(num_classes=5, embedding_size=8)
            held = sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])
            assert held == weight_bytes(loss, 5, 8, "fp32"), loss
