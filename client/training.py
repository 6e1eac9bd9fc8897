"""One client's round: charge the privacy ledger, then run DP-SGD with Opacus.

This is the `task.py` of Flower's templates for the client side: plain functions that
know nothing about Messages, so they can be called and tested directly.
"""

from __future__ import annotations

import io
import logging
import math
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from opacus import PrivacyEngine
from torch import nn
from torch.utils.data import TensorDataset
from tqdm import tqdm

from client.ledger import LedgerFile, ledger_directory
from common.config import ClientRunConfig, NodeConfig, check_delta
from common.canaries import gradient_canaries, mislabelled_canaries
from common.config.rules import MNIST, MNIST_TEST
from common.config.sections import GRADIENT_CANARY, MISLABELLED_CANARY
from common.data import client_shard, load_dataset, raw_pixels, resolve_data_dir, tensor_loader
from common.errors import ConfigError, DataError, DpflError
from common.feature_store import FEATURES_PREFIX, stored_features
from common.model import build_model, fixed_features, split
from common.privacy.accounting import History
from common.privacy.ledger import LedgerError, PrivacyLedger, dataset_key, record_ids
from common.privacy.planning import NoisePlan, PrivacyBudget, epsilon_after, plan_noise, round_shape
from common.storage import atomic_write

log = logging.getLogger(__name__)

# Opacus' hooks on the first layer, whose input needs no gradient, trip this PyTorch warning
# on every backward pass; the per-sample gradients are unaffected.
warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)


@dataclass(frozen=True)
class RoundOutcome:
    """What a client releases after a round: weights only if it trained.

    `epsilon` is the largest cumulative epsilon of any record of the client's data, after
    this round's charge; NaN when a refusal came before the ledger could be read.
    """

    state_dict: dict[str, torch.Tensor] | None
    num_examples: int
    epsilon: float
    delta: float
    refusal: str | None = None


def proposed_budget(run: ClientRunConfig) -> PrivacyBudget:
    """What the run proposes to spend per record; the ledger and the node config can only lower it.

    Under central DP the run's budget is the server's, per client; a client then adds no
    noise of its own (its ledger counts the rounds as non-private releases to the trusted
    server) unless its ledger or node config holds a finite budget, which it then spends with
    DP-SGD as usual.
    """
    epsilon = math.inf if run.privacy.dp_mode == "central" else run.privacy.target_epsilon
    return PrivacyBudget(epsilon, run.privacy.target_delta)


@dataclass(frozen=True)
class Charge:
    """A round the ledger has paid for: the plan's steps per round, and the data's epsilon with it."""

    plan: NoisePlan
    epsilon: float
    delta: float


def train_round(
    global_state: dict[str, torch.Tensor],
    run: ClientRunConfig,
    node: NodeConfig,
    run_key: str,
    simulated: bool = False,
    node_id: int = 0,
) -> RoundOutcome:
    """Train on this client's data for one round of run `run_key`, unless the ledger forbids it.

    The data is the node's own (`dataset` in its node config, used whole) or its partition
    of MNIST; only in a simulation (`simulated`) may the run config name the data and where
    it lives, and the ledger's place. Everything that can fail before training (the data,
    the labels, the model) is checked before the round is charged to the ledger, and the
    charge comes before training, so an update is never released without having been paid
    for. A refusal's reason leaves the client: it names no file, class or count.

    An audit run (`canaries` > 0) adds the canaries this client holds (`common.canaries`;
    gradient canaries are keyed by `node_id`, Flower's id of this node); a real client
    refuses it: it trains its own data and nothing a server adds.
    """
    delta = run.privacy.target_delta
    if run.audit.canaries and not simulated:
        return RoundOutcome(None, 0, math.nan, delta, "this is an audit run with canaries; a real client never trains them")
    try:
        shard = _training_data(run, node, simulated)
    except DataError as err:  # its message names local paths: they stay here
        log.warning("client %d refuses to train: %s", node.partition_id, err)
        return RoundOutcome(None, 0, math.nan, delta, "it cannot load its training data (see its log)")
    classes = run.training.num_classes
    refusal = _label_refusal(shard.tensors[1], classes, node)
    if refusal is not None:
        return RoundOutcome(None, 0, math.nan, delta, refusal)
    try:
        model = build_model(run.training.model, num_classes=classes)
        model.load_state_dict(global_state)
    except (ConfigError, RuntimeError) as err:  # a factory that fails here, or a model unlike the server's
        log.warning("client %d refuses to train: %s", node.partition_id, str(err).splitlines()[0])
        return RoundOutcome(None, 0, math.nan, delta, "it cannot build the run's model, or the global model does not fit it (see its log)")
    shard, ids = _distinct_records(shard, node)
    data_key = dataset_key(ids)
    try:
        directory = ledger_directory(node.ledger_dir, run.privacy.ledger_dir, simulated)
        charge = charge_round(
            LedgerFile(directory), np.sort(ids), len(shard), run, node, f"{run_key}:{data_key}", simulated
        )
    except LedgerError as err:
        log.warning("client %d refuses to train: %s", node.partition_id, err)
        return RoundOutcome(None, 0, math.nan, delta, err.reason)
    if isinstance(charge, RoundOutcome):
        log.warning("client %d refuses to train: %s", node.partition_id, charge.refusal)
        return charge

    trainable, inputs = _training_inputs(model, shard, ids, directory)
    plan = charge.plan
    canaries = None
    if run.audit.canaries and run.audit.canary_kind == GRADIENT_CANARY:
        size = sum(parameter.numel() for parameter in trainable.parameters())
        held = gradient_canaries(run.audit, run.seed, node_id, node.num_partitions, size)
        canaries = held.coordinates[held.included]
    taken = dp_train(trainable, inputs, plan, run, canaries)
    if taken != ((plan.noise_multiplier, plan.sample_rate, plan.steps_per_round),):
        raise DpflError(
            f"DP-SGD ran {taken} but the ledger was charged {plan.steps_per_round} steps at noise "
            f"{plan.noise_multiplier:.4g} and rate {plan.sample_rate:.4g}; the update is withheld"
        )
    state = model.state_dict()
    _check_only_parameters_moved(model, state, global_state)
    return RoundOutcome(state, len(shard), charge.epsilon, charge.delta)


def _training_data(run: ClientRunConfig, node: NodeConfig, simulated: bool) -> TensorDataset:
    """The node's own data set, or its partition of MNIST (of the run's data set, simulated).

    A real client never trains on a path a server proposes: that would let the server pick
    files on the client's machine to train on and release, or probe which exist.
    """
    if node.dataset:
        return load_dataset(node.dataset, resolve_data_dir(node.data_dir))
    if not simulated and run.data.dataset != MNIST:
        raise DataError(
            f"the run proposes dataset = {run.data.dataset!r}; a real client trains only on what its own "
            "node config names (dataset = ...) or on its MNIST partition"
        )
    data_dir = resolve_data_dir(node.data_dir or (run.data.data_dir if simulated else ""))
    shard = client_shard(run.data, run.seed, node.partition_id, node.num_partitions, data_dir)
    if run.audit.canaries and run.audit.canary_kind == MISLABELLED_CANARY:
        return _with_mislabelled_canaries(shard, run, node, data_dir)
    return shard


def _with_mislabelled_canaries(shard: TensorDataset, run: ClientRunConfig, node: NodeConfig, data_dir: Path) -> TensorDataset:
    """The shard and the mislabelled canaries this partition holds that are in: records like any other."""
    test = load_dataset(MNIST_TEST, data_dir)
    canaries = mislabelled_canaries(run.audit, run.seed, node.num_partitions, test.tensors[1].numpy(), run.training.num_classes)
    held = canaries.held_by(node.partition_id)
    images = test.tensors[0][torch.from_numpy(canaries.images[held])]
    labels = torch.from_numpy(canaries.labels[held]).to(shard.tensors[1].dtype)
    return TensorDataset(torch.cat([shard.tensors[0], images]), torch.cat([shard.tensors[1], labels]))


def _label_refusal(labels: torch.Tensor, classes: int, node: NodeConfig) -> str | None:
    """Why labels and the run's `num-classes` do not fit, or None.

    With `num-classes` in the node config the answer depends on configs only; without it,
    it depends on the data (the largest label): a server re-proposing `num-classes` could
    search for it, one refusal at a time, so owners of their own data should declare it.
    """
    if node.num_classes and node.num_classes != classes:
        return f"it holds {node.num_classes} classes, not num-classes = {classes}"
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= (node.num_classes or classes)):
        log.warning(
            "client %d refuses to train: its labels run from %d to %d, outside num-classes = %d",
            node.partition_id, int(labels.min()), int(labels.max()), node.num_classes or classes,
        )
        return f"its data has labels outside num-classes = {classes}"
    return None


def _distinct_records(shard: TensorDataset, node: NodeConfig) -> tuple[TensorDataset, np.ndarray]:
    """The shard with each record (equal pixels and label) once, and the records' ids.

    A record present twice would be sampled twice a step while the ledger, which names
    records by content, charges it once: its epsilon would be understated. So copies are
    dropped before training (how many stays in the client's log).
    """
    ids = record_ids(raw_pixels(shard.tensors[0]), shard.tensors[1])
    unique, first = np.unique(ids, return_index=True)
    if len(unique) == len(ids):
        return shard, ids
    log.warning("client %d: %d duplicate records left out of training", node.partition_id, len(ids) - len(unique))
    keep = torch.from_numpy(np.sort(first))
    return TensorDataset(*(tensor[keep] for tensor in shard.tensors)), ids[keep.numpy()]


def _check_only_parameters_moved(model: nn.Module, state: dict[str, torch.Tensor], before: dict[str, torch.Tensor]) -> None:
    """Only parameters go through DP-SGD's clipping and noise; any other state that training
    changed (a buffer a forward pass updates) was computed from the data without noise."""
    parameters = {name for name, _ in model.named_parameters()}
    moved = [name for name, value in state.items() if name not in parameters and not torch.equal(value, before[name])]
    if moved:
        raise DpflError(f"training changed {', '.join(moved)}, which are not parameters and so not noised by DP-SGD; the update is withheld")


def charge_round(
    ledger_file: LedgerFile,
    records: np.ndarray,
    num_examples: int,
    run: ClientRunConfig,
    node: NodeConfig,
    plan_key: str,
    simulated: bool,
) -> Charge | RoundOutcome:
    """In one locked ledger transaction: the budget, the run's noise plan, the check, the charge.

    Returns the charge, or a refusal (an outcome without weights) when the round would push
    any of `records` past the budget. A real client's budget is its owner's: from its ledger
    or its node config, never from a server's proposal alone, which could otherwise set it
    to infinity (or ask for central DP) and receive the un-noised model.
    """
    privacy, training = run.privacy, run.training
    proposed = proposed_budget(run)
    owner_set = node.target_epsilon is not None or node.target_delta is not None
    with ledger_file.transaction() as ledger:
        if ledger is None:
            if not simulated and (node.target_epsilon is None or node.target_delta is None):
                raise LedgerError(
                    "this client has no privacy budget of its own, so a server's proposal would set it; "
                    "start the SuperNode with --node-config 'target-epsilon=2.0 target-delta=1e-5' (your values)"
                )
            ledger = PrivacyLedger.create(_owners_word(node, proposed), "node config" if owner_set else "run config")
        elif owner_set:
            ledger.accept_owner_budget(_owners_word(node, ledger.budget), "node config")
        budget = PrivacyBudget(min(ledger.budget.epsilon, proposed.epsilon), min(ledger.budget.delta, proposed.delta))
        if math.isfinite(budget.epsilon):  # delta means nothing for a non-private release
            try:
                check_delta(budget.delta, num_examples)
            except ConfigError as err:  # its message holds the number of examples: it stays here
                raise LedgerError(str(err), "its delta is too large for its number of examples (see its log)") from None
        spent = ledger.spent(records)
        plan = ledger_file.plan(plan_key)
        if plan is None:
            plan = plan_noise(
                plan_key,
                budget,
                spent,
                privacy.accountant,
                num_examples,
                training.batch_size,
                training.local_epochs,
                run.num_server_rounds,
                privacy.noise_multiplier,
            )
            if plan is not None:
                ledger_file.keep_plan(plan_key, plan)
        shape = round_shape(num_examples, training.batch_size, training.local_epochs)
        refusal = _refusal(ledger, spent, records, plan, shape, budget, privacy.accountant)
        if refusal is None:
            ledger.charge(records, plan.noise_multiplier, plan.sample_rate, plan.steps_per_round)
            ledger.accountant = privacy.accountant
        ledger_file.save(ledger)
    epsilon = ledger.epsilon(records, privacy.accountant, budget.delta)
    if refusal is not None:
        return RoundOutcome(None, 0, epsilon, budget.delta, refusal)
    return Charge(plan, epsilon, budget.delta)


def _owners_word(node: NodeConfig, otherwise: PrivacyBudget) -> PrivacyBudget:
    """The budget the node config sets, with what it leaves unset taken from `otherwise`."""
    return PrivacyBudget(
        node.target_epsilon if node.target_epsilon is not None else otherwise.epsilon,
        node.target_delta if node.target_delta is not None else otherwise.delta,
    )


def _refusal(
    ledger: PrivacyLedger,
    spent: set[History],
    records: np.ndarray,
    plan: NoisePlan | None,
    shape: tuple[float, int],
    budget: PrivacyBudget,
    mechanism: str,
) -> str | None:
    """Why a round must be refused, or None; `shape` is the (sampling rate, steps) the run's config gives it now.

    Only epsilon figures go into the reason, which leaves the client: how many records are
    spent would tell the server about the data's past.
    """

    def exhausted() -> str:
        return (
            f"privacy budget exhausted: epsilon spent {ledger.epsilon(records, mechanism, budget.delta):.3f} "
            f"of {budget.epsilon:g} (delta = {budget.delta:g})"
        )

    if plan is None:
        return f"{exhausted()}; nothing is left for this run"
    if shape != (plan.sample_rate, plan.steps_per_round):
        return (
            f"the round's sampling rate and steps {shape[0]:.4g}, {shape[1]} differ from the planned "
            f"{plan.sample_rate:.4g}, {plan.steps_per_round} (batch-size or local-epochs changed "
            "mid-run); the noise plan would not hold"
        )
    after = epsilon_after(spent, plan, plan.steps_per_round, mechanism, budget.delta)
    if after > budget.epsilon:
        return f"{exhausted()}; this round would reach {after:.3f}"
    return None


def _training_inputs(
    model: nn.Module, shard: TensorDataset, ids: np.ndarray, state_dir: Path
) -> tuple[nn.Module, TensorDataset]:
    """What DP-SGD trains and on what: the model on the shard, or its head on its fixed features.

    A shard's fixed features are slow to compute but never change. A simulation computes
    those of its whole data source once (`common.feature_store`), and its clients take their
    rows from there by record id (`ids`); otherwise the client keeps its own in its state
    directory (its ledger's), in half precision, and reads them back every round, which is
    cheap: Flower's simulation hands a client to whichever Ray actor is free, and a file
    serves every actor without each holding every client's features.
    """
    trainable, transform = split(model)
    if transform is None:
        return trainable, shard
    labels = shard.tensors[1]
    shared = stored_features(state_dir, model, ids)
    if shared is not None:
        return trainable, TensorDataset(shared, labels)
    path = state_dir / f"{FEATURES_PREFIX}{type(model).__name__.lower()}-{dataset_key(ids)}.pt"
    features = _stored_features(path, len(labels))
    if features is None:
        features = _compute_features(model, shard).tensors[0]
        buffer = io.BytesIO()
        torch.save(features, buffer)
        atomic_write(path, buffer.getvalue(), durable=False)  # a cache: lost, it is computed again
    return trainable, TensorDataset(features, labels)


def _compute_features(model: nn.Module, shard: TensorDataset) -> TensorDataset:
    start = time.perf_counter()
    features = fixed_features(model, shard)
    log.info("fixed features of %d images computed in %.1f s", len(shard), time.perf_counter() - start)
    return features


def _stored_features(path: Path, count: int) -> torch.Tensor | None:
    """Features saved by an earlier round, or None if absent or unreadable (then they are recomputed)."""
    if not path.is_file():
        return None
    try:
        features = torch.load(path, weights_only=True)
    except Exception as err:  # a damaged cache file is not an error: recompute and overwrite it
        log.warning("ignoring unreadable feature cache %s (%s)", path, err)
        return None
    return features if isinstance(features, torch.Tensor) and len(features) == count else None


def dp_train(
    model: nn.Module, shard: TensorDataset, plan: NoisePlan, run: ClientRunConfig, canaries: np.ndarray | None = None
) -> History:
    """DP-SGD over `shard` for the configured local epochs; returns the steps Opacus accounted.

    Poisson sampling, per-sample clipping and Gaussian noise come from Opacus, with the
    plan's noise multiplier. The ledger was charged before this runs; the history Opacus'
    own accountant counts is returned so the caller can check that the two agree. Sampling
    and noise draw from a generator seeded by the operating system, never from torch's
    global one: that starts from a fixed seed in every fresh process, and anything that
    seeds it (a model built with the config's `seed`) would make the noise one the server
    could regenerate, which protects nothing.

    Clipping is Opacus' ghost clipping (`grad_sample_mode="ghost"`): it gets each example's
    gradient norm without materialising the per-sample gradients, then backpropagates the
    loss reweighted by the clipping factors: the same flat clipping and noise as the hooks
    mode, at a fraction of the cost.

    `canaries` (an audit run's) are flat coordinates of `model`'s parameters: each is one
    more example, whose gradient is the clipping norm along that coordinate
    (`_add_gradient_canaries`).
    """
    training = run.training
    generator = torch.Generator()
    generator.seed()  # from std::random_device
    loader = tensor_loader(shard, batch_size=training.batch_size, generator=generator)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=training.learning_rate, momentum=training.momentum
    )
    engine = PrivacyEngine(accountant=run.privacy.accountant)
    private_model, optimizer, criterion, private_loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        criterion=nn.CrossEntropyLoss(),
        data_loader=loader,
        noise_multiplier=plan.noise_multiplier,
        max_grad_norm=run.privacy.max_grad_norm,
        poisson_sampling=True,
        grad_sample_mode="ghost",
        noise_generator=generator,
    )
    parameters = list(model.parameters())
    private_model.train()
    epochs = tqdm(
        range(training.local_epochs), desc="local epochs", leave=False, disable=not sys.stderr.isatty()
    )
    for _ in epochs:
        for images, labels in private_loader:
            optimizer.zero_grad(set_to_none=True)
            criterion(private_model(images), labels).backward()
            if canaries is not None:
                _add_gradient_canaries(parameters, canaries, plan.sample_rate, run.privacy.max_grad_norm, generator)
            optimizer.step()
    return tuple((float(s), float(q), int(n)) for s, q, n in engine.accountant.history)


def _add_gradient_canaries(
    parameters: list[nn.Parameter], coordinates: np.ndarray, rate: float, clip: float, generator: torch.Generator
) -> None:
    """Put this step's sample of gradient canaries into the sum of clipped gradients, before the noise.

    With ghost clipping, `p.grad` holds the sum of the batch's clipped per-example gradients
    after the backward pass; the optimizer's step then adds noise and divides by the expected
    batch size. Each canary joins the step's Poisson sample at the data's rate, and its
    gradient, `clip` along its coordinate, is clipped as Opacus clips one (by
    min(1, clip / (norm + 1e-6))) and added like an example's: one more record, no more.
    """
    sampled = coordinates[torch.rand(len(coordinates), generator=generator).numpy() < rate]
    value = clip * min(1.0, clip / (clip + 1e-6))
    offset = 0
    for parameter in parameters:
        size = parameter.numel()
        mine = sampled[(sampled >= offset) & (sampled < offset + size)] - offset
        if len(mine):
            if parameter.grad is None:  # an empty Poisson batch leaves no gradient
                parameter.grad = torch.zeros_like(parameter)
            parameter.grad.view(-1).index_add_(
                0, torch.from_numpy(mine), torch.full((len(mine),), value, dtype=parameter.grad.dtype)
            )
        offset += size
