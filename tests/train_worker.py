"""`flaminko train` as the command runs it, under whatever launcher started this script (accelerate
launch, torchrun, or none), followed by the run's record for test_equal_to_one_process.py: the loss of
every step, the names of the trainable parameters and the whole final state dict (gathered from every
process under DeepSpeed ZeRO-3), written by the main process.

    accelerate launch --config_file CONFIG tests/train_worker.py RECORD.pt [flaminko train options]
"""

import sys

import torch

from flaminko.training import parse_arguments, train, whole_state_dict


def main(record, *argv):
    trainer, _ = train(*parse_arguments(list(argv)))
    state = whole_state_dict(trainer.model)
    if not trainer.is_world_process_zero():
        return
    if state is None:
        state = trainer.model.state_dict()
    torch.save(
        {
            "losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
            "trainable": sorted(name for name, p in trainer.model.named_parameters() if p.requires_grad),
            "state": {name: tensor.detach().cpu().clone() for name, tensor in state.items()},
        },
        record,
    )


if __name__ == "__main__":
    main(*sys.argv[1:])
