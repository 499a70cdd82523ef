"""PPO and GRPO runs with a planted reward, for `torchrun` (tests/test_train_loop.py): the planted reward cannot
cross a process boundary as a config key, so the test launches this file instead of `instar train`. One launch
runs every job of JOBS.json in turn (a torchrun start costs more than a tiny run).

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/ddp_worker.py DB JOBS.json
    JOBS.json: [["ppo", ["model=...", "out=...", ...]], ["grpo", [...]]]
"""

import json
import sys

from instar.datasets.store import Store
from instar.train import load_stage_config, stage_module
from instar.train.models import load_model


def main(db: str, jobs: str) -> None:
    from test_pref_stages import planted_scorer
    from train_fixtures import planted_math_score

    for stage, sets in json.loads(open(jobs).read()):
        cfg = load_stage_config(stage, None, sets)
        scorer = planted_scorer(load_model(cfg.model)[1]) if stage == "ppo" else planted_math_score
        stage_module(stage).run(cfg, Store.open(db), scorer=scorer)


if __name__ == "__main__":
    main(*sys.argv[1:])
