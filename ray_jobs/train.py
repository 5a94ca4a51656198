"""Entry point of the staged training job.

Run it directly (it joins a running local Ray head or starts one):

    python ray_jobs/train.py --config configs/emoji.yaml --run-name emoji-demo

or submit it to a cluster; the code travels with --working-dir, and CMACLIP_HOME tells the job
where the data, runs and MLflow store live:

    ray job submit --working-dir . \
        --runtime-env-json '{"env_vars": {"CMACLIP_HOME": "'$PWD'"}}' \
        -- python ray_jobs/train.py --config configs/emoji.yaml

Submitting a run name again resumes it (finished stages are kept, an unfinished one continues
from its latest checkpoint); `--restart` trains it anew.
"""

import sys
from pathlib import Path

# the uploaded working dir is the job's cwd; make the package importable without an install
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cmaclip.cli import main  # noqa: E402

if __name__ == "__main__":
    main(["train", *sys.argv[1:]])
