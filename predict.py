"""Predict with a classification or forecasting checkpoint: `python predict.py ckpt_path=<run>/checkpoints/best.ckpt [input=...]`."""

import hydra
from omegaconf import DictConfig

import seqlab  # noqa: F401  (registers the config resolvers)


@hydra.main(version_base="1.3", config_path="configs", config_name="predict")
def main(cfg: DictConfig) -> None:
    from seqlab.predict import run

    run(cfg)


if __name__ == "__main__":
    main()
