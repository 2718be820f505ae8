"""Each DVC stage depends on exactly the kdpipe files its command imports or opens, as traced while the stages ran
(tools/trace_kdpipe.py): then an edit anywhere in the code or data that decides a stage's results re-runs it, and
an edit elsewhere does not. cli.py (argument parsing) and the package's top __init__.py are exempt.

    python tools/stage_deps.py run TRACES COMMAND ...     COMMAND (e.g. `dvc repro`) with each `kdpipe` it
                                                          starts traced, into the folder TRACES
    python tools/stage_deps.py check PROJECT [TRACES ...] PROJECT's stages against those traces (default: the
                                                          folder `<repository>-traces` beside its repository)

tests/test_stage_deps.py runs the check on the projects the tests reproduce."""

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

EXEMPT = {"__init__.py", "__main__.py", "cli.py"}  # the package top and argument parsing


def tracing(traces: Path) -> dict:
    """Env under which each `kdpipe` command records the kdpipe files it imports (trace_kdpipe.py) in the folder
    `traces`."""
    bin_dir = traces / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    script = bin_dir / "kdpipe"
    script.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{Path(__file__).with_name("trace_kdpipe.py")}" "$@"\n')
    script.chmod(0o755)
    return {"PATH": f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}", "KDPIPE_TRACE": str(traces)}


def code_deps(stage, kdpipe_dir: Path) -> list[str]:
    rel = [os.path.relpath(d.fs_path, kdpipe_dir) for d in stage.deps]
    return [r for r in rel if not r.startswith("..")]


def traced_stages(project: Path, traces: list[Path] | None = None) -> list[tuple[str, set[str], list[str]]]:
    """(stage name, kdpipe files its command imported, its kdpipe deps) for every stage of `project`, from the
    records in `traces` (default: the repository's `<repo>-traces`; several folders: clones of one repository
    that ran disjoint slices of the stages, matched by the stage's folder within its clone)."""
    from dvc.repo import Repo

    root = next(p for p in [project, *project.parents] if (p / "kdpipe").is_dir())
    records = [json.loads(f.read_text()) for d in (traces or [root.with_name(root.name + "-traces")])
               for f in d.glob("*.json")]
    out = []
    with Repo(str(project)) as repo:
        for stage in repo.index.stages:
            argv = shlex.split(stage.cmd)[1:]
            where = Path(stage.wdir).relative_to(root).parts
            runs = [r for r in records if r["argv"] == argv and Path(r["cwd"]).parts[len(Path(r["cwd"]).parts) - len(where):] == where]
            assert runs, f"{stage.name}: its command never ran under the tracer"
            out.append((stage.name, set(runs[0]["files"]) - EXEMPT, code_deps(stage, root / "kdpipe")))
    return out


def check(project: Path, traces: list[Path] | None = None) -> int:
    """The number of `project`'s stages; AssertionError naming each stage whose deps differ from its imports."""
    problems = []
    stages = traced_stages(project, traces)
    for name, imported, deps in stages:
        def covers(dep, f):
            return f == dep or f.startswith(dep.rstrip("/") + "/")
        missing = sorted(f for f in imported if not any(covers(d, f) for d in deps))
        unused = sorted(d for d in deps if not any(covers(d, f) for f in imported))
        if missing or unused:
            problems.append(f"{name}: imports but does not depend on {missing}; depends on but never imports {unused}")
    assert not problems, "\n".join(problems)
    return len(stages)


def main(args: list[str]):
    if len(args) < 2 or args[0] not in ("run", "check"):
        return __doc__
    what, where, *rest = args
    if what == "run":
        return subprocess.run(rest, env={**os.environ, **tracing(Path(where).absolute())}).returncode
    try:
        n = check(Path(where).resolve(), [Path(t) for t in rest] or None)
    except AssertionError as e:
        return f"{where}: stage deps differ from the traced imports:\n{e}"
    print(f"{n} stages of {Path(where).resolve()}, each depending on exactly the kdpipe files it imports")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
