"""Helpers of CI (.ci/run, .ci/imagenet-smoke) and the tests: each a small script, `python tools/NAME.py ARGS`
(its docstring says how); the tests import stage_deps and stand_in_teacher from here."""
