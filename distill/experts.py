"""Expert trajectories: train a network on the real data and keep its parameters after every epoch.

Trajectory matching (MTT) needs, per expert, the flat parameter vector θ*_t for t = 0…E (epoch 0 is
the initialisation): one float32 ``[E+1, P]`` tensor plus the parameter layout. The same training
run also yields the raw material of two difficulty scores at no extra cost:

* per-sample correctness at every presentation (one presentation per epoch) → forgetting counts;
* per-sample EL2N ‖softmax(f(x)) − onehot(y)‖₂ on un-augmented data after ``experts.el2n_epoch``.

Everything is a pure function of (run seed, expert id): model initialisation, shuffling and
augmentation draw from generators derived from those two numbers, and the CPU thread count is set
from the task's CPU budget, so an expert trained in-process and one trained on a Ray worker are
bitwise identical on CPU. Nothing here imports Ray; ``launch/experts.py`` schedules the tasks.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from distill.augment import DSA, training_dsa
from distill.config import RunConfig
from distill.data import Dataset
from distill.models import build_model, eval_outputs
from distill.params import ParamLayout
from distill.rng import EXPERT_AUGMENT, EXPERT_INIT, EXPERT_SHUFFLE, seeded
from distill.runtime import cpu_threads

log = logging.getLogger(__name__)


@dataclass
class ExpertResult:
    """One trained expert, as saved to ``experts/expert_XXXX.pt``."""

    expert_id: int
    trajectory: torch.Tensor          # float32 [E+1, P]; row t = parameters after epoch t
    layout: ParamLayout
    correct: torch.Tensor             # bool [E, N_train]; minibatch prediction correct at epoch e
    el2n: torch.Tensor                # float32 [N_train] after experts.el2n_epoch, un-augmented
    test_acc: list[float] = field(default_factory=list)   # after each epoch 1…E
    train_loss: list[float] = field(default_factory=list)  # mean over each epoch
    seconds: float = 0.0

    def to_state(self) -> dict:
        return {
            "expert_id": self.expert_id,
            "trajectory": self.trajectory,
            "layout": self.layout.to_dict(),
            "correct": self.correct,
            "el2n": self.el2n,
            "test_acc": self.test_acc,
            "train_loss": self.train_loss,
        }  # not the training time (the manifest has it): same expert, same bytes, same sha256

    @classmethod
    def from_state(cls, state: dict) -> ExpertResult:
        return cls(expert_id=int(state["expert_id"]), trajectory=state["trajectory"],
                   layout=ParamLayout.from_dict(state["layout"]), correct=state["correct"],
                   el2n=state["el2n"], test_acc=list(state["test_acc"]),
                   train_loss=list(state["train_loss"]), seconds=float(state.get("seconds", 0.0)))


def build_network(cfg: RunConfig, ds: Dataset) -> torch.nn.Module:
    """The expert/student network of ``cfg.model`` for dataset ``ds``."""
    c, h, _ = ds.info.image_shape
    return build_model(cfg.model.name, in_channels=c, num_classes=ds.info.num_classes,
                       image_size=h, width=cfg.model.width, depth=cfg.model.depth,
                       norm=cfg.model.norm)


def _init_model(cfg: RunConfig, ds: Dataset, expert_id: int, device: torch.device) -> torch.nn.Module:
    with seeded(EXPERT_INIT.generator(cfg.seed, expert_id)):
        model = build_network(cfg, ds)
    return model.to(device)


def evaluate_accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                      batch_size: int = 1024) -> float:
    """Top-1 accuracy in eval mode (running BN statistics)."""
    hits = eval_outputs(model, x, lambda out, start: int(
        (out.argmax(1).cpu() == y[start:start + batch_size]).sum()), batch_size=batch_size)
    return sum(hits) / max(1, len(x))


def el2n_scores(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int,
                batch_size: int = 1024) -> torch.Tensor:
    """‖softmax(f(x)) − onehot(y)‖₂ per sample, eval mode, no augmentation."""

    def el2n(out: torch.Tensor, start: int) -> torch.Tensor:
        prob = out.softmax(1)
        onehot = F.one_hot(y[start:start + batch_size].to(out.device), num_classes)
        return (prob - onehot.to(prob.dtype)).norm(dim=1).float().cpu()

    return torch.cat(eval_outputs(model, x, el2n, batch_size=batch_size))


def train_expert(cfg: RunConfig, ds: Dataset, expert_id: int, *, device: str | torch.device = "cpu",
                 progress: bool = False) -> ExpertResult:
    """Train expert ``expert_id`` for ``cfg.experts.epochs`` epochs (deterministic per seed and id)."""
    ex = cfg.experts
    device = torch.device(device)
    start_time = time.perf_counter()
    with cpu_threads(int(ex.num_cpus)):
        model = _init_model(cfg, ds, expert_id, device)
        model.train()
        layout = ParamLayout.of(model)
        opt = torch.optim.SGD(model.parameters(), lr=ex.lr, momentum=ex.momentum,
                              weight_decay=ex.weight_decay)
        dsa = training_dsa(ex.augment)
        x_train, y_train = ds.x_train.to(device), ds.y_train.to(device)
        n = len(y_train)
        trajectory = torch.empty(ex.epochs + 1, layout.numel, dtype=torch.float32)
        trajectory[0] = layout.flatten(model).detach().float().cpu()
        correct = torch.zeros(ex.epochs, n, dtype=torch.bool)
        el2n = torch.zeros(n)
        result = ExpertResult(expert_id, trajectory, layout, correct, el2n)
        bar = tqdm(range(ex.epochs), desc=f"expert {expert_id}", disable=not progress, leave=False)
        for epoch in bar:
            loss = _train_epoch(model, opt, x_train, y_train, dsa, cfg, expert_id, epoch,
                                correct[epoch])
            trajectory[epoch + 1] = layout.flatten(model).detach().float().cpu()
            result.train_loss.append(loss)
            result.test_acc.append(evaluate_accuracy(model, ds.x_test, ds.y_test))
            if epoch + 1 == ex.el2n_epoch:
                el2n.copy_(el2n_scores(model, ds.x_train, ds.y_train, ds.info.num_classes))
            bar.set_postfix(loss=f"{loss:.3f}", test_acc=f"{result.test_acc[-1]:.3f}")
    result.seconds = time.perf_counter() - start_time
    return result


def _train_epoch(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor,
                 y: torch.Tensor, dsa: DSA | None, cfg: RunConfig, expert_id: int, epoch: int,
                 correct_out: torch.Tensor) -> float:
    """One pass over the shuffled training set; records per-sample minibatch correctness."""
    bs = cfg.experts.batch_size
    n = len(y)
    order = torch.randperm(n, generator=EXPERT_SHUFFLE.generator(cfg.seed, expert_id, epoch))
    total, count = 0.0, 0
    for step, start in enumerate(range(0, n, bs)):
        idx = order[start:start + bs]
        xb, yb = x[idx.to(x.device)], y[idx.to(y.device)]
        if dsa is not None:
            gen = EXPERT_AUGMENT.generator(cfg.seed, expert_id, epoch, step)
            xb, _ = dsa(xb, gen)
        out = model(xb)
        loss = F.cross_entropy(out, yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        correct_out[idx] = (out.detach().argmax(1) == yb).cpu()
        total += float(loss.detach()) * len(idx)
        count += len(idx)
    return total / max(1, count)


# --------------------------------------------------------------------------------------------
# Difficulty scores from experts (pure functions of the correctness tables)
# --------------------------------------------------------------------------------------------


def forgetting_counts(correct: torch.Tensor) -> torch.Tensor:
    """Forgetting events per sample from a ``[E, N]`` correctness table of one expert.

    An event is correct → incorrect between consecutive presentations; a sample never classified
    correctly gets E (it is harder than any sample that was learned, however often forgotten).
    """
    correct = correct.bool()
    events = (correct[:-1] & ~correct[1:]).sum(0).float()
    never = ~correct.any(0)
    return torch.where(never, torch.full_like(events, float(correct.shape[0])), events)


def expert_network(cfg: RunConfig, ds: Dataset, expert: ExpertResult, *, epoch: int = -1,
                   device: str | torch.device = "cpu", batch_size: int = 1024) -> torch.nn.Module:
    """The expert's network at ``epoch`` (default: final), in eval mode, ready for inference.

    Trajectories store parameters only; BatchNorm's running statistics are re-estimated with one
    pass over the (un-augmented) training data in train mode with cumulative averaging.
    """
    model = build_network(cfg, ds).to(device)
    params = expert.layout.unflatten(expert.trajectory[epoch].to(device))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(params[name])
        bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the pass
        if bns:
            model.train()
            for start in range(0, len(ds.x_train), batch_size):
                model(ds.x_train[start:start + batch_size].to(device))
    return model.eval()
