"""Train a backbone on a task: `python train.py [group=option ...]`; `--help` lists the options."""

import hydra
from omegaconf import DictConfig

import seqlab  # noqa: F401  (registers the config resolvers)


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    # heavy imports after Hydra has set up logging, so Lightning logs into the run's log file
    from seqlab.train import run

    return run(cfg)


if __name__ == "__main__":
    main()
