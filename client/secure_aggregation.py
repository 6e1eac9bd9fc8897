"""The client's side of SecAgg+: Flower's `secaggplus_mod` and the legacy fit records it speaks.

In Flower 1.41 SecAgg+ exists only for the legacy (FitIns/FitRes) workflow. Its server side
sends four `train` Messages per round; `secaggplus_mod` answers the three key-exchange stages
itself and, at the `collect_masked_vectors` stage, calls the ClientApp with Flower's legacy
`fitins.*` records and expects `fitres.*` records back. It then masks the reply's parameters
(weighted by `num_examples`) and empties its ArrayRecords, but leaves the other records as
they are: the metrics - epsilon included - reach the server unmasked. That is deliberate
here: epsilon is not secret, the server needs every client's cumulative epsilon to report
the run's, and the masked sum cannot carry a maximum.

This module only translates those records to and from the arguments and result of
`client.training.train_round`; the training itself is the plain path's.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Context, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import (
    Code,
    FitRes,
    Scalar,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat

from client.proposal import read_proposal
from client.training import RoundOutcome
from common.config import ClientRunConfig
from common.model import build_model
from common.protocol import REFUSAL_KEY, train_metrics

#: The ArrayRecord that carries the global model in a legacy fit instruction.
FITINS_PARAMETERS = "fitins.parameters"


def secure_aggregation_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Run SecAgg+ for messages of the SecAgg+ workflow; pass plain FedAvg messages through.

    `secaggplus_mod` expects its stage record in every `train` Message and fails on any
    other, so one ClientApp can serve both aggregation modes only through this switch.
    """
    if RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


def is_fit_instruction(content: RecordDict) -> bool:
    """Whether a train Message holds legacy fit records (SecAgg+) rather than plain ones."""
    return FITINS_PARAMETERS in content.array_records


def read_fit_instruction(content: RecordDict, flower_run_id: int) -> tuple[ClientRunConfig, str, dict[str, torch.Tensor]]:
    """The proposed run config, run key and global model from legacy `fitins.*` records.

    Legacy parameters are an unnamed list in `state_dict` order; the names come from the
    proposed architecture, and `load_state_dict` in training rejects any mismatch of shapes.
    The architecture is built on the meta device: no memory, and no draw from the RNG that
    DP-SGD's noise and sampling use next, so both aggregation modes consume it alike.
    """
    fit_ins = compat.recorddict_to_fitins(content, keep_input=True)
    run, run_key = read_proposal(fit_ins.config, flower_run_id)
    with torch.device("meta"):
        names = build_model(run.training.model, num_classes=run.training.num_classes).state_dict().keys()
    arrays = parameters_to_ndarrays(fit_ins.parameters)
    if len(arrays) != len(names):
        raise ValueError(f"the server sent {len(arrays)} tensors for a model with {len(names)}")
    return run, run_key, {name: torch.from_numpy(array) for name, array in zip(names, arrays, strict=True)}


def fit_reply(outcome: RoundOutcome, global_state: dict[str, torch.Tensor]) -> RecordDict:
    """Legacy `fitres.*` records for `secaggplus_mod` to mask.

    A refusing client still has to deliver a masked vector, or the round would lose it like
    a dropout and spend effort recovering its masks. It sends zeros with weight zero: SecAgg+
    multiplies the vector by its weight before quantising, so it adds exactly nothing to the
    sum, and the refusal travels in the unmasked metrics as it does on the plain path.
    """
    metrics: dict[str, Scalar] = dict(
        train_metrics(outcome.num_examples, outcome.epsilon, outcome.delta)
    )
    if outcome.state_dict is None:
        metrics[REFUSAL_KEY] = str(outcome.refusal)
        arrays = [np.zeros_like(tensor.numpy()) for tensor in global_state.values()]
    else:
        arrays = [tensor.detach().numpy() for tensor in outcome.state_dict.values()]
    fit_res = FitRes(
        status=Status(code=Code.OK, message=""),
        parameters=ndarrays_to_parameters(arrays),
        num_examples=outcome.num_examples,
        metrics=metrics,
    )
    return compat.fitres_to_recorddict(fit_res, keep_input=False)
