"""Entry point of the hyperparameter search job (the same as `cmaclip tune`).

    python tune/search.py --config configs/search-emoji.yaml
    python tune/search.py --config configs/search-emoji.yaml --resume   # after an interruption

or as a Ray job, like `ray_jobs/train.py`:

    ray job submit --working-dir . \
        --runtime-env-json '{"env_vars": {"CMACLIP_HOME": "'$PWD'"}}' \
        -- python tune/search.py --config configs/search-emoji.yaml
"""

import sys
from pathlib import Path

# the uploaded working dir is the job's cwd; make the package importable without an install
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cmaclip.cli import main  # noqa: E402

if __name__ == "__main__":
    main(["tune", *sys.argv[1:]])
