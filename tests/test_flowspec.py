"""FlowSpec (mmspec.pipeline.flowspec): greedy output equals HF generate in one process (the pipeline simulated
by segments in flight) and over 2 and 3 real stages; sampled output follows the target (chi-square on the first
two tokens, with a negative control that breaks the residual rule) and the 2-stage run repeats the one-process
run for the same seeds; in-flight pruning happens; bad input gets named errors."""

import pytest
import torch
from test_pipeline import PROMPT, launch, reference

from mmspec.errors import MethodParameterError
from mmspec.pipeline import flowspec
from mmspec.cli.pipeline import _example_target
from mmspec.pipeline.stage import truncated_copy
from mmspec.pipeline.flowspec import FlowSpecConfig, generate
from mmspec.verify.tree_rules import DeterministicTreeRule

SAMPLED = FlowSpecConfig(segment_size=2, max_in_flight=3, top_k=2, max_nodes=8)
SAMPLED_ARGS = ("--segment-size", "2", "--max-in-flight", "3", "--top-k", "2", "--max-nodes", "8")


@pytest.fixture(scope="module")
def pair():
    target = _example_target(0, 4)
    return target, truncated_copy(target, 1)


def _run(pair, config, **kw):
    target, drafter = pair
    kw.setdefault("max_new_tokens", 24)
    return generate(target, torch.tensor([PROMPT]), world_size=1, vocab_size=96, drafter=drafter, config=config, **kw)


@pytest.mark.parametrize("config", [
    FlowSpecConfig(),
    FlowSpecConfig(segment_size=2, max_in_flight=3, top_k=2, max_nodes=12),
    FlowSpecConfig(segment_size=1, max_in_flight=4, top_k=1, max_nodes=3, max_depth=2),
    FlowSpecConfig(segment_size=16, max_in_flight=1, top_k=3, max_nodes=40, max_depth=3),
])
def test_greedy_equals_hf_generate_with_segments_in_flight(pair, config):
    out = _run(pair, config, max_new_tokens=24)
    assert out.sequences[0, len(PROMPT):].tolist() == reference(24)
    st = out.stats
    assert st.emitted_tokens == 24 and st.accepted_tokens > 0 and st.rounds < 24
    if (config.max_in_flight or 1) > 1:
        assert st.killed_in_flight > 0  # branches were pruned while their segments travelled


def test_eos_and_the_length_budget_end_generation(pair):
    ref = reference(24)
    eos = ref[9]
    out = _run(pair, SAMPLED, eos_token_id=eos)
    assert out.sequences[0, len(PROMPT):].tolist() == ref[: ref.index(eos) + 1]
    assert _run(pair, SAMPLED, max_new_tokens=1).num_generated == [1]


class NoResidual(DeterministicTreeRule):
    """Wrong on purpose: a rejected child keeps its mass, so the token emitted after a rejection comes from the
    whole target distribution instead of the residual (drafted tokens are over-represented)."""

    fused_mode = None  # the generic walk, which calls reject

    def reject(self, state, tokens, draft_probs):
        return state


def _first_two(pair, draws: int) -> torch.Tensor:
    rows = [_run(pair, SAMPLED, max_new_tokens=2, temperature=1.0, seed=s).sequences[0, len(PROMPT):] for s in range(draws)]
    return torch.stack(rows)


def _joint_pvalue(pair, tokens: torch.Tensor) -> float:
    from stat_helpers import chisquare_pvalue, first_two_token_tables

    _, joint = first_two_token_tables(pair[0], torch.tensor([PROMPT]))
    return chisquare_pvalue(tokens[:, 0] * 96 + tokens[:, 1], joint.flatten())


DRAWS = 600


def test_sampling_follows_the_target_and_two_stages_repeat_it(pair, tmp_path):
    proc, two, _ = launch(2, "--flowspec", *SAMPLED_ARGS, "--temperature", "1.0", "--max-new-tokens", "2",
                          "--draws", str(DRAWS), tmp_path=tmp_path, timeout=400)
    assert proc.returncode == 0, proc.stderr[-2000:]
    tokens = torch.tensor(two["all_tokens"])
    assert _joint_pvalue(pair, tokens) > 1e-3
    assert two["accepted"] >= 0 and two["segments"] > 0
    one = _first_two(pair, 100)  # the same seeds in one process: the same tokens (the schedule is fixed)
    assert one.tolist() == tokens[:100].tolist()
    accepted = sum(_run(pair, SAMPLED, max_new_tokens=2, temperature=1.0, seed=s).stats.accepted_tokens
                   for s in range(50))
    assert 10 < accepted < 95  # drafts are accepted and rejected: both branches of the rule are exercised


@pytest.mark.slow
def test_a_wrong_residual_rule_fails_the_same_test(pair, monkeypatch):
    monkeypatch.setattr(flowspec, "DeterministicTreeRule", NoResidual)
    assert _joint_pvalue(pair, _first_two(pair, DRAWS)) < 1e-6


@pytest.mark.parametrize("stages", [2, 3])
def test_greedy_over_real_stages_equals_hf_generate(tmp_path, stages):
    proc, result, _ = launch(stages, "--flowspec", "--max-new-tokens", "24", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert result["tokens"] == reference(24) and result["stages"] == stages
    assert result["rounds"] < 24 and result["killed_in_flight"] > 0
    assert len(result["stage_stats"]) == stages - 1


@pytest.mark.extended  # CI runs the naive pipeline's dead-stage test (tests/test_pipeline.py)
def test_a_dead_stage_ends_flowspec_with_an_error(tmp_path):
    proc, result, seconds = launch(2, "--flowspec", "--die-after", "3", "--timeout", "10", "--max-new-tokens", "16",
                                   tmp_path=tmp_path, timeout=120)
    assert proc.returncode != 0 and result is None
    ours = "error: stage" in proc.stderr
    agent = "exitcode" in proc.stderr and "rank" in proc.stderr
    assert ours or agent, proc.stderr[-2000:]
    assert seconds < 90


def test_bad_input_gets_named_errors(pair):
    target, drafter = pair
    with pytest.raises(MethodParameterError, match="segment_size must be an int >= 1"):
        FlowSpecConfig(segment_size=0)
    with pytest.raises(MethodParameterError, match="max_in_flight must be None or an int >= 1"):
        FlowSpecConfig(max_in_flight=0)
    with pytest.raises(MethodParameterError, match="max_nodes must be <= 512"):
        FlowSpecConfig(max_nodes=1000)
    with pytest.raises(MethodParameterError, match="batch 1"):
        generate(target, torch.tensor([PROMPT, PROMPT]), world_size=1, vocab_size=96, drafter=drafter,
                 max_new_tokens=4)
    with pytest.raises(MethodParameterError, match="a draft model"):
        generate(target, torch.tensor([PROMPT]), world_size=1, vocab_size=96, drafter="prompt_lookup",
                 max_new_tokens=4)
    with pytest.raises(MethodParameterError, match="config must be a FlowSpecConfig"):
        generate(target, torch.tensor([PROMPT]), world_size=1, vocab_size=96, drafter=drafter, config={},
                 max_new_tokens=4)


def test_an_eagle_head_reads_the_stages_hidden_states(pair, tmp_path):
    """The stages return the hidden states a feature drafter reads: over 2 stages the head drafts exactly what it
    drafts in one process (same rounds and acceptances), for FlowSpec and for the naive pipelined tree."""
    from mmspec.drafters.feature import FeatureDrafter
    from mmspec.drafters.tree import DynamicTree
    from mmspec.pipeline import run
    from mmspec.cli.pipeline import _head

    target = pair[0]
    proc, two, _ = launch(2, "--flowspec", "--draft-model", "head", "--max-in-flight", "2", "--max-new-tokens", "24",
                          tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    one = generate(target, torch.tensor([PROMPT]), world_size=1, vocab_size=96, drafter=_head(target, True),
                   config=FlowSpecConfig(max_in_flight=2), max_new_tokens=24)
    assert two["tokens"] == one.sequences[0, len(PROMPT):].tolist() == reference(24)
    assert (two["rounds"], two["accepted"]) == (one.stats.rounds, one.stats.accepted_tokens)
    assert one.stats.accepted_tokens > 0
    proc, naive, _ = launch(2, "--drafter", "truncated-tree", "--draft-model", "head", "--max-new-tokens", "24",
                            tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    head = _head(target, True).head
    single = run.generate(target, torch.tensor([PROMPT]), world_size=1, vocab_size=96, max_new_tokens=24,
                          drafter=FeatureDrafter(head, tree=DynamicTree(depth=3, top_k=3, num_nodes=8)))
    assert naive["tokens"] == reference(24)
    assert (naive["steps"], naive["accepted"]) == (single.stats.steps, single.stats.accepted_tokens)
