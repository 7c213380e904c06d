import torch

from bitrain.train.metrics import EpochMetrics


def test_exact_over_all_samples_not_mean_of_batch_means():
    m = EpochMetrics()
    # batch 1: 3 samples, 2 right at top-1; batch 2: 1 sample, wrong
    logits1 = torch.tensor([[5.0, 1, 0, 0, 0, 0], [0, 5.0, 1, 0, 0, 0], [0, 1, 5.0, 0, 0, 0]])
    m.update(logits1, torch.tensor([0, 1, 1]), torch.tensor(3.0))
    logits2 = torch.tensor([[6.0, 5, 4, 3, 2, 1]])
    m.update(logits2, torch.tensor([5]), torch.tensor(5.0))
    r = m.compute()
    assert r["samples"] == 4
    assert r["acc1"] == 2 / 4  # a mean of batch means would say (2/3 + 0) / 2
    # top-5: sample 3 (label 1, rank 2) and... sample 4's label 5 is rank 6 -> miss
    assert r["acc5"] == 3 / 4
    assert r["loss"] == (3.0 + 5.0) / 4


def test_reset_and_state_round_trip():
    m = EpochMetrics()
    m.update(torch.eye(3), torch.tensor([0, 1, 2]), torch.tensor(1.5))
    state = m.state_dict()
    m2 = EpochMetrics()
    m2.load_state_dict(state)
    assert m2.compute() == m.compute()
    m.reset()
    assert m.compute()["samples"] == 0


def test_top5_with_fewer_than_five_classes():
    m = EpochMetrics()
    m.update(torch.tensor([[0.0, 1.0], [1.0, 0.0]]), torch.tensor([0, 0]), torch.tensor(0.0))
    r = m.compute()
    assert r["acc1"] == 0.5 and r["acc5"] == 1.0
