"""Experts on real Fashion-MNIST files: they learn, and forgetting scores mean something.

Marked slow (about a minute on 2 cores): a 3,000-image subset, 3 experts x 5 epochs.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from distill.config_io import from_dict
from distill.experts import build_network, el2n_scores, train_expert
from distill.scores import from_experts
from distill.data import load_configured

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not os.path.isdir("/usr/share/datasets/fashion-mnist"),
                       reason="needs apt-get install -y dataset-fashion-mnist"),
]


def test_fmnist_experts_learn_and_forgetting_ranks_difficulty():
    cfg = from_dict({
        "data": {"name": "fashion_mnist", "train_per_class": 300},
        "model": {"name": "convnet", "width": 32, "depth": 3},
        "experts": {"num_experts": 3, "epochs": 5, "lr": 0.05, "batch_size": 128,
                    "el2n_epoch": 1, "num_cpus": 2},
        "select": {"ipc": 10},
        "distill": {"max_start_epoch": 2, "expert_epochs": 2},
    })
    ds = load_configured(cfg.data)
    experts = [train_expert(cfg, ds, i) for i in range(3)]
    for e in experts:
        # accuracy rises: the last two epochs beat the first clearly
        assert np.mean(e.test_acc[-2:]) > e.test_acc[0] + 0.02, e.test_acc
        assert e.test_acc[-1] > 0.6, e.test_acc

    # Scores from experts 0 and 1; expert 2 is a held-out judge that never saw these scores.
    scores = from_experts("forgetting", experts[:2])
    hardness = scores.hardness()
    order = np.lexsort((np.arange(len(hardness)), -hardness))  # hardest first, ties by index
    k = len(order) // 10
    judge = build_network(cfg, ds)
    params = experts[2].layout.unflatten(experts[2].trajectory[-1])
    with torch.no_grad():
        for name, p in judge.named_parameters():
            p.copy_(params[name])
    # eval-mode BN needs running statistics for the final parameters: one pass in train mode
    judge.train()
    with torch.no_grad():
        judge(ds.x_train)
    judge.eval()
    with torch.no_grad():
        pred = judge(ds.x_train).argmax(1)
    correct = (pred == ds.y_train).float().numpy()
    hard_acc, easy_acc = correct[order[:k]].mean(), correct[order[-k:]].mean()
    print(f"held-out expert accuracy: hardest 10% {hard_acc:.3f}, easiest 10% {easy_acc:.3f}")
    assert hard_acc < easy_acc - 0.2
    # EL2N of the judge agrees in direction too
    el2n = el2n_scores(judge, ds.x_train, ds.y_train, ds.info.num_classes).numpy()
    assert el2n[order[:k]].mean() > el2n[order[-k:]].mean()
