"""Typed run configuration: one keyword-only dataclass per stage inside :class:`RunConfig`.

Why dataclasses and not a free-form dict: every field has a type, a default and a docstring, the
validation can name the exact field that is wrong, and a typo in a YAML file or an override is an
error instead of a silently ignored key.

This module is a leaf: it imports nothing of the project, so every module may import it. The
layers above it: distill/validation.py checks a config (every problem at once, each naming the
field, the value and what is allowed, in one :class:`ConfigError`) and distill/config_io.py
loads one (defaults <- YAML file <- dotted overrides such as ``--distill.alpha 0.3``), validates
and saves it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """A configuration problem; ``problems`` holds one line per bad field."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid configuration ({len(self.problems)} problem(s)):\n{lines}")


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class DataConfig:
    name: str = "digits"
    """Dataset registry name (``selmatch data list`` shows them)."""
    root: str | None = None
    """Where the files are (local path or fsspec URL); None = the dataset's default location."""
    download: bool = False
    """Allow torchvision to download missing files (needs internet)."""
    train_per_class: int | None = None
    """Keep only the first k training samples of each class (quick CPU runs); None = all."""
    options: dict[str, Any] = field(default_factory=dict)
    """Dataset-specific options (e.g. the ``synthetic`` generator's sizes)."""


@dataclass(kw_only=True)
class ModelConfig:
    name: str = "convnet"
    """Expert and student network for trajectory matching (registry name)."""
    width: int = 128
    """ConvNet channel width."""
    depth: int | None = None
    """ConvNet depth; None = 3 for images up to 32 px, 4 for 64 px."""
    norm: str = "batch"
    """Normalisation layer: batch, instance, group or none."""


@dataclass(kw_only=True)
class ExpertConfig:
    num_experts: int = 10
    """Number of expert trajectories to train."""
    epochs: int = 50
    """Training epochs per expert (E); parameters are saved after every epoch."""
    lr: float = 0.01
    """Expert SGD learning rate (also the default starting value of the student lr)."""
    momentum: float = 0.0
    """Expert SGD momentum (MTT uses plain SGD)."""
    weight_decay: float = 0.0
    """Expert SGD weight decay."""
    batch_size: int = 256
    """Expert minibatch size."""
    augment: str = "dsa"
    """Augmentation of real data while training experts: dsa or none."""
    el2n_epoch: int = 2
    """Epoch after which EL2N is measured on un-augmented training data (1..epochs)."""
    num_cpus: float = 1.0
    """Ray resources per expert task: CPUs."""
    num_gpus: float = 0.0
    """Ray resources per expert task: GPUs (fractional values share a GPU)."""


@dataclass(kw_only=True)
class ScoresConfig:
    kind: str = "forgetting"
    """Difficulty score: forgetting, el2n or cscore."""
    file: str | None = None
    """Import scores from this .npy/.npz path or fsspec URL instead of computing them from experts."""
    key: str = "scores"
    """Array name inside an .npz file."""
    topk: str = "forgetting"
    """Score of the top-k baseline row (the paper's Table 1 "Forgetting": the IPC samples with the
    most forgetting events per class). Taken from ``scores.topk_file`` when set, else the run's own
    scores when ``scores.kind`` is the same, else computed from the experts; the report's row is
    labelled with the score actually used."""
    topk_file: str | None = None
    """File with the ``scores.topk`` values (e.g. configs/scores/forgetting_CIFAR10.npy, the
    release's forgetting scores); None = the run's scores or the experts."""


@dataclass(kw_only=True)
class SelectConfig:
    ipc: int = 10
    """Synthetic images per class."""
    beta: float | None = None
    """Window start as a fraction of each class's difficulty-sorted pool (0 = hardest end).
    None = the β the window search chose on the validation split (``selmatch window``, run by
    ``selmatch run``): the paper's initial set is the best window the search finds. A number
    pins the window there (the paper's Table 5 configs pin its tuned values)."""
    init: str = "auto"
    """Where SelMatch's synthetic set starts. auto: with select.beta null, the window search's
    decision: its best window, or the random subset of the same class balance when no window
    beats that subset on validation beyond the noise (docs/search.md); with select.beta set, the
    window there. window: always a window (at select.beta, or at the searched β when it is
    null). random: the random subset, pinned. topk: the IPC hardest of each class. With a
    partial update the start's harder part stays real and its easier part is distilled, for a
    random start too (ordered by the difficulty scores)."""


@dataclass(kw_only=True)
class DistillConfig:
    alpha: float = 0.5
    """Distillation portion: floor(alpha * IPC) images per class are learnable, the rest stay real."""
    iterations: int = 1000
    """Outer distillation iterations."""
    syn_steps: int = 20
    """N: student SGD steps per iteration."""
    expert_epochs: int = 2
    """M: expert epochs the N student steps are matched against."""
    max_start_epoch: int = 20
    """T+: the start epoch is drawn uniformly from [0, T+)."""
    batch_syn: int | None = None
    """|b|: synthetic images per student step; None = every image a step matches (the whole
    set; D_distill alone in merge mode), and never more than those (distill/batching.py)."""
    bn_group: int | None = None
    """g: batch-norm group size (samples normalised together); None = |b|. Must divide |b|."""
    lr_images: float = 1000.0
    """Learning rate of the synthetic images (SGD, momentum below)."""
    lr_lr: float = 1e-5
    """Learning rate of the learnable student learning rate."""
    syn_lr_init: float | None = None
    """Starting value of the learnable student learning rate. None = experts.lr, as MTT initialises
    it (Cazenavette et al. 2022: syn_lr starts at the lr that trained the experts); the released
    SelMatch code starts it at its ``lr_init`` argument instead (0.001 in its scripts). Every
    shipped Table 5 config leaves it None, i.e. 0.01 = experts.lr."""
    momentum: float = 0.5
    """Momentum of the image and learning-rate optimisers."""
    mode: str = "joint"
    """joint: match with the whole set (eq. 2); merge: distill D_distill alone, then concatenate."""
    augment: str = "dsa"
    """Augmentation of each student minibatch: dsa or none."""
    compile: str | bool = "auto"
    """How the matching step's inner steps run: on = compiled (torch.compile of the functional
    ConvNet's torch.func steps, CUDA graphs on CUDA), off = the eager reference, auto = on for
    CUDA, off on CPU (compiling costs about a minute per kernel there). Both give the same result
    to float rounding; a compiled path that fails or disagrees falls back to eager with a warning.
    (YAML reads a bare on/off as true/false; both spellings are accepted.)"""
    cuda_graphs: bool = True
    """With the compiled path on CUDA, replay each step as a CUDA graph (torch.compile's
    reduce-overhead mode); false = compiled kernels launched one by one."""
    group_ranks: int = 1
    """Ranks that share every BN group: each holds g / group_ranks rows of each group and batch
    norm sums its statistics over them (docs/distributed.md §1). Teams of this many consecutive
    ranks divide the groups among themselves, so R ranks run R / group_ranks groups at once.
    Must divide the number of ranks and g; the result does not depend on it."""
    groups_per_call: int | None = None
    """Compiled path: BN groups a rank pushes through one call; None = all of its groups in a
    step. Memory grows with the rows per call; the result does not depend on it."""
    precision: str = "auto"
    """float32 convolutions of the matching step on CUDA: tf32 (PyTorch's default for
    convolutions, what the reference code ran with) or fp32 (strict); auto = tf32 on CUDA.
    No effect on CPU. Gradient error of each against float64: docs/matching.md."""
    checkpoint_every: int = 100
    """Save a resumable checkpoint every K iterations."""
    log_every: int = 10
    """Log one line (loss, syn_lr, images/s, memory) every K iterations."""
    check_every: int = 50
    """With several ranks, compare a checksum of the images, syn_lr and optimiser momenta across
    ranks every K iterations (and at the start and end); a mismatch raises DivergedRanksError."""
    num_threads: int = 1
    """CPU intra-op threads of the matching step (torch.set_num_threads while distilling). CPU
    reductions, and so the last bits of the result, depend on the count: fixing it makes a run
    resumed under another launcher (accelerate sets 1 thread, plain python all cores) bit-identical.
    A resource, not part of what a result means: changing it does not make artifacts stale."""
    max_image_ratio: float | None = 20.0
    """Divergence guard: stop when the largest |value| of a learnable image exceeds this multiple
    of the largest |value| of the real training images (model input space). None = off."""
    max_loss_ratio: float | None = 20.0
    """Divergence guard: stop when the matching loss exceeds this multiple of its starting value
    (the mean loss of the first 5 iterations). None = off."""
    max_lr_change: float | None = 0.5
    """Divergence guard: stop when one update changes the learned student learning rate by more
    than this fraction of its value; a learned learning rate that is not positive always stops
    the run (the student would then climb its loss). The message says which distill.lr_lr
    would have kept the update within the bound. None = only the sign is checked."""


@dataclass(kw_only=True)
class EvalConfig:
    model: str = "resnet18"
    """Network trained on the synthetic set for evaluation."""
    width: int | None = None
    """ConvNet width of the evaluation network; None = model.width when eval.model is the
    distillation network's ConvNet, else 128. Other networks ignore it."""
    depth: int | None = None
    """ConvNet depth of the evaluation network; None = model.depth when eval.model is the
    distillation network's ConvNet, else the default for the image size."""
    norm: str | None = None
    """Normalisation of the evaluation network (batch, instance, group or none); None =
    model.norm for the distillation network's ConvNet, else batch (the paper's ResNet-18 "with
    batch normalization")."""
    runs: int = 5
    """Independently initialised evaluation runs (mean and std are reported)."""
    epochs: int | None = None
    """Training epochs; None = the paper's rule (25% of a 200-epoch full-data budget)."""
    lr: float = 0.1
    """SGD learning rate (cosine schedule)."""
    momentum: float = 0.9
    """SGD momentum."""
    weight_decay: float = 5e-4
    """SGD weight decay."""
    batch_size: int = 128
    """Training minibatch size."""
    num_cpus: float = 1.0
    """Resources per evaluation run (one Ray task each with `selmatch evaluate/run`): CPUs; each
    run (also of the window search and tune trials) trains with this many torch threads (at
    least 1), on Ray and in-process alike. One thread is the fastest on a shared 2-core machine
    (2 threads spin-wait: measured ~6x the CPU time per epoch under load) and makes CPU results
    independent of the launcher's thread count."""
    num_gpus: float | None = None
    """Resources per evaluation run: GPUs (fractions share a GPU; 0 = the run trains on CPU);
    None = 1 when the machine running the command has CUDA, else 0."""
    augment: str | None = None
    """None = the paper's rule per row (§5.1): DSA for every selection and distillation baseline,
    combined (DSA on distilled rows, crop+flip on selected rows) for SelMatch and the rows that
    have both parts. A value (combined, dsa, simple or none) forces it on every row (ablations)."""
    flip: bool | None = None
    """Horizontal flips in the crop + flip of real rows (the real part of combined, and simple);
    None = the dataset's default: on for flip-invariant data (CIFAR, Tiny ImageNet,
    Fashion-MNIST), off for digits, MNIST, synthetic and imagefolder (a mirrored digit is
    another shape). DSA's own flip family is not affected."""
    crop_fill: str = "black"
    """What the random crop of real rows shifts in: black (pixel value 0, what torchvision's
    RandomCrop(padding=4) does before normalisation, the subset-selection convention the paper's
    App. B.3 cites) or mean (0 in the normalised input space, i.e. the dataset's mean colour)."""
    methods: list[str] | None = None
    """Report rows to compute and evaluate (distill/methods.py lists them); None = the paper's set:
    the selection baselines, Table 3's ablation rows and SelMatch. Rows not listed are not
    computed (e.g. their distillation is skipped)."""


@dataclass(kw_only=True)
class TuneConfig:
    beta_step: float = 0.1
    """Grid step of the window-start search."""
    alpha_step: float = 0.1
    """Grid step of the distillation-portion search."""
    beta_epoch_fraction: float | None = None
    """Fraction of the evaluation epochs per beta trial; None = 0.2 for CIFAR-10, else 0.1."""
    alpha_fraction: float = 0.2
    """Distillation iterations of an alpha trial as a fraction of distill.iterations (rounded,
    at least 1). bench/results/alpha_budget.md measures how the alpha ranking changes with it."""
    alpha_iterations: int | None = None
    """Distillation iterations per alpha trial; None = tune.alpha_fraction x distill.iterations."""
    alpha_epoch_fraction: float | None = None
    """Fraction of the evaluation epochs per alpha trial; None = the beta trials' fraction."""
    val_fraction: float = 0.1
    """Share of each class's training samples held out (at random from the seed) before any
    search: every candidate of the window search and of ``selmatch tune`` selects from the rest
    and is scored on these same images, never on the test set."""
    eval_runs: int = 1
    """Evaluation runs per search point (seeded alike for every point; their mean is its metric).
    With 2 or more, the spread between training seeds is part of each comparison's noise."""
    beta_bound: float | None = None
    """Largest beta to try, e.g. the optimum at a smaller IPC (optima only decrease as IPC grows)."""
    alpha_bound: float | None = None
    """Largest alpha to try, e.g. the optimum at a smaller IPC; None = up to 1."""
    beta_start: float | None = None
    """First beta to try (nearest grid value); None = the middle of the grid."""
    alpha_start: float | None = None
    """First alpha to try (nearest grid value); None = the middle of the grid."""
    max_concurrent: int = 2
    """Trials running at once."""
    num_cpus: float = 1.0
    """Ray resources per trial: CPUs."""
    num_gpus: float = 0.0
    """Ray resources per trial: GPUs."""


@dataclass(kw_only=True)
class MetricsConfig:
    tensorboard: bool = False
    """Also write TensorBoard event files under <run_dir>/tensorboard/ (distillation loss, syn_lr,
    speed, memory; evaluation accuracies); needs the tensorboard package. JSONL logs are always
    written."""


@dataclass(kw_only=True)
class RunConfig:
    run_dir: str = "runs/quickstart"
    """Run directory for every artifact (local path or fsspec URL)."""
    tuned: bool = False
    """Take select.init, select.beta and distill.alpha from ``<run_dir>/tune/selected.yaml``
    (what ``selmatch tune`` chose; ``selmatch run --tuned``). Applied over the config file and
    under command-line overrides; refused when that choice was made with other settings."""
    seed: int = 0
    """Run seed; every random generator is derived from it and a position. It also seeds the
    experts, the scores and the window search, which every repetition in ``seeds`` shares."""
    seeds: list[int] | None = None
    """Repetition seeds of ``selmatch run``: selection, distillation and evaluation are repeated
    with each, on the same experts, and the report pools seeds x evaluation runs. The repetition
    of ``seed`` itself lives in run_dir, the others in run_dir/seeds/<s>/. None = [seed]."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    experts: ExpertConfig = field(default_factory=ExpertConfig)
    scores: ScoresConfig = field(default_factory=ScoresConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)



# --------------------------------------------------------------------------------------------
# Derived values
# --------------------------------------------------------------------------------------------


def syn_lr_init(cfg: RunConfig) -> float:
    return cfg.distill.syn_lr_init if cfg.distill.syn_lr_init is not None else cfg.experts.lr


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    """Plain nested dict (YAML/JSON-serialisable)."""
    return dataclasses.asdict(cfg)
