"""One typed schema for the run config, the node config and the presets.

Keys are flat and kebab-case like Flower's (`num-server-rounds`, `target-epsilon`), so the
same names work in `pyproject.toml`, in preset TOML files, in `flwr run --run-config` and in
`dpfl simulate --set`. Internally a run config is split into typed sections (federation,
data, training, privacy, central, secagg), and accounting can be computed from them before
any training starts. The schema's defaults are the default run; `pyproject.toml`'s app
config and the configuration reference in `docs/` are generated from it (`dpfl config`).

Every value is checked once, at start-up; a bad one stops the run with a single line that
names the key, the value and what is allowed.

- `options`: the machinery (typed options, flat keys to nested sections, the checks of one value)
- `sections`: the sections and their defaults
- `rules`: checks across keys
- `schema`: `RunConfig`, `ClientRunConfig` (what a client is sent), `NodeConfig`
- `files`: TOML files and `--set` pairs
- `reference`: the generated app config and configuration reference
"""

from common.config.files import load_toml, parse_overrides
from common.config.rules import check_delta, clients_per_round, data_source
from common.config.schema import ClientRunConfig, NodeConfig, RunConfig
from common.config.sections import (
    BUILT_IN_MODELS,
    SECAGG_MODULUS,
    TRAIN_SET_SIZE,
    CentralConfig,
    DataConfig,
    EvaluationConfig,
    FederationConfig,
    PrivacyConfig,
    SecureAggregationConfig,
    TrainingConfig,
)

__all__ = [
    "BUILT_IN_MODELS",
    "SECAGG_MODULUS",
    "TRAIN_SET_SIZE",
    "CentralConfig",
    "ClientRunConfig",
    "DataConfig",
    "EvaluationConfig",
    "FederationConfig",
    "NodeConfig",
    "PrivacyConfig",
    "RunConfig",
    "SecureAggregationConfig",
    "TrainingConfig",
    "check_delta",
    "clients_per_round",
    "data_source",
    "load_toml",
    "parse_overrides",
]
