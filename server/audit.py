"""Empirical privacy audit: how much membership does a run's final model actually leak?

The accountant's epsilon is an upper bound that holds for any attacker. An audit runs one
concrete attacker and turns its success into a lower bound on epsilon: DP promises that no
test can tell members from non-members better than TPR <= e^eps * FPR + delta (and
TNR <= e^eps * FNR + delta), so an attack that does better *proves* a larger epsilon. A lower
bound above the upper bound for the same neighbouring relation (below) means a privacy bug;
one far below it says this attack is weak, not that the model is private.

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

**Like with like: replace-one, not add/remove.** Members against non-members asks whether a
record was swapped for another one from the same distribution: a replace-one experiment.
The accountants (Opacus', in the clients' ledgers and in `summary.json`) bound add/remove-one
neighbours, one record more or fewer, and the same training has a larger replace-one epsilon
(the default run: 1.99 add/remove, about 4.3 replace-one by a tight PLD computation, 4.53 by
the bound used here). So the lower bound is compared with a replace-one *upper* bound derived
from the same accounting by group privacy (`common.privacy.accounting.replace_one_epsilon`: 2 eps1, eps1
the accountant's add/remove epsilon at a delta1 with (1 + e^eps1) delta1 <= delta), at the
delta the lower bound uses. That needs the run's accountant history, not only its final
epsilon. Under local DP it is rebuilt from `config.toml` as `dpfl plan` plans it (shard sizes,
sampling rate, steps per round, the noise multiplier planned from target-epsilon, or the fixed
noise-multiplier), with every client charged for every round `summary.json` reports completed,
which can only over-count. Under central DP it is the server's client-level history in
`checkpoint.pt` (a client-level bound covers a record swapped within one client's data). When
`summary.json`'s epsilon is above what that history explains (earlier spending in a kept
ledger, a node's own larger budget, a client whose epsilon never came back), no replace-one
bound is claimed and nothing is compared.

What this audit does not prove: the DP game re-trains on two neighbouring data sets, while
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
from common.config.rules import NO_EVALUATION
from common.data import load_dataset, resolve_data_dir, shard_indices
from common.errors import DpflError
from common.export import load_model
from common.privacy.accounting import History, history_epsilon, replace_one_epsilon
from common.privacy.planning import PrivacyBudget, plan_noise
from common.storage import atomic_write
from server.results import CHECKPOINT_FILE, CONFIG_FILE, MODEL_FILE, SUMMARY_FILE

AUDIT_FILE = "audit.json"
#: False-positive rates at which the attack's true-positive rate is reported.
FPR_LEVELS = (0.001, 0.01)
CONFIDENCE = 0.95
#: Members and non-members used at most, each: enough for a tight Clopper-Pearson interval
#: at 0.1% FPR, and few enough that inference on both stays quick on a CPU.
MAX_EXAMPLES = 10_000
#: How far `summary.json`'s epsilon may exceed the rebuilt history's before the history is not
#: trusted: the clients computed theirs with the same accountant, so only float noise.
REBUILT_EPSILON_TOLERANCE = 1e-6


@dataclass(frozen=True)
class AuditReport:
    """The loss-threshold attack's success on one model, next to the replace-one guarantee."""

    #: Area under the attack's ROC curve: 0.5 is guessing, 1.0 tells every example apart.
    auc: float
    #: Attack TPR at each false-positive rate in `FPR_LEVELS` (the fraction, not percent).
    tpr_at_fpr: dict[float, float]
    #: Replace-one epsilon that this attack proves with `CONFIDENCE`, at `delta`; never negative.
    empirical_epsilon_lower_bound: float
    #: The accountant's cumulative add/remove epsilon; `math.inf` for a model trained without DP.
    accountant_epsilon: float
    #: Upper bound on the run's replace-one epsilon at `delta`, the figure the lower bound is
    #: compared with; `math.inf` without DP, None when the run directory does not give one.
    replace_one_epsilon: float | None
    #: One line: how `replace_one_epsilon` was derived, or why there is none.
    replace_one_basis: str
    delta: float
    num_members: int
    num_non_members: int

    @property
    def lower_bound_above_replace_one_bound(self) -> bool | None:
        """True would prove a privacy bug (or an audit bug); None: nothing to compare with."""
        if self.replace_one_epsilon is None:
            return None
        return self.empirical_epsilon_lower_bound > self.replace_one_epsilon

    def to_json(self) -> dict[str, Any]:
        """Kebab-case keys like `summary.json`; a non-private run's epsilons become null."""
        return {
            "auc": self.auc,
            "tpr-at-fpr": {str(level): tpr for level, tpr in self.tpr_at_fpr.items()},
            "empirical-epsilon-lower-bound": self.empirical_epsilon_lower_bound,
            "confidence": CONFIDENCE,
            "private": math.isfinite(self.accountant_epsilon),
            "accountant-epsilon-add-remove": _finite_or_none(self.accountant_epsilon),
            "replace-one-epsilon-upper-bound": (
                None
                if self.replace_one_epsilon is None
                else _finite_or_none(self.replace_one_epsilon)
            ),
            "replace-one-basis": self.replace_one_basis,
            "lower-bound-above-replace-one-bound": self.lower_bound_above_replace_one_bound,
            "delta": self.delta,
            "num-members": self.num_members,
            "num-non-members": self.num_non_members,
        }


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


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
    replace_one: tuple[float | None, str] = (None, "not derived (audit_model was given none)"),
    seed: int = 0,
    max_examples: int = MAX_EXAMPLES,
) -> AuditReport:
    """Attack `model` with the loss threshold: members (trained on) against non-members.

    Equally many of each (at most `max_examples`) are sampled with `seed`, so a balanced
    attack at 0.5 is exactly guessing and the two Clopper-Pearson intervals are equally
    tight. AUC and TPR at low FPR use all sampled examples (no choice is made on them); the
    epsilon bound uses the two-half split described in the module docstring.
    `accountant_epsilon` (add/remove) and `replace_one` (the replace-one upper bound at
    `delta` and how it was derived, see `replace_one_bound`) are carried into the report.
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
        replace_one_epsilon=None if replace_one[0] is None else float(replace_one[0]),
        replace_one_basis=replace_one[1],
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
    The replace-one bound the lower bound is compared with comes from `replace_one_bound`.
    """
    required = (MODEL_FILE, CONFIG_FILE, SUMMARY_FILE)
    missing = [name for name in required if not (run_dir / name).is_file()]
    if missing:
        raise DpflError(
            f"{run_dir} is not a dpfl run directory (no {', '.join(missing)}); pass a finished "
            "run's outputs/<timestamp>-<name>/"
        )
    config = RunConfig.from_mapping(load_toml(run_dir / CONFIG_FILE))
    if config.audit.canaries:
        raise DpflError(
            f"{run_dir} is an audit run (canaries = {config.audit.canaries}): its audit is the canary "
            f"audit in its {AUDIT_FILE}; the loss-threshold attack is for runs on real data"
        )
    summary = _read_summary(run_dir / SUMMARY_FILE)
    accountant_epsilon, delta = _privacy_spent(summary, run_dir / SUMMARY_FILE)
    if config.evaluation.eval_dataset == NO_EVALUATION:
        raise DpflError(
            f"{run_dir} ran with eval-dataset = none: the attack needs non-members, images the "
            "run never trained on; audit a run that has an evaluation set"
        )
    data_dir = data_dir or resolve_data_dir(config.data.data_dir)
    train = load_dataset(config.data.dataset, data_dir)
    shards = shard_indices(
        train.tensors[1], config.data, config.seed, config.federation.num_clients
    )
    index = torch.from_numpy(np.sort(np.concatenate(shards)))
    members = TensorDataset(*(tensor[index] for tensor in train.tensors))
    replace_one = replace_one_bound(
        run_dir,
        config,
        [len(shard) for shard in shards],
        accountant_epsilon,
        delta,
        _rounds_completed(summary, run_dir / SUMMARY_FILE),
    )
    report = audit_model(
        load_model(run_dir),
        members,
        load_dataset(config.evaluation.eval_dataset, data_dir),
        delta=delta,
        accountant_epsilon=accountant_epsilon,
        replace_one=replace_one,
        seed=config.seed,
    )
    atomic_write(run_dir / AUDIT_FILE, json.dumps(report.to_json(), indent=2).encode())
    return report


def replace_one_bound(
    run_dir: Path,
    config: RunConfig,
    shard_sizes: list[int],
    accountant_epsilon: float,
    delta: float,
    rounds: int | None,
) -> tuple[float | None, str]:
    """An upper bound on the run's replace-one epsilon at `delta`, and one line saying how.

    The run's accountant history is rebuilt (module docstring, "Like with like"), checked
    against `accountant_epsilon` (the add/remove epsilon `summary.json` reports: the history
    must explain it), and converted by `common.privacy.accounting.replace_one_epsilon`, client group by
    client group; the largest bound is the run's, as every record is one client's. `rounds`
    is how many rounds completed (None: unknown, then all planned rounds are counted).
    Returns (None, why) when no bound can be vouched for, (inf, why) for a non-private run.
    """
    if math.isinf(accountant_epsilon):
        return math.inf, "non-private run (summary.json's epsilon is null): no guarantee"
    privacy = config.privacy
    mechanism = privacy.accountant
    counted = config.federation.num_server_rounds if rounds is None else rounds
    if privacy.dp_mode == "central":
        histories, source = _central_history(run_dir)
        if histories is None:
            return None, source
    else:
        histories = _local_histories(config, sorted(set(shard_sizes)), counted)
        source = (
            f"DP-SGD per client replanned from config.toml as `dpfl plan` plans it, "
            f"{counted} round(s) charged"
        )
        if rounds is None:
            source += " (rounds-completed missing from summary.json: all planned ones)"
    rebuilt = max(history_epsilon(history, mechanism, delta) for history in histories)
    if accountant_epsilon > rebuilt + REBUILT_EPSILON_TOLERANCE:
        return None, (
            f"none: summary.json's epsilon {accountant_epsilon:.4g} is above the {rebuilt:.4g} of "
            f"the rebuilt history ({source}), so the run spent more than that history explains "
            "(earlier spending in a kept ledger, a node's own budget, or a client whose epsilon "
            "never came back); nothing is compared"
        )
    epsilon, epsilon1, delta1, history = max(
        (*replace_one_epsilon(history, mechanism, delta), history) for history in histories
    )
    if math.isinf(epsilon):
        return math.inf, (
            f"no finite bound: the {mechanism} accountant's add/remove epsilon of "
            f"{_describe(history)} is too large for any delta1 with (1 + e^eps1) delta1 <= "
            f"{delta:g} ({source})"
        )
    return epsilon, (
        f"group privacy: 2 x {epsilon1:.4g}, the {mechanism} accountant's add/remove "
        f"epsilon at delta1 = {delta1:.3g}, where (1 + e^{epsilon1:.4g}) delta1 <= {delta:g}; "
        f"history {_describe(history)} ({source})"
    )


def _local_histories(config: RunConfig, shard_sizes: list[int], rounds: int) -> list[History]:
    """Each client group's DP-SGD history over `rounds` rounds, planned as the clients plan it.

    `common.privacy.planning.plan_noise` for records never trained on, as `dpfl plan` and the clients'
    ledgers use it. Records with earlier spending in a kept ledger get at least this noise
    (up to the planner's tolerance of 0.01 in epsilon), and their cumulative epsilon in
    `summary.json` then mostly fails the check in `replace_one_bound` anyway.
    """
    privacy, training = config.privacy, config.training
    budget = PrivacyBudget(privacy.target_epsilon, privacy.target_delta)
    histories = []
    for size in shard_sizes:
        plan = plan_noise(
            "audit", budget, {()}, privacy.accountant, size, training.batch_size, training.local_epochs,
            config.federation.num_server_rounds, privacy.noise_multiplier,
        )
        if plan is None or not rounds:  # no noise fits the budget: these clients refused every round
            histories.append(())
        else:
            histories.append(((plan.noise_multiplier, plan.sample_rate, plan.steps_per_round * rounds),))
    return histories


def _central_history(run_dir: Path) -> tuple[list[History] | None, str]:
    """The server's client-level accountant history from `checkpoint.pt`, or None and why."""
    try:
        saved = torch.load(run_dir / CHECKPOINT_FILE, weights_only=True)
        history = tuple(
            (float(sigma), float(rate), int(steps))
            for sigma, rate, steps in saved["central-history"]
        )
    except FileNotFoundError:
        return None, f"none: dp-mode = central and no {CHECKPOINT_FILE} holds the server's history"
    except Exception as err:  # unpickling reports corruption in many types
        return None, (
            f"none: dp-mode = central and {CHECKPOINT_FILE} has no readable client-level "
            f"history ({type(err).__name__}: {err})"
        )
    return [history], (
        f"the server's client-level history in {CHECKPOINT_FILE}; a client-level bound covers "
        "one record swapped within one client's data"
    )


def _describe(history: History) -> str:
    if not history:
        return "(no steps)"
    return ", ".join(
        f"sigma {sigma:.4g} at sampling rate {rate:.4g} for {steps} steps"
        for sigma, rate, steps in history
    )


def _read_summary(summary_file: Path) -> dict[str, Any]:
    try:
        summary = json.loads(summary_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DpflError(
            f"{summary_file} is not valid JSON ({err}); restore it from the run"
        ) from None
    if not isinstance(summary, dict):
        raise DpflError(f"{summary_file} is not a dpfl run summary; restore it from the run")
    return summary


def _privacy_spent(summary: dict[str, Any], summary_file: Path) -> tuple[float, float]:
    """(epsilon, delta) from `summary.json`; a null or absent epsilon marks a non-private run."""
    epsilon, delta = summary.get("epsilon"), summary.get("delta")
    for key, value in (("epsilon", epsilon), ("delta", delta)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise DpflError(
                f"{summary_file}: {key} = {value!r} is not a number; restore it from the run"
            )
    return (math.inf if epsilon is None else float(epsilon)), float(delta or 0.0)


def _rounds_completed(summary: dict[str, Any], summary_file: Path) -> int | None:
    """`rounds-completed` from `summary.json`; None when an older summary has none."""
    rounds = summary.get("rounds-completed")
    if rounds is None:
        return None
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0:
        raise DpflError(
            f"{summary_file}: rounds-completed = {rounds!r} is not a round count; restore it "
            "from the run"
        )
    return rounds
