"""Sets keys of a params file as `dvc exp run -S` does (the same KEY=VALUE grammar: DVC's own code), without
running anything: for settings that must be committed before a plain `dvc repro`, e.g. in clones that each
reproduce a slice of the pipeline. Usage: python tools/set_params.py FILE KEY=VALUE ...,
e.g. `python tools/set_params.py params.yaml data.image_size=64 'methods=[kd,fsp]'`."""

import sys

from dvc.utils.hydra import apply_overrides

if __name__ == "__main__":
    apply_overrides(sys.argv[1], sys.argv[2:])
