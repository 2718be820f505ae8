"""CI's checks of the results of a smoke run, in the folder it ran in (metrics/NAME.json, models/):

    python tools/check_results.py real-images     top-1 of teacher, student and KD; the teacher beats the student
    python tools/check_results.py project SIZE    a `kdpipe init` project after one epoch: teacher, student, KD and
                                                  DKD evaluated, each exported to ONNX for 3 x SIZE x SIZE images,
                                                  the students quantized to INT8 and every file measured
    python tools/check_results.py exp-show        `dvc exp show --json` has the metrics of HEAD and of each
                                                  experiment (values, not DVC's `!` for a missing file)"""

import json
import sys


def metrics(name: str) -> dict:
    with open(f"metrics/{name}.json") as f:
        return json.load(f)


def real_images() -> None:
    m = {n: metrics(n) for n in ("teacher", "student", "kd")}
    print(f"real images: teacher {m['teacher']['top1']:.2f}, student {m['student']['top1']:.2f}, "
          f"KD {m['kd']['top1']:.2f} (Δ vs student {m['kd']['top1'] - m['student']['top1']:+.2f})")
    assert m["teacher"]["top1"] > m["student"]["top1"], "the teacher does not beat the student on real images"


RUNS, STUDENTS = ("teacher", "student", "kd", "dkd"), ("student", "kd", "dkd")


def project(size: int) -> None:
    import onnx

    for n in RUNS:
        m = metrics(n)
        assert 0 <= m["top1"] <= 100 and m["epochs"] == 1, (n, m)
    measured = metrics("measure")
    for n in (*RUNS, *(f"{s}.int8" for s in STUDENTS), "kd.qat"):
        dims = onnx.load(f"models/{n}.onnx").graph.input[0].type.tensor_type.shape.dim[1:]
        shape = [d.dim_value for d in dims]
        assert shape == [3, size, size], f"models/{n}.onnx takes {shape}, not 3x{size}x{size}"
        assert measured[n]["latency_ms_p50"] > 0, (n, measured[n])
    for s in STUDENTS:
        q = metrics(f"{s}.int8")
        print(f"{s}: fp32 {q['fp32_top1']:.2f} -> INT8 {q['top1']:.2f}; batch-1 latency "
              f"{measured[s]['latency_ms_p50']:.2f} -> {measured[s + '.int8']['latency_ms_p50']:.2f} ms")
    q = metrics("kd.qat")
    assert q["qat"]["epochs"] == 1 and q["fp32_top1"] == metrics("kd.int8")["fp32_top1"], q
    print(f"kd: QAT ({q['qat']['epochs']} epoch) -> INT8 {q['top1']:.2f}; batch-1 latency "
          f"{measured['kd.qat']['latency_ms_p50']:.2f} ms")
    print(f"project: teacher, student, KD, DKD evaluated, exported at 3x{size}x{size}, the students quantized, "
          "KD by QAT too, every file measured")


def exp_show() -> None:
    import subprocess

    rows = json.loads(subprocess.run(["dvc", "exp", "show", "--json"], capture_output=True, text=True,
                                     check=True).stdout)
    head = next(r for r in rows if r["rev"] != "workspace")
    exps = [e for r in rows for e in (r.get("experiments") or []) for e in e.get("revs", [])]
    assert exps, "dvc exp show lists no experiment"

    def values(row) -> dict:
        files = (row.get("data") or {}).get("metrics") or {}
        return {f: (m.get("data") or {}).get("top1") for f, m in files.items() if f.startswith("metrics/kd")}

    for row in (head, *exps):
        v = values(row)
        assert v and all(isinstance(x, (int, float)) for x in v.values()), (row["rev"], v, row.get("error"))
    print(f"dvc exp show: KD's metrics in HEAD ({values(head)}) and in {len(exps)} experiment(s)")


if __name__ == "__main__":
    if sys.argv[1:] == ["real-images"]:
        real_images()
    elif sys.argv[1:2] == ["project"] and len(sys.argv) == 3:
        project(int(sys.argv[2]))
    elif sys.argv[1:] == ["exp-show"]:
        exp_show()
    else:
        sys.exit(__doc__)
