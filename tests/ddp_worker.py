"""One PPO or GRPO run with a planted reward, for `torchrun` (tests/test_train_loop.py): the planted reward cannot
cross a process boundary as a config key, so the test launches this file instead of `instar train`.

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/ddp_worker.py grpo DB key=value ...
"""

import sys

from instar.datasets.store import Store
from instar.train import load_stage_config, stage_module
from instar.train.models import load_model


def main(stage: str, db: str, *sets: str) -> None:
    from test_pref_stages import planted_scorer
    from train_fixtures import planted_math_score

    cfg = load_stage_config(stage, None, list(sets))
    if stage == "ppo":
        stage_module(stage).run(cfg, Store.open(db), scorer=planted_scorer(load_model(cfg.model)[1]))
    else:
        stage_module(stage).run(cfg, Store.open(db), scorer=planted_math_score)


if __name__ == "__main__":
    main(*sys.argv[1:])
