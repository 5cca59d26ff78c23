"""benchmarks/report.py's arithmetic on a small synthetic run whose every derived number is known:
forward+backward counts three GEMMs, GB/s and x floor use the floor bytes, % mm the best calibration."""

import json

from benchmarks import report

BATCH, STORED, M, N = 10, 1_000_000, 4096, 2048  # per GEMM: 2 * 10 * 1e6 = 2e7 useful FLOPs


def _bench(name, median, **info):
    return dict(name=name, extra_info=info, stats=dict(median=median, iqr=0.0, rounds=5, min=median, max=median))


def _layer(impl, kind, op, median, bytes_=0):
    gemms = 3 if op == "fwd_bwd" else 1
    return _bench(f"test_layer[L2-{impl}-{op}]", median, layer="L2", describe="synthetic", batch=BATCH, M=M, N=N,
                  nnzb=100, block_shape=[100, 100], stored=STORED, conv_entries=STORED, density=0.1,
                  dense_bytes=M * N * 4, op=op, impl=impl, kind=kind, backend="cpu" if kind == "efcn" else None,
                  flops=gemms * 2 * BATCH * STORED, bytes=bytes_)


def _run():
    return dict(benchmarks=[
        # mm: 2e9 FLOPs in 20 ms (start, 100 GFLOP/s) and 10 ms (end, 200 GFLOP/s): the report uses 200
        _bench("test_mm_rate[start]", 0.02, calibration="mm", when="start", flops=2e9),
        _bench("test_mm_rate[end]", 0.01, calibration="mm", when="end", flops=2e9),
        # copy: 1e9 bytes in 0.1 s = 10 GB/s
        _bench("test_copy_bandwidth[start]", 0.1, calibration="copy", when="start", bytes=1e9),
        # fwd+bwd: 6e7 FLOPs in 1 ms = 60 GFLOP/s = 30 % of mm; 4e7 bytes -> 40 GB/s; floor
        # max(6e7 / 2e11 = 0.3 ms, 4e7 / 1e10 = 4 ms) = 4 ms -> 0.25x floor
        _layer("efcn[cpu]", "efcn", "fwd_bwd", 1e-3, bytes_=4e7),
        _layer("conv", "anchor", "fwd_bwd", 2e-3),
        # forward: 2e7 FLOPs in 0.5 ms = 40 GFLOP/s = 20 %; 1e5 bytes; floor 0.1 ms (FLOPs) -> 5x floor
        _layer("efcn[cpu]", "efcn", "forward", 5e-4, bytes_=1e5),
        _layer("conv", "anchor", "forward", 4e-4),
    ], efcn=dict(records=dict(paired=[
        # paired fwd+bwd: eFCN 2 ms -> 30 GFLOP/s (15 %), conv 3 ms -> 20 GFLOP/s (10 %)
        dict(layer="L2", op="fwd_bwd", anchor="conv", backend="cpu", pairs=5, ratio_median=2 / 3, ratio_min=0.6,
             ratio_max=0.7, efcn_median=2e-3, anchor_median=3e-3),
    ])))


def _cells(md, start):
    line = next(ln for ln in md.splitlines() if ln.startswith(start))
    return [c.strip() for c in line.strip("|").split("|")]


def test_report_counts_three_gemms_for_forward_backward(tmp_path):
    src = tmp_path / "run.json"
    src.write_text(json.dumps(_run()))
    md = report.render(report.Run(json.loads(src.read_text())), src)
    # op | implementation | median | IQR | rounds | x conv | GFLOP/s | % mm | GB/s | x floor
    fb = _cells(md, "| fwd_bwd | **efcn[cpu]**")
    assert fb[5:] == ["0.50×", "60.0", "30%", "40.0", "0.25×"], fb
    assert _cells(md, "| fwd_bwd | conv")[5:8] == ["1.00×", "30.0", "15%"]
    fw = _cells(md, "| forward | **efcn[cpu]**")
    assert fw[5:] == ["1.25×", "40.0", "20%", "0.2", "5.00×"], fw
    # headline: the paired eFCN median (2 ms), three GEMMs
    assert _cells(md, "| cpu |")[2] == "30.0 (15%) paired"
    paired = _cells(md, "| L2 | fwd_bwd | cpu | conv |")
    assert paired[-2:] == ["30.0 (15%)", "20.0 (10%)"], paired


def test_report_recomputes_useful_flops_from_counts():
    row = dict(op="fwd_bwd", impl="efcn[cpu]", batch=BATCH, stored=STORED, conv_entries=2 * STORED, flops=1)
    assert report.Run.useful_flops(row) == 3 * 2 * BATCH * STORED  # a wrong recorded count is not trusted
    assert report.Run.useful_flops(dict(row, impl="conv")) == 3 * 2 * BATCH * 2 * STORED  # the conv's own taps
    assert report.Run.useful_flops(dict(row, op="grad_weight")) == 2 * BATCH * STORED
