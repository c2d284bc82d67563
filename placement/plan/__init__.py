"""Stage `plan`: rank sites and measure concentration, pick sites by a registered strategy, write the plan file."""
from ..families.lora import lora_params  # noqa: F401  (documented here before families had a stage)
from .plan import REQUIRED, SCHEMA, Plan, peft_problem, plan_problem, read_plan  # noqa: F401
from .strategies import (ATTN_QV, FFN, REGISTRY, STRATEGIES, Arm, Strategy, arm_help, check_arms,  # noqa: F401
                         parse_arm, parse_arms, select, strategy_help)
