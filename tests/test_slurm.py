"""`grid sbatch` against a real one-node Slurm (munged, slurmctld, slurmd started by the test):
an array job whose tasks each clone the repository, run one grid row as a DVC experiment and
push it back; a failing row is a FAILED run with its error line; a second submission runs only
what is missing."""
import sys

import pytest

from .slurm import slurm
from .test_cluster import clone

GRID = """name: sg
targets: [train]
set: {data.datasets: [mnist], data.train_limit: 200, data.test_limit: 500, train.epochs: 1,
      train.device: cpu}
columns:
  - {label: lr, param: train.lr}
  - {label: acc %, metric: test_accuracy, fmt: .2f}
rows:
  - {id: a, set: {train.lr: 0.002}}
  - {id: b, set: {train.device: cuda}}
"""


@pytest.mark.slow
def test_grid_sbatch_runs_an_array_job_on_a_real_slurm(shrunk_base, tmp_path):
    with slurm(str(tmp_path)) as senv:
        repo, storage, env, sh = clone(tmp_path, shrunk_base, "sg", GRID)
        env["SLURM_CONF"] = senv["SLURM_CONF"]
        cmd = [sys.executable, "-m", "ablation.grid", "sbatch", "grids/sg.yaml", "--dvc-remote",
               str(storage), "--wait"]
        out = sh(*cmd)
        assert "submitted array job" in out and "2 run(s) (sg-a, sg-b)" in out, out
        assert "sg-a: SUCCESS" in out and "sg-b: FAILED" in out, out
        script = next((repo / ".dvc" / "tmp" / "sbatch").glob("sg-*/job.sh")).read_text()
        assert "#SBATCH --array=0-1" in script and "#SBATCH --cpus-per-task=1" in script
        assert sh("dvc", "exp", "list", "--name-only").split() == ["sg-a"]
        sh(sys.executable, "-m", "ablation.report", "grids/sg.yaml")
        md = (repo / "reports" / "sg.md").read_text()
        # ok; marked loaded where the suite's other worker trained beside it (its record says)
        assert "| a | ok |" in md or "| a | ok, loaded (1/1) |" in md, md
        assert "FAILED (1/1)" in md and "no cuda device" in md  # the task's own error line
        again = sh(*cmd)  # only the failed row goes again
        assert "skip sg-a: already success" in again and "1 run(s) (sg-b)" in again, again
