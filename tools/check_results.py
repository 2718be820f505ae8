"""CI's checks of the results of a smoke run, in the folder it ran in (metrics/NAME.json, models/):

    python tools/check_results.py real-images     top-1 of teacher, student and KD; the teacher beats the student
    python tools/check_results.py compress SIZE   teacher, student, KD and DKD evaluated after one epoch, and the
                                                  best student exported to ONNX for 3 x SIZE x SIZE images"""

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


def compress(size: int) -> None:
    import onnx

    dims = onnx.load("models/best-student.onnx").graph.input[0].type.tensor_type.shape.dim[1:]
    shape = [d.dim_value for d in dims]
    assert shape == [3, size, size], f"the exported student takes {shape}, not 3x{size}x{size}"
    for n in ("teacher", "student", "kd", "dkd"):
        m = metrics(n)
        assert 0 <= m["top1"] <= 100 and m["epochs"] == 1, (n, m)
    print(f"compress example: teacher, student, KD, DKD evaluated; best student exported at 3x{size}x{size} "
          "with ONNX parity")


if __name__ == "__main__":
    if sys.argv[1:] == ["real-images"]:
        real_images()
    elif sys.argv[1:2] == ["compress"] and len(sys.argv) == 3:
        compress(int(sys.argv[2]))
    else:
        sys.exit(__doc__)
