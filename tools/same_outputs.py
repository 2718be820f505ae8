"""Whether two runs gave the same bytes: every file under folder A against the file of the same path under B,
one line each; exits non-zero if any differs. Usage: python tools/same_outputs.py A B"""

import sys
from pathlib import Path

if __name__ == "__main__":
    a, b = map(Path, sys.argv[1:])
    bad = []
    for f in sorted(p for p in a.rglob("*") if p.is_file()):
        g = b / f.relative_to(a)
        same = g.is_file() and f.read_bytes() == g.read_bytes()  # metrics hold no timings: byte-identical too
        print(("same    " if same else "DIFFERS ") + str(f.relative_to(a)))
        bad += [] if same else [f]
    sys.exit(f"{len(bad)} outputs differ between {a} and {b}" if bad else 0)
