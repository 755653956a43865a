"""`flaminko train` as the command runs it, under whatever launcher started this script (accelerate
launch, torchrun, or none), followed by the run's record for test_equal_to_one_process.py: the loss of
every step, the names of the trainable parameters, the whole final state dict (gathered from every
process under DeepSpeed ZeRO-3) and the trained model's greedy tokens for GREEDY_PROMPT on a red
square, written by the main process. KILL_AT > 0: each process sends itself a SIGKILL at the end of
that step, as from outside.

    accelerate launch --config_file CONFIG tests/train_worker.py RECORD.pt KILL_AT [flaminko train options]
"""

import os
import signal
import sys

import torch
from PIL import Image
from transformers import TrainerCallback
from transformers.integrations import is_deepspeed_zero3_enabled

from flaminko import training
from flaminko.training import parse_arguments, train, whole_state_dict

GREEDY_PROMPT = "<image>"
NEW_TOKENS = 6


class KillAtStep(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def greedy_tokens(model, processor) -> list[int]:
    """Every process generates (under ZeRO-3 each forward gathers the weights from all of them)."""
    batch = processor(text=GREEDY_PROMPT, images=[Image.new("RGB", (32, 32), "red")], return_tensors="pt")
    model.eval()
    with torch.no_grad():
        tokens = model.generate(**batch, max_new_tokens=NEW_TOKENS, do_sample=False, synced_gpus=is_deepspeed_zero3_enabled())
    return tokens[0].tolist()


def main(record, kill_at, *argv):
    if int(kill_at) > 0:
        start = training.FlaminkoTrainer.__init__

        def with_kill(self, *arguments, **keywords):
            start(self, *arguments, **keywords)
            self.add_callback(KillAtStep(int(kill_at)))

        training.FlaminkoTrainer.__init__ = with_kill
    trainer, _ = train(*parse_arguments(list(argv)))
    state = whole_state_dict(trainer.model)
    tokens = greedy_tokens(trainer.model, trainer.processing_class)
    if not trainer.is_world_process_zero():
        return
    if state is None:
        state = trainer.model.state_dict()
    torch.save(
        {
            "losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
            "trainable": sorted(name for name, p in trainer.model.named_parameters() if p.requires_grad),
            "state": {name: tensor.detach().cpu().clone() for name, tensor in state.items()},
            "greedy_tokens": tokens,
        },
        record,
    )


if __name__ == "__main__":
    main(*sys.argv[1:])
