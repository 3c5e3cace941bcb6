"""The runner contract: execute a plan, return sampled tokens and the step's duration."""

from __future__ import annotations

import abc

from kvflow.scheduler.plan import ModelInfo, StepPlan, StepResult


class ModelRunner(abc.ABC):
    """Executes the scheduler's plans.

    A runner computes, for each plan entry `i`, the KV of
    `plan.requests[i].token_ids[start : start + n]` (start and n from
    `plan.start_positions[i]` and `plan.num_tokens[i]`) into the entry's device blocks,
    and samples a token for the entries that reach the end of their known tokens.
    """

    name: str = ""
    supports_overlap: bool = False
    """Whether the engine may plan step N+1 while this runner executes step N. Such a
    runner reads only the plan (tokens through `plan.requests[i].token_ids`, blocks
    through `plan.block_table(i)`) and skips finished requests; step N+1 executes
    after step N's commit, so its tokens are there by then."""
    supports_logprobs: bool = False
    """Whether `execute` returns log-probabilities (`StepResult.logprobs`) for the
    requests that ask (`SamplingParams.logprobs`); other runners return none."""
    model_info: ModelInfo = ModelInfo()
    """The model's vocabulary size, positions and end-of-sequence tokens, which the
    engine's scheduler checks requests against and stops generation at (nothing known
    by default: a simulated runner takes any token id and has no EOS)."""

    @abc.abstractmethod
    def execute(self, plan: StepPlan) -> StepResult:
        """Run one step.

        Returns:
            `StepResult` with one sampled token (or None) per plan entry and the step's
            duration in seconds (virtual for simulated runners, measured for real ones).
        """
