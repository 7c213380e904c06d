"""The training loop and what it needs: Trainer, state, callbacks, metrics, lr schedules, optimizers,
mixup, checkpoints, torch.distributed helpers and preemption. Knows nothing of the config, the zoo or
the data-set registry: everything comes in as flat keyword arguments."""
