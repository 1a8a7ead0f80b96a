"""FlowSpec (mmspec.pipeline.flowspec): greedy output equals HF generate in one process (the pipeline simulated
by segments in flight) and over 2 and 3 in-process stages; sampled output follows the target (chi-square on the
first two tokens, with a negative control that breaks the residual rule) and the 2-stage run repeats the one-process
run for the same seeds; in-flight pruning happens; an EAGLE head drafts over the stages as in one process; a dead
stage makes rank 0 raise; bad input gets named errors. Over real stages (torchrun, gloo): greedy over 2 stages."""

import pytest
import torch
from test_pipeline import PROMPT, VOCAB, dies_after, in_process, launch, reference, split

from mmspec.errors import MethodParameterError
from mmspec.pipeline import InProcessPipeline, PipelineStageError, flowspec
from mmspec.cli.pipeline import _example_target
from mmspec.truncate import truncated_copy
from mmspec.pipeline.flowspec import FlowSpecConfig, generate
from mmspec.verify.tree_rules import DeterministicTreeRule

SAMPLED = FlowSpecConfig(segment_size=2, max_in_flight=3, top_k=2, max_nodes=8)


@pytest.fixture(scope="module")
def pair():
    target = _example_target(0, 4)
    return target, truncated_copy(target, 1)


def _run(pair, config, **kw):
    target, drafter = pair
    kw.setdefault("max_new_tokens", 24)
    return generate(target, torch.tensor([PROMPT]), vocab_size=VOCAB, drafter=drafter, config=config, **kw)


def _over_stages(pair, stages: int, config, seeds=(None,), **kw):
    """FlowSpec over ``stages`` in-process stages, one generation per seed (the same stages for all)."""
    target, drafter = pair
    kw.setdefault("max_new_tokens", 24)
    return in_process(target, stages, lambda stage0, transport: [generate(
        stage0, torch.tensor([PROMPT]), transport=transport, vocab_size=VOCAB, drafter=drafter, config=config,
        seed=seed, **kw) for seed in seeds])


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


def _draws(pair, draws: int, stages: int = 1) -> list:
    """Sampled two-token generations for seeds 0 .. draws - 1."""
    if stages == 1:
        return [_run(pair, SAMPLED, max_new_tokens=2, temperature=1.0, seed=s) for s in range(draws)]
    return _over_stages(pair, stages, SAMPLED, seeds=range(draws), max_new_tokens=2, temperature=1.0)


def _first_two(outs: list) -> torch.Tensor:
    """long [draws, 2]: the first two sampled tokens."""
    return torch.stack([out.sequences[0, len(PROMPT):] for out in outs])


def _joint_pvalue(pair, tokens: torch.Tensor) -> float:
    from stat_helpers import chisquare_pvalue, first_two_token_tables

    _, joint = first_two_token_tables(pair[0], torch.tensor([PROMPT]))
    return chisquare_pvalue(tokens[:, 0] * VOCAB + tokens[:, 1], joint.flatten())


#: generations per distribution test: the wrong rule below fails at p ~ 1e-15 with 300 (1e-37 with 600, 4e-8 with
#: 200), the right one passes at any count with probability 0.999
DRAWS = 300


def test_sampling_follows_the_target_and_two_stages_repeat_it(pair):
    two = _draws(pair, DRAWS, stages=2)
    tokens = _first_two(two)
    assert _joint_pvalue(pair, tokens) > 1e-3
    one = _draws(pair, 50)  # the same seeds in one process: the same tokens (the schedule is fixed)
    assert _first_two(one).tolist() == tokens[:50].tolist()
    accepted = sum(out.stats.accepted_tokens for out in one)
    assert 10 < accepted < 95  # drafts are accepted and rejected: both branches of the rule are exercised


@pytest.mark.extended  # negative control
def test_a_wrong_residual_rule_fails_the_same_test(pair, monkeypatch):
    monkeypatch.setattr(flowspec, "DeterministicTreeRule", NoResidual)
    assert _joint_pvalue(pair, _first_two(_draws(pair, DRAWS))) < 1e-6


@pytest.mark.parametrize("stages", [2, 3])
def test_greedy_over_stages_equals_hf_generate(pair, stages):
    [out] = _over_stages(pair, stages, FlowSpecConfig(), collect_stage_stats=True)
    assert out.sequences[0, len(PROMPT):].tolist() == reference(24)
    st = out.stats
    assert st.rounds < 24 and st.killed_in_flight > 0
    assert len(st.stages) == stages - 1 and all(s[0] > 0 and s[3] > 0 for s in st.stages)  # forwards, tokens


@pytest.mark.extended  # torchrun launches (default: the pipeline's real launches and FlowSpec in process)
def test_greedy_over_real_stages_equals_hf_generate(tmp_path):
    proc, result, _ = launch(2, "--flowspec", "--max-new-tokens", "24", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert result["tokens"] == reference(24) and result["stages"] == 2
    assert result["rounds"] < 24 and result["killed_in_flight"] > 0
    assert len(result["stage_stats"]) == 1


def test_a_dead_stage_makes_flowspec_raise(pair):
    target, drafter = pair
    models = split(target, 3)
    dies_after(models[2], 3)
    with pytest.raises(PipelineStageError, match="stage 0 .*: stage 2 ended: RuntimeError: this stage died"):
        with InProcessPipeline(models, timeout_s=60.0) as pipe:
            generate(pipe.stage0, torch.tensor([PROMPT]), transport=pipe.transport, vocab_size=VOCAB, drafter=drafter,
                     max_new_tokens=16)


@pytest.mark.extended  # CI runs the naive pipeline's dead-stage launch (tests/test_pipeline.py)
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
        generate(target, torch.tensor([PROMPT, PROMPT]), vocab_size=VOCAB, drafter=drafter, max_new_tokens=4)
    with pytest.raises(MethodParameterError, match="a draft model"):
        generate(target, torch.tensor([PROMPT]), vocab_size=VOCAB, drafter="prompt_lookup", max_new_tokens=4)
    with pytest.raises(MethodParameterError, match="config must be a FlowSpecConfig"):
        generate(target, torch.tensor([PROMPT]), vocab_size=VOCAB, drafter=drafter, config={}, max_new_tokens=4)


def test_an_eagle_head_reads_the_stages_hidden_states(pair):
    """The stages return the hidden states a feature drafter reads: over 2 stages the head drafts exactly what it
    drafts in one process (same rounds and acceptances), for FlowSpec and for the naive pipelined tree."""
    from mmspec.drafters.feature import FeatureDrafter
    from mmspec.drafters.tree import DynamicTree
    from mmspec.pipeline import run
    from mmspec.cli.pipeline import _head

    target = pair[0]
    config = FlowSpecConfig(max_in_flight=2)
    ids = torch.tensor([PROMPT])
    [two] = _over_stages((target, _head(target, True)), 2, config)
    one = generate(target, ids, vocab_size=VOCAB, drafter=_head(target, True), config=config, max_new_tokens=24)
    assert two.sequences.tolist() == one.sequences.tolist() and one.sequences[0, len(PROMPT):].tolist() == reference(24)
    assert (two.stats.rounds, two.stats.accepted_tokens) == (one.stats.rounds, one.stats.accepted_tokens)
    assert one.stats.accepted_tokens > 0

    def naive(stage0, transport=None):
        tree = DynamicTree(depth=3, top_k=3, num_nodes=8)
        return run.generate(stage0, ids, transport=transport, vocab_size=VOCAB, max_new_tokens=24,
                            drafter=FeatureDrafter(_head(target, True).head, tree=tree))

    over_two, single = in_process(target, 2, naive), naive(target)
    assert over_two.sequences[0, len(PROMPT):].tolist() == reference(24)
    assert (over_two.stats.steps, over_two.stats.accepted_tokens) == (single.stats.steps, single.stats.accepted_tokens)
