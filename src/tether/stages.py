"""The stage registry: every stage `tether` runs, by name, with its config class and its recipe.

An entry names both as "module:name" strings, imported only when the stage is used, so that
`tether --help` and the CLI's start stay fast. Everything that runs a stage by name looks it up
here: the CLI (`tether <stage>`), pipelines (`tether run`), `tether demo` and `tether iterate`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

from tether.specs import load_object


@dataclass(frozen=True)
class Stage:
    config: str  # "module:Class", the stage's config dataclass
    recipe: str  # "module:function" taking the config
    summary: str  # one line for `tether --help`
    positional: Optional[str] = None  # field filled by a bare first argument (`tether run FILE`)


STAGES: dict[str, Stage] = {
    "demo": Stage("tether.config:DemoConfig", "tether.recipes.demo:run",
                  "The whole pipeline in the built-in synthetic world (CPU, no downloads, ~10 min)."),
    "sft": Stage("tether.config:SFTConfig", "tether.recipes.sft:run",
                 "Supervised fine-tuning on demonstrations (loss on responses only)."),
    "rm": Stage("tether.config:RMConfig", "tether.recipes.rm:run",
                "Reward model: pairwise / K-wise ranking loss on the SFT model, then calibration."),
    "score": Stage("tether.config:ScoreConfig", "tether.recipes.score:run",
                   "Score responses (or preference pairs/rankings) with a reward model -> JSONL."),
    "ppo": Stage("tether.config:PPOConfig", "tether.recipes.online.loop:run",
                 "PPO against a reward model, with a per-token KL penalty to the SFT model."),
    "grpo": Stage("tether.config:GRPOConfig", "tether.recipes.online.loop:run",
                  "GRPO and variants: G responses per prompt, group advantages, no critic."),
    "rloo": Stage("tether.config:RLOOConfig", "tether.recipes.online.loop:run",
                  "RLOO: k responses per prompt, each against the mean of the others."),
    "online-dpo": Stage("tether.config:OnlineDPOConfig", "tether.recipes.online.loop:run",
                        "Online DPO: pairs sampled from the policy, labelled by an RM, a function or "
                        "an LM judge."),
    "pretrain": Stage("tether.config:PretrainConfig", "tether.recipes.world:run_pretrain",
                      "Pretrain the built-in world's tiny Llama from scratch (no downloads)."),
    "world export": Stage("tether.config:WorldExportConfig", "tether.recipes.world:run_export",
                          "Write the built-in world's data sets as JSONL in the stages' formats."),
    "dpo": Stage("tether.config:DPOConfig", "tether.recipes.dpo:run",
                 "DPO and its family (IPO, robust, hinge, SimPO, ORPO) on pairs or rankings."),
    "kto": Stage("tether.config:KTOConfig", "tether.recipes.kto:run",
                 "KTO on unpaired desirable / undesirable labels, against the SFT reference."),
    "bon": Stage("tether.config:BoNConfig", "tether.recipes.bon:run",
                 "Best-of-N: sample N responses per prompt, keep the one the reward model likes best."),
    "eval": Stage("tether.config:EvalConfig", "tether.recipes.evaluate:run",
                  "Win rate of policy A vs B (gold judge or RM, 95% CI), KL to a reference, length, "
                  "distinct-n."),
    "label": Stage("tether.config:LabelConfig", "tether.recipes.label:run",
                   "A local web page to rank responses (preference labels) or compare two policies."),
    "judge": Stage("tether.config:JudgeConfig", "tether.recipes.judge:run",
                   "Label comparisons with an LM judge, a reward model or a function (RLAIF)."),
    "iterate": Stage("tether.config:IterateConfig", "tether.recipes.iterate:run",
                     "Iterated RLHF: rounds of sampling, labelling, RM retraining and PPO."),
    "report": Stage("tether.config:ReportConfig", "tether.report.html:run",
                    "Write PNG plots and a self-contained report.html for a run directory.",
                    positional="run_dir"),
    "run": Stage("tether.config:PipelineConfig", "tether.recipes.pipeline:run",
                 "Run a pipeline YAML (e.g. sft -> rm -> ppo); reruns skip finished stages.",
                 positional="pipeline"),
}


def resolve(spec: str) -> Any:
    """The class or function a registry entry ("module:name") names, imported now."""
    return load_object(spec, "stage registry entry")


def config_class(name: str) -> type:
    """Stage `name`'s config dataclass."""
    return resolve(STAGES[name].config)


def recipe(name: str) -> Callable[[Any], Any]:
    """Stage `name`'s recipe: the function that runs the stage on its config."""
    return resolve(STAGES[name].recipe)


def run_stage(name: str, cfg: Any) -> Any:
    """Run stage `name` on `cfg` (a config of its class) and return what its recipe returns.
    Every model option is checked first (`models.source`): a directory that is not there is
    named at once, and the hub is tried only when it can answer."""
    from tether.models.source import check_model_sources

    check_model_sources(cfg)
    return recipe(name)(cfg)
