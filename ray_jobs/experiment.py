"""Entry point of the experiment jobs: `ablation` (the paper's table) and `noise` (robustness).

    ray job submit --working-dir . \
        --runtime-env-json '{"env_vars": {"CMACLIP_HOME": "'$PWD'"}}' \
        -- python ray_jobs/experiment.py ablation --config configs/emoji.yaml

The driver runs in the job; each CMA-CLIP variant's stages are Ray Train fits on the cluster.
"""

import sys
from pathlib import Path

# the uploaded working dir is the job's cwd; make the package importable without an install
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cmaclip.cli import main  # noqa: E402

if __name__ == "__main__":
    main(["experiment", *sys.argv[1:]])
