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

# the package top, argument parsing, and the check that a `kdpipe init` project's record names the installed code
EXEMPT = {"__init__.py", "__main__.py", "cli.py", "project.py"}


def tracing(traces: Path) -> dict:
    """Env under which each `kdpipe` command records the kdpipe files it imports (trace_kdpipe.py) in the folder
    `traces`."""
    bin_dir = traces / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    script = bin_dir / "kdpipe"
    script.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{Path(__file__).with_name("trace_kdpipe.py")}" "$@"\n')
    script.chmod(0o755)
    return {"PATH": f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}", "KDPIPE_TRACE": str(traces)}


def code_deps(stage, kdpipe_dir: Path | None) -> list[str]:
    """The kdpipe files (relative to the package) a stage depends on: by path (this repository's projects) or by
    its keys of kdpipe-code.yaml (a `kdpipe init` project: kdpipe.project.code_files says what each key covers)."""
    from kdpipe.project import CODE_FILE, code_files

    files = []
    for d in stage.deps:
        if Path(getattr(d, "def_path", "")).name == CODE_FILE:
            files += [f for key in d.params for f in code_files(*key.split(".", 1))]
        elif kdpipe_dir is not None and not os.path.relpath(d.fs_path, kdpipe_dir).startswith(".."):
            files.append(os.path.relpath(d.fs_path, kdpipe_dir))
    return files


def root_of(project: Path) -> Path | None:
    """The repository holding kdpipe's source, for its own projects; None for a `kdpipe init` project elsewhere."""
    return next((p for p in [project, *project.parents] if (p / "kdpipe").is_dir()), None)


# the commands that run a method of their own (`kdpipe qat` fine-tunes with KD's loss)
COMMAND_METHODS = {"qat": ["kd"], "wkd-cost": ["wkd"]}


def validation_only(argv: list[str]) -> set[str]:
    """What a stage running `kdpipe argv` imports only to validate the params file (kdpipe.project.VALIDATION_ONLY),
    less the files of the methods it runs (`--method`/`-m`, methods combined with +; COMMAND_METHODS), whose results
    they decide."""
    from kdpipe import config
    from kdpipe.project import VALIDATION_ONLY

    specs = [v for flag, v in zip(argv, argv[1:]) if flag in ("--method", "-m")] + COMMAND_METHODS.get(argv[0], [])
    own = {f"distill/{m}.py" for spec in specs for m in spec.split("+") if m in config.METHODS}
    return VALIDATION_ONLY - own


def traced_stages(project: Path, traces: list[Path] | None = None) -> list[tuple[str, set[str], list[str], bool, set[str]]]:
    """(stage name, kdpipe files its command imported, its kdpipe deps, whether they are kdpipe-code.yaml keys, the
    imported files it need not depend on)
    for every stage of `project`, from the
    records in `traces` (default: the repository's `<repo>-traces`; several folders: clones of one repository
    that ran disjoint slices of the stages, matched by the stage's folder within its clone)."""
    from dvc.repo import Repo

    root = root_of(project)
    records = [json.loads(f.read_text()) for d in (traces or [(root or project).with_name((root or project).name + "-traces")])
               for f in d.glob("*.json")]
    out = []
    with Repo(str(project)) as repo:
        for stage in repo.index.stages:
            argv = shlex.split(stage.cmd)[1:]
            where = Path(stage.wdir).relative_to(root or project).parts
            runs = [r for r in records if r["argv"] == argv and Path(r["cwd"]).parts[len(Path(r["cwd"]).parts) - len(where):] == where]
            assert runs, f"{stage.name}: its command never ran under the tracer"
            by_key = any(Path(getattr(d, "def_path", "")).name == "kdpipe-code.yaml" for d in stage.deps)
            out.append((stage.name, set(runs[0]["files"]) - EXEMPT, code_deps(stage, root and root / "kdpipe"), by_key,
                        validation_only(argv)))
    return out


def check(project: Path, traces: list[Path] | None = None) -> int:
    """The number of `project`'s stages; AssertionError naming each stage whose deps differ from its imports."""
    problems = []
    stages = traced_stages(project, traces)
    for name, imported, deps, by_key, validation in stages:
        def covers(dep, f):
            return f == dep or f.startswith(dep.rstrip("/") + "/")
        # what a stage imports only to validate the params file (the schemas of other stages' kinds and methods)
        # need not be among its deps
        missing = sorted(f for f in imported if not any(covers(d, f) for d in deps) and f not in validation)
        # a kdpipe-code.yaml key covers every model family file: the params may name any model library
        unused = sorted(d for d in deps if not any(covers(d, f) for f in imported)
                        and not (by_key and d.startswith("models/")))
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
