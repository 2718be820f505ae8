"""Runs the kdpipe command line as the `kdpipe` script does, and records which kdpipe files the run imported
or opened (data files such as published.yaml) in $KDPIPE_TRACE/<hash>.json, with its folder and arguments.
Not called by hand: tools/stage_deps.py puts it first on PATH as `kdpipe` (`tracing`), then checks the records
against each DVC stage's deps."""

import atexit
import hashlib
import json
import os
import sys


OPENED = set()


def _audit(event, args):
    if event == "open" and isinstance(args[0], str) and "__pycache__" not in args[0]:
        OPENED.add(os.path.abspath(args[0]))


def _dump():
    import kdpipe

    root = os.path.dirname(kdpipe.__file__)
    imported = {m.__file__ for m in list(sys.modules.values())
                if (getattr(m, "__name__", None) or "").split(".")[0] == "kdpipe" and getattr(m, "__file__", None)}
    opened = {f for f in OPENED if f.startswith(root + os.sep)}
    files = sorted(os.path.relpath(f, root) for f in imported | opened)
    record = {"cwd": os.getcwd(), "argv": sys.argv[1:], "files": files}
    key = hashlib.sha1(json.dumps(record).encode()).hexdigest()[:16]
    os.makedirs(os.environ["KDPIPE_TRACE"], exist_ok=True)
    with open(os.path.join(os.environ["KDPIPE_TRACE"], f"{key}.json"), "w") as f:
        json.dump(record, f)


if __name__ == "__main__":
    sys.addaudithook(_audit)
    atexit.register(_dump)
    from kdpipe.cli import main

    sys.argv[0] = "kdpipe"
    main()
