"""One process of a torchrun-style job that trains several short runs one after another
(tests/test_data_parallel.py, tests/test_every_algorithm_data_parallel.py): starting processes costs
more than these runs do. The first run that fails ends the job.

    python tests/data_parallel_worker.py JOBS_JSON   # [{"port": P, "overrides": [...]}, ...]

Each job is `ssl_imwa.run.run` on the composed config, with its own rendezvous port, since a
finished run closes its process group. The environment says RANK, WORLD_SIZE, MASTER_ADDR.
"""
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ssl_imwa.run import run
from tests.utils import compose_config

for job in json.loads(sys.argv[1]):
    os.environ["MASTER_PORT"] = str(job["port"])
    overrides = job["overrides"]
    run_dir = next(item.split("=", 1)[1] for item in overrides if item.startswith("run_dir="))
    run(compose_config([item for item in overrides if not item.startswith("run_dir=")], run_dir), overrides)
