"""Runs the kdpipe command line as the `kdpipe` script does, and records which kdpipe files the run imported
(in $KDPIPE_TRACE/<hash>.json, with its folder and arguments): tests/test_stage_deps.py checks them against
each DVC stage's deps."""

import atexit
import hashlib
import json
import os
import sys


def _dump():
    import kdpipe

    root = os.path.dirname(kdpipe.__file__)
    files = sorted(os.path.relpath(m.__file__, root) for m in list(sys.modules.values())
                   if (getattr(m, "__name__", None) or "").split(".")[0] == "kdpipe" and getattr(m, "__file__", None))
    record = {"cwd": os.getcwd(), "argv": sys.argv[1:], "files": files}
    key = hashlib.sha1(json.dumps(record).encode()).hexdigest()[:16]
    os.makedirs(os.environ["KDPIPE_TRACE"], exist_ok=True)
    with open(os.path.join(os.environ["KDPIPE_TRACE"], f"{key}.json"), "w") as f:
        json.dump(record, f)


if __name__ == "__main__":
    atexit.register(_dump)
    from kdpipe.cli import main

    sys.argv[0] = "kdpipe"
    main()
