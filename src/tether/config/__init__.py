"""Stage configs: one frozen dataclass per stage, filled from YAML then flags, then validated.

    parse.py      the one parser: YAML, flags, coercion, validation helpers, --help
    groups.py     field groups several stages share: run, optimizer, precision and sharding,
                  LoRA, sampling, logging, checkpoints
    train.py      the supervised stages: sft, rm, dpo (and its family), kto; score
    online.py     the online stages: what they share, and ppo, grpo, rloo, online-dpo
    sampling.py   bon, eval
    feedback.py   label, judge, iterate
    world.py      the built-in world: demo, pretrain, world export
    tools.py      run (pipelines), report

Every field has a docstring right under it; `tether <stage> --help` shows those docstrings, so
they are the reference for every option. The order of precedence is: dataclass default < YAML
file (`--config`) < command-line flags. Unknown fields and wrong types are rejected before any
work starts. Nothing here imports torch, so a config is parsed and validated before any model
code loads.
"""

from tether.config.feedback import IterateConfig, JudgeConfig, LabelConfig
from tether.config.groups import (CheckpointFields, Dtype, LoggingFields, LoRAFields, OptimizerFields,
                                  PrecisionFields, RunConfig, SamplingFields)
from tether.config.online import GRPOConfig, OnlineConfig, OnlineDPOConfig, PPOConfig, RLOOConfig
from tether.config.parse import (coerce, config_help, field_docs, from_dict, load_config, non_negative,
                                 normalise_key, parse_flags, positive, read_yaml, required, save_config,
                                 to_dict, unknown_option)
from tether.config.sampling import BoNConfig, EvalConfig, SamplerFields
from tether.config.tools import PipelineConfig, ReportConfig
from tether.config.train import DPOConfig, KTOConfig, RMConfig, ScoreConfig, SFTConfig, TrainConfig
from tether.config.world import DemoConfig, PretrainConfig, WorldExportConfig

__all__ = [
    "RunConfig", "TrainConfig", "SFTConfig", "RMConfig", "ScoreConfig", "DPOConfig", "KTOConfig",
    "OnlineConfig", "PPOConfig", "GRPOConfig", "RLOOConfig", "OnlineDPOConfig", "BoNConfig", "EvalConfig",
    "LabelConfig", "JudgeConfig", "IterateConfig", "SamplerFields", "SamplingFields", "OptimizerFields",
    "PrecisionFields", "LoRAFields", "LoggingFields", "CheckpointFields", "Dtype",
    "DemoConfig", "PretrainConfig", "WorldExportConfig", "PipelineConfig", "ReportConfig",
    "coerce", "config_help", "field_docs", "from_dict", "load_config", "normalise_key", "parse_flags",
    "read_yaml", "save_config", "to_dict", "unknown_option", "positive", "non_negative", "required",
]
