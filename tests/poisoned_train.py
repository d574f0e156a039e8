"""Run by tests/test_distributed.py under torchrun: efficient_train where only process 1 sees a NaN
loss at step 2 (its gradients stay finite). Each process writes a checksum of its final weights to
OUT_DIR/weights_<rank>.txt, so the test can check that both skipped the step together.

    python -m torch.distributed.run --nproc_per_node 2 tests/poisoned_train.py OUT_DIR [efficient_train flags]
"""

import os
import sys
from pathlib import Path

import torch

from longcontrast import trainer, training

original_step, original_train, calls = trainer.contrastive_step, trainer.ContrastiveTrainer.train, []


def poisoned_step(model, *args, **kwargs):
    output = original_step(model, *args, **kwargs)
    calls.append(1)
    if len(calls) == 2 and os.environ["RANK"] == "1":
        output = output._replace(loss=torch.tensor(float("nan")))
    return output


def train_and_record(self, *args, **kwargs):
    result = original_train(self, *args, **kwargs)
    checksum = sum(p.detach().double().sum().item() for p in self.model.parameters())
    Path(sys.argv[1], f"weights_{os.environ['RANK']}.txt").write_text(repr(checksum))
    return result


trainer.contrastive_step = poisoned_step
trainer.ContrastiveTrainer.train = train_and_record
training.main(sys.argv[2:])
