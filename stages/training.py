"""What both trainers share: logging to dvclive from the transformers Trainer."""
from dvclive import Live
from transformers.integrations import DVCLiveCallback


def dvclive_callback(directory: str) -> DVCLiveCallback:
    # dvcyaml=None: dvclive must not rewrite our dvc.yaml; metrics and plots are declared there by hand.
    # save_dvc_exp=False: the stage runs inside `dvc repro` / `dvc exp run`, which own the experiment.
    return DVCLiveCallback(live=Live(directory, dvcyaml=None, save_dvc_exp=False))
