"""Layer 3, stages: what dvc.yaml runs (prepare, train, svm): read params, call the engine, write
the outputs.
"""
import importlib.util
import sys

if importlib.util.find_spec("torch") is None:  # the base install reads records; stages train
    sys.stderr.write("error: torch is not installed in this environment: the stages need the "
                     "train extra (make install, or pip install -e '.[train]')\n")
    raise SystemExit(2)
