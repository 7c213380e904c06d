"""The training loop and what it needs: Trainer and its parts (loss, checkpoint saver, placement / stop
policy / loop options), state, callbacks, metrics, lr schedules, optimizers, checkpoints,
torch.distributed helpers and preemption. Knows nothing of the config, the zoo or the data-set
registry: the CLI builds the parts from its config, an API user directly."""
