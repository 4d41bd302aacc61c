"""Translate with a checkpoint: `python translate.py ckpt_path=<run>/checkpoints/best.ckpt input=in.txt`."""

import hydra
from omegaconf import DictConfig

import seqlab  # noqa: F401  (registers the config resolvers)


@hydra.main(version_base="1.3", config_path="configs", config_name="translate")
def main(cfg: DictConfig) -> None:
    from seqlab.translate import run

    run(cfg)


if __name__ == "__main__":
    main()
