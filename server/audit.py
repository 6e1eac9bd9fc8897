"""Empirical privacy audit: how much membership does a run's final model actually leak?

The accountant's epsilon is an upper bound that holds for any attacker. An audit runs one
concrete attacker and turns its success into a lower bound on epsilon: DP promises that no
test can tell members from non-members better than TPR <= e^eps * FPR + delta (and
TNR <= e^eps * FNR + delta), so an attack that does better *proves* a larger epsilon. A lower
bound above the accountant's epsilon means a privacy bug; one far below it says this attack
is weak, not that the model is private.

The attack is the loss-threshold attack of Yeom et al. (2018, "Privacy risk in machine
learning"): call an example a member when the model's cross-entropy on it is low. Members
are the training images the run's clients held (the shards are rebuilt from `config.toml`);
non-members are MNIST test images, drawn from the same distribution and never trained on.

The epsilon lower bound follows Jagielski et al. (2020, "Auditing differentially private
machine learning") and Nasr et al. (2021, "Adversary instantiation"): per threshold, bound TPR
from below and FPR from above with Clopper-Pearson intervals, then take the log-ratio. Two
things keep the figure honest:

* **The threshold is not chosen on the data it is scored on.** The maximum over thresholds
  of a bound evaluated on the same examples is optimistically biased (the best threshold is
  partly the luckiest one). The examples are split in two halves with a fixed seed: the
  threshold and the direction (TPR/FPR or TNR/FNR) are chosen on one half, and the bound is
  computed on the other half only, at that single threshold.
* **Confidence is stated, not implied.** Each one-sided Clopper-Pearson end fails with
  probability at most (1 - confidence) / 2, so the two together hold, and the bound with
  them, with probability at least `confidence` (union bound).

What this audit does not prove: the DP game re-trains with and without one example, while
here one trained model is tested on many examples that were not put into training at random.
The lower bound is therefore a measured leakage figure in the standard form, not a formal
certificate; making it one needs canaries inserted at random during training (Steinke, Nasr
and Jagielski, 2023, "Privacy auditing with one (1) training run").
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import beta, rankdata
from torch import nn
from torch.utils.data import TensorDataset

from common.config import RunConfig, load_toml
from common.data import load_mnist, resolve_data_dir, shard_indices
from common.errors import DpflError
from common.storage import atomic_write
from server.export import load_model
from server.results import CONFIG_FILE, MODEL_FILE, SUMMARY_FILE

AUDIT_FILE = "audit.json"
#: False-positive rates at which the attack's true-positive rate is reported.
FPR_LEVELS = (0.001, 0.01)
CONFIDENCE = 0.95
#: Members and non-members used at most, each: enough for a tight Clopper-Pearson interval
#: at 0.1% FPR, and inference on 20 000 MNIST images takes seconds on a CPU.
MAX_EXAMPLES = 10_000


@dataclass(frozen=True)
class AuditReport:
    """The loss-threshold attack's success on one model, next to the accountant's epsilon."""

    #: Area under the attack's ROC curve: 0.5 is guessing, 1.0 tells every example apart.
    auc: float
    #: Attack TPR at each false-positive rate in `FPR_LEVELS` (the fraction, not percent).
    tpr_at_fpr: dict[float, float]
    #: Epsilon that this attack proves with `CONFIDENCE`, at the run's delta; never negative.
    empirical_epsilon_lower_bound: float
    #: The accountant's cumulative epsilon; `math.inf` for a model trained without DP.
    accountant_epsilon: float
    delta: float
    num_members: int
    num_non_members: int

    def to_json(self) -> dict[str, Any]:
        """Kebab-case keys like `summary.json`; a non-private run's epsilon becomes null."""
        return {
            "auc": self.auc,
            "tpr-at-fpr": {str(level): tpr for level, tpr in self.tpr_at_fpr.items()},
            "empirical-epsilon-lower-bound": self.empirical_epsilon_lower_bound,
            "confidence": CONFIDENCE,
            "accountant-epsilon": (
                self.accountant_epsilon if math.isfinite(self.accountant_epsilon) else None
            ),
            "delta": self.delta,
            "num-members": self.num_members,
            "num-non-members": self.num_non_members,
        }


@torch.inference_mode()
def per_example_losses(
    model: nn.Module, dataset: TensorDataset, batch_size: int = 2000
) -> np.ndarray:
    """Cross-entropy of every example, in float64.

    Overfit models reach losses below float32's resolution near zero; computing the
    log-softmax in float64 keeps those members apart instead of tying them at 0.
    """
    model.eval()
    images, labels = dataset.tensors
    losses = [
        nn.functional.cross_entropy(
            model(images[start : start + batch_size]).double(),
            labels[start : start + batch_size],
            reduction="none",
        )
        for start in range(0, len(labels), batch_size)
    ]
    return torch.cat(losses).numpy()


def auc_score(scores: np.ndarray, is_member: np.ndarray) -> float:
    """ROC AUC as the Mann-Whitney statistic: P(member scores above non-member), ties count 1/2."""
    members = int(is_member.sum())
    non_members = len(is_member) - members
    rank_sum = rankdata(scores)[is_member].sum()
    return float((rank_sum - members * (members + 1) / 2) / (members * non_members))


def roc_counts(
    scores: np.ndarray, is_member: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every threshold t (guess "member" when score >= t) with its true and false positive counts.

    The first threshold is +inf (nobody is called a member), so every ROC starts at (0, 0).
    Counts rather than rates: the Clopper-Pearson intervals need them.
    """
    order = np.argsort(-scores, kind="stable")
    sorted_scores, sorted_members = scores[order], is_member[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(sorted_scores)), len(scores) - 1]
    thresholds = np.r_[np.inf, sorted_scores[last_of_tie]]
    true_positives = np.r_[0, np.cumsum(sorted_members)[last_of_tie]]
    false_positives = np.r_[0, np.cumsum(~sorted_members)[last_of_tie]]
    return thresholds, true_positives, false_positives


def tpr_at_fpr(
    scores: np.ndarray, is_member: np.ndarray, levels: tuple[float, ...] = FPR_LEVELS
) -> dict[float, float]:
    """The best TPR among thresholds whose FPR is at most each level (the low-FPR regime that
    matters for privacy: an attack that is sure about a few members, Carlini et al. 2022)."""
    _, true_positives, false_positives = roc_counts(scores, is_member)
    tpr = true_positives / is_member.sum()
    fpr = false_positives / (~is_member).sum()
    return {level: float(tpr[fpr <= level].max()) for level in levels}


def clopper_pearson(
    successes: np.ndarray, trials: int, confidence: float
) -> tuple[np.ndarray, np.ndarray]:
    """Exact two-sided binomial confidence interval (low, high) for each success count."""
    tail = (1 - confidence) / 2
    low = np.where(successes > 0, beta.ppf(tail, successes, trials - successes + 1), 0.0)
    high = np.where(successes < trials, beta.ppf(1 - tail, successes + 1, trials - successes), 1.0)
    return low, high


def epsilon_bounds(
    true_positives: np.ndarray,
    false_positives: np.ndarray,
    members: int,
    non_members: int,
    delta: float,
    confidence: float,
) -> np.ndarray:
    """Epsilon lower bounds per threshold, shape (2, thresholds); -inf where there is no evidence.

    Row 0 uses the members side of (eps, delta)-DP, TPR <= e^eps FPR + delta, so
    eps >= ln((TPR_low - delta) / FPR_high). Row 1 uses the complement of the same test,
    TNR <= e^eps FNR + delta, so eps >= ln((TNR_low - delta) / FNR_high) with
    TNR_low = 1 - FPR_high and FNR_high = 1 - TPR_low: always the pessimistic interval ends.
    Both denominators are positive: an upper Clopper-Pearson end of a rate is above 0, and a
    lower end is below 1.
    """
    tpr_low, _ = clopper_pearson(true_positives, members, confidence)
    _, fpr_high = clopper_pearson(false_positives, non_members, confidence)
    numerators = np.stack([tpr_low - delta, 1 - fpr_high - delta])
    denominators = np.stack([fpr_high, 1 - tpr_low])
    with np.errstate(divide="ignore"):
        return np.log(np.maximum(numerators, 0.0) / denominators)


def empirical_epsilon_lower_bound(
    scores: np.ndarray,
    is_member: np.ndarray,
    selection: np.ndarray,
    delta: float,
    confidence: float = CONFIDENCE,
) -> float:
    """Epsilon proved by a threshold chosen on `selection` and scored on the other examples.

    On the selection half, the threshold and direction with the largest Clopper-Pearson bound
    win (the interval already penalises thresholds that rest on a handful of examples). Only
    that one bound is then computed on the held-out half, so neither the choice nor the
    maximum over thresholds inflates it. Clipped at 0: a failed attack proves nothing.
    """
    chosen_members = is_member[selection]
    thresholds, true_positives, false_positives = roc_counts(scores[selection], chosen_members)
    bounds = epsilon_bounds(
        true_positives,
        false_positives,
        int(chosen_members.sum()),
        int((~chosen_members).sum()),
        delta,
        confidence,
    )
    direction, best = np.unravel_index(np.argmax(bounds), bounds.shape)
    if not bounds[direction, best] > 0:
        return 0.0
    held_members = is_member[~selection]
    guessed = scores[~selection] >= thresholds[best]
    bound = epsilon_bounds(
        np.array([np.sum(guessed & held_members)]),
        np.array([np.sum(guessed & ~held_members)]),
        int(held_members.sum()),
        int((~held_members).sum()),
        delta,
        confidence,
    )[direction, 0]
    return max(float(bound), 0.0)


def audit_model(
    model: nn.Module,
    members: TensorDataset,
    non_members: TensorDataset,
    *,
    delta: float,
    accountant_epsilon: float = math.inf,
    seed: int = 0,
    max_examples: int = MAX_EXAMPLES,
) -> AuditReport:
    """Attack `model` with the loss threshold: members (trained on) against non-members.

    Equally many of each (at most `max_examples`) are sampled with `seed`, so a balanced
    attack at 0.5 is exactly guessing and the two Clopper-Pearson intervals are equally
    tight. AUC and TPR at low FPR use all sampled examples (no choice is made on them); the
    epsilon bound uses the two-half split described in the module docstring.
    """
    count = min(len(members), len(non_members), max_examples)
    if count < 2:
        raise DpflError(
            f"an audit needs at least 2 members and 2 non-members (one of each per half), got "
            f"{len(members)} and {len(non_members)}; train on more images (train-subset)"
        )
    rng = np.random.default_rng(seed)
    member_losses = per_example_losses(model, _sample(members, count, rng))
    non_member_losses = per_example_losses(model, _sample(non_members, count, rng))
    scores = -np.concatenate([member_losses, non_member_losses])
    is_member = np.r_[np.ones(count, dtype=bool), np.zeros(count, dtype=bool)]
    # Split members and non-members separately, so each half keeps the 1:1 balance.
    halves = np.r_[rng.permutation(count) < count // 2, rng.permutation(count) < count // 2]
    return AuditReport(
        auc=auc_score(scores, is_member),
        tpr_at_fpr=tpr_at_fpr(scores, is_member),
        empirical_epsilon_lower_bound=empirical_epsilon_lower_bound(
            scores, is_member, halves, delta
        ),
        accountant_epsilon=float(accountant_epsilon),
        delta=float(delta),
        num_members=count,
        num_non_members=count,
    )


def _sample(dataset: TensorDataset, count: int, rng: np.random.Generator) -> TensorDataset:
    index = torch.from_numpy(rng.choice(len(dataset), size=count, replace=False))
    return TensorDataset(*(tensor[index] for tensor in dataset.tensors))


def audit_run(run_dir: Path, data_dir: Path | None = None) -> AuditReport:
    """Audit a finished run's final model and write `audit.json` into its directory.

    Members are the union of all clients' shards, rebuilt from the run's seed, data settings
    and `num-clients` exactly as the clients cut them. (With `fraction-train` below 1 or
    refused rounds, a client may never have trained; its shard still counts as members, which
    can only dilute the attack, never inflate its figures.)
    `data_dir` overrides the run's `data-dir`, for a run directory moved to another machine.
    """
    required = (MODEL_FILE, CONFIG_FILE, SUMMARY_FILE)
    missing = [name for name in required if not (run_dir / name).is_file()]
    if missing:
        raise DpflError(
            f"{run_dir} is not a dpfl run directory (no {', '.join(missing)}); pass a finished "
            "run's outputs/<timestamp>-<name>/"
        )
    config = RunConfig.from_mapping(load_toml(run_dir / CONFIG_FILE))
    accountant_epsilon, delta = _privacy_spent(run_dir / SUMMARY_FILE)
    data_dir = data_dir or resolve_data_dir(config.data.data_dir)
    train = load_mnist(data_dir, train=True)
    shards = shard_indices(
        train.tensors[1], config.data, config.seed, config.federation.num_clients
    )
    index = torch.from_numpy(np.sort(np.concatenate(shards)))
    members = TensorDataset(*(tensor[index] for tensor in train.tensors))
    report = audit_model(
        load_model(run_dir),
        members,
        load_mnist(data_dir, train=False),
        delta=delta,
        accountant_epsilon=accountant_epsilon,
        seed=config.seed,
    )
    atomic_write(run_dir / AUDIT_FILE, json.dumps(report.to_json(), indent=2).encode())
    return report


def _privacy_spent(summary_file: Path) -> tuple[float, float]:
    """(epsilon, delta) from `summary.json`; a null or absent epsilon marks a non-private run."""
    try:
        summary = json.loads(summary_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DpflError(
            f"{summary_file} is not valid JSON ({err}); restore it from the run"
        ) from None
    if not isinstance(summary, dict):
        raise DpflError(f"{summary_file} is not a dpfl run summary; restore it from the run")
    epsilon, delta = summary.get("epsilon"), summary.get("delta")
    for key, value in (("epsilon", epsilon), ("delta", delta)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise DpflError(
                f"{summary_file}: {key} = {value!r} is not a number; restore it from the run"
            )
    return (math.inf if epsilon is None else float(epsilon)), float(delta or 0.0)
