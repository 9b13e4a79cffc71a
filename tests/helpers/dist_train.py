"""Run under torchrun by tests/test_training.py: train a tiny model with DDP or FSDP2 and save the result.

    torchrun --nproc_per_node 2 tests/helpers/dist_train.py MODE OPTIMIZER OUT.pt [resume|compile]
"""

import sys

import torch

from t5kit.training import Trainer, TrainingArguments

sys.path.insert(0, __file__.rsplit("/", 2)[0])
from test_training import GLOBAL_BATCH, STEPS, dataset, make_model  # noqa: E402


def main() -> None:
    mode, optimizer, out = sys.argv[1], sys.argv[2], sys.argv[3]
    torch.set_num_threads(1)
    model = make_model(dropout=0.0)
    args = TrainingArguments(output_dir=out + ".d", max_steps=STEPS, batch_size=GLOBAL_BATCH // 2, optimizer=optimizer,
                             learning_rate=1e-2, save_steps=None, distributed=mode, progress_bar=False, shuffle=True,
                             torch_compile=sys.argv[4:5] == ["compile"])
    trainer = Trainer(model, args, dataset())
    if len(sys.argv) > 4 and sys.argv[4] == "resume":  # half the steps, a checkpoint, a fresh start from it
        losses = [trainer.training_step()[0] for _ in range(STEPS // 2)]
        path = trainer.save_checkpoint()
        model = make_model(dropout=0.0, seed=5)
        trainer = Trainer(model, args, dataset())
        trainer.load_checkpoint(path)
        losses += [trainer.training_step()[0] for _ in range(STEPS - STEPS // 2)]
    else:
        losses = [trainer.training_step()[0] for _ in range(STEPS)]
    full = trainer._full_model_state()
    if trainer.rank == 0:
        state = full if full is not None else {k: v.detach().clone() for k, v in model.state_dict().items()}
        torch.save({"losses": losses, "state": {k: v.cpu() for k, v in state.items()}}, out)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
