"""The pipelined target (mmspec.pipeline).

In process (:class:`InProcessPipeline`: every stage a thread, with the protocol, stage servers, timeouts and errors
of the gloo launch): greedy output equals HF generate for 1, 2 and 3 stages with and without a drafter and with an
uneven plan; sampled first tokens follow the target (chi-square) and repeat the one-process run for the same seeds;
a stage that dies or stops answering makes rank 0 raise :class:`PipelineStageError` naming it, never hang; every
message survives the codec and malformed ones get named errors.

Over real gloo groups on loopback started with torchrun (a few launches, ~9 s each, so gloo stays tested): greedy over
2 stages with a tree drafter, a dead stage ends every process with an error, a bad launch gets a named error."""

import json
import subprocess
import sys
import threading
import time
from dataclasses import fields
from functools import lru_cache

import pytest
import torch

from mmspec.cli.pipeline import _example_target
from mmspec.drafters.model import ModelDrafter
from mmspec.drafters.tree import DynamicTree
from mmspec.pipeline import (InProcessGroup, InProcessPipeline, PipelineConfigError, PipelineStageError, StagePlan,
                             build_stage_model, plan_stages, run)
from mmspec.pipeline import protocol as p
from mmspec.truncate import truncated_copy
from mmspec.pipeline.transport import Channel
from net_helpers import free_port

PROMPT = [5, 17, 33, 9, 41, 12]
VOCAB = 96


def launch(nproc: int, *args: str, tmp_path, timeout: float = 180.0):
    out = tmp_path / "result.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "-m", "mmspec", "pipeline", "--example", "--out", str(out), *args]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    result = json.loads(out.read_text()) if out.exists() else None
    return proc, result, time.perf_counter() - t0


@lru_cache(maxsize=None)
def _reference(new_tokens: int) -> tuple[int, ...]:
    model = _example_target(0, 4)
    with torch.no_grad():
        out = model.generate(torch.tensor([PROMPT]), max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return tuple(out[0, len(PROMPT):].tolist())


def reference(new_tokens: int) -> list[int]:
    """HF generate's greedy tokens after PROMPT on the example target."""
    return list(_reference(new_tokens))


@pytest.fixture(scope="module")
def target():
    return _example_target(0, 4)


def make_drafter(kind: str, target):
    """The CLI's ``--drafter`` choices over the example target (the truncated drafter: its first layer)."""
    if kind == "truncated":
        return truncated_copy(target, 1)
    if kind == "truncated-tree":
        return ModelDrafter(truncated_copy(target, 1), tree=DynamicTree(depth=3, top_k=3, num_nodes=8))
    return None if kind == "none" else kind


def in_process(target, stages: int, fn, plan: StagePlan | None = None, timeout_s: float = 30.0):
    """``fn(stage 0, transport)`` on rank 0 of ``target`` split over ``stages`` in-process stages."""
    with InProcessPipeline.split(target, stages, plan, timeout_s=timeout_s) as pipe:
        return fn(pipe.stage0, pipe.transport)


def pipelined_generate(target, stages: int, plan: StagePlan | None = None, *, batch: int = 1, **kw):
    """The naive pipelined loop (:func:`run.generate`) over ``stages`` in-process stages, ``batch`` rows of PROMPT."""
    ids = torch.tensor([PROMPT]).expand(batch, -1).contiguous()
    return in_process(target, stages, lambda stage0, transport: run.generate(
        stage0, ids, transport=transport, vocab_size=VOCAB, **kw), plan)


def dies_after(stage: torch.nn.Module, forwards: int, *, hang: threading.Event | None = None) -> torch.nn.Module:
    """Make ``stage`` raise (or, with ``hang``, wait for that event: a stage that stopped answering) after
    ``forwards`` forwards."""
    count = [0]
    original = stage.forward

    def forward(*args, **kwargs):
        count[0] += 1
        if count[0] > forwards:
            if hang is None:
                raise RuntimeError("this stage died")
            hang.wait(timeout=30)
        return original(*args, **kwargs)

    stage.forward = forward
    return stage


def split(target, stages: int) -> list[torch.nn.Module]:
    plan = plan_stages(4, stages)
    return [build_stage_model(target, plan, s) for s in range(stages)]


CORE = {(1, "truncated"), (2, "none"), (2, "truncated-tree"), (2, "prompt_lookup"), (3, "truncated-tree")}
# the rest of the grid is marked extended (in process each case takes well under a second)


@pytest.mark.parametrize("stages, drafter", [
    pytest.param(s, d, marks=() if (s, d) in CORE else pytest.mark.extended)
    for s in (1, 2, 3) for d in ("none", "truncated", "truncated-tree", "prompt_lookup")])
def test_greedy_pipeline_equals_hf_generate(target, stages, drafter):
    out = pipelined_generate(target, stages, drafter=make_drafter(drafter, target), max_new_tokens=16)
    assert out.sequences[0, len(PROMPT):].tolist() == reference(16)
    if drafter.startswith("truncated"):
        assert out.stats.steps < 16  # drafts were accepted: fewer pipeline passes than tokens


def test_an_uneven_plan_decodes_the_same(target):
    out = pipelined_generate(target, 3, StagePlan((0, 1, 3, 4)), drafter=make_drafter("truncated", target),
                             max_new_tokens=12)
    assert out.sequences[0, len(PROMPT):].tolist() == reference(12)


@pytest.mark.extended  # batch 20000 twice: the model's compute, not the pipeline (CI keeps FlowSpec's sampling test)
def test_sampling_over_two_stages_follows_the_target_and_repeats_the_single_process_run(target):
    from stat_helpers import chisquare_pvalue

    kw = dict(drafter=make_drafter("truncated", target), temperature=1.0, batch=20000, max_new_tokens=2, seed=3)
    two = pipelined_generate(target, 2, **kw)
    first = two.sequences[:, len(PROMPT)]
    with torch.no_grad():
        probs = target(input_ids=torch.tensor([PROMPT])).logits[0, -1].double().softmax(-1)
    assert chisquare_pvalue(first, probs) > 1e-3
    assert 0 < two.stats.accepted_tokens < two.stats.drafted_tokens
    one = pipelined_generate(target, 1, **kw)  # the same seeds: the same tokens as one process
    assert torch.equal(one.sequences, two.sequences)


@pytest.mark.parametrize("stages, dead", [(2, 1), (3, 1), (3, 2)])
def test_a_dead_stage_makes_rank_0_raise_naming_it(target, stages, dead):
    models = split(target, stages)
    dies_after(models[dead], 3)
    t0 = time.perf_counter()
    pipe = InProcessPipeline(models, timeout_s=60.0)
    with pytest.raises(PipelineStageError, match=rf"stage 0 .*: stage {dead} ended: RuntimeError: this stage died"):
        with pipe:
            run.generate(pipe.stage0, torch.tensor([PROMPT]), transport=pipe.transport, vocab_size=VOCAB,
                         max_new_tokens=16)
    assert time.perf_counter() - t0 < 20  # at once, not after the timeout
    assert not any(t.is_alive() for t in pipe.threads)  # every stage thread ended


def test_a_silent_stage_times_out(target):
    release = threading.Event()
    models = split(target, 3)
    dies_after(models[2], 2, hang=release)
    pipe = InProcessPipeline(models, timeout_s=1.0)
    try:
        with pytest.raises(PipelineStageError, match="stage 0 got no answer from stage 2 .*nothing within 1 s"):
            with pipe:
                run.generate(pipe.stage0, torch.tensor([PROMPT]), transport=pipe.transport, vocab_size=VOCAB,
                             max_new_tokens=16)
    finally:
        release.set()
    for t in pipe.threads:
        t.join(timeout=10)
    assert not any(t.is_alive() for t in pipe.threads)


def _example_messages() -> list[p.Message]:
    f32, longs = torch.randn(2, 3, 8), torch.tensor([[1, 0, 1], [1, 1, 1]])
    return [
        p.Extend(f32, 2, longs, torch.randn(2, 3, 16)), p.Extend(f32, 3), p.BeginTree(),
        p.ExtendTree(f32.double(), longs - 1, longs, None), p.KeepPath(longs, torch.tensor([2, 3])),
        p.Rollback(torch.tensor([1, 0])), p.Select(torch.tensor([1])), p.Reset(), p.Features(torch.tensor([0, 3])),
        p.Features(torch.zeros(0, dtype=torch.long)), p.Segment(torch.tensor([[7, 8], [-1, 7]]), f32[:1, :2]),
        p.Segment(torch.zeros((2, 0), dtype=torch.long), f32[:1, :0]), p.Commit(torch.tensor([7, 8])), p.Stats(),
        p.Stop(), p.Logits(f32.bfloat16(), None), p.SegmentResult(torch.tensor([7]), f32[:1, :1], f32[:1, :1]),
        p.SegmentResult(torch.zeros(0, dtype=torch.long), None, None), p.StageStats(torch.arange(5.0).double()),
        p.Kill.of(12, [13, 15]), p.StopListening()]


def test_every_message_survives_the_codec():
    messages = _example_messages()
    assert {type(m) for m in messages} == set(p.MESSAGES)
    group = InProcessGroup(2, timeout_s=5.0)
    sender, receiver = group.transport(0), group.transport(1)
    for m in messages:
        m.send(sender, 1, Channel.KILL)
        got = p.receive(receiver, 0, Channel.KILL, expect=type(m))
        for f in fields(m):
            a, b = getattr(m, f.name), getattr(got, f.name)
            assert (a is None and b is None) or (isinstance(a, int) and a == b) or (
                a.dtype == b.dtype and torch.equal(a, b)), (m, f.name)
    assert receiver.recv_wait_s == 0.0  # the side channel's waits are not counted


def test_malformed_messages_get_named_errors():
    group = InProcessGroup(2, timeout_s=5.0)
    sender, receiver = group.transport(0), group.transport(1)
    with pytest.raises(p.ProtocolError, match="Rollback.num_remove must have 1 dims"):
        p.Rollback(torch.tensor([[1]])).send(sender, 1)
    with pytest.raises(p.ProtocolError, match="Logits.features: torch.float64, but the message's floats are torch.float32"):
        p.Logits(torch.zeros(1, 1, 4), torch.zeros(1, 1, 4, dtype=torch.float64)).send(sender, 1)
    sender.send(torch.tensor([99] + [0] * (p.HEADER - 1)), 1)
    with pytest.raises(p.ProtocolError, match="stage 1 received an unknown message .op 99"):
        p.receive(receiver, 0)
    p.Stats().send(sender, 1)
    with pytest.raises(p.ProtocolError, match="stage 1 expected Logits or SegmentResult from stage 0, got Stats"):
        p.receive(receiver, 0, expect=(p.Logits, p.SegmentResult))
    p.Logits(torch.zeros(1, 1, 4)).send(sender, 1)
    with pytest.raises(p.ProtocolError, match="stage 1 expected Extend or .* from stage 0, got Logits"):
        p.receive(receiver, 0, expect=p.COMMANDS)
    sender.send(torch.zeros(3), 1)
    with pytest.raises(PipelineStageError, match=r"stage 1 expected torch.int64 \[16\] from stage 0, got torch.float32"):
        p.receive(receiver, 0)
    with pytest.raises(PipelineStageError, match="stage 1 got no answer from stage 0 .*nothing within 0.1 s"):
        p.receive(InProcessGroup(2, timeout_s=0.1).transport(1), 0)


def test_a_stage_names_a_command_it_cannot_act_on(target):
    pipe = InProcessPipeline(split(target, 2), timeout_s=30.0)
    with pytest.raises(PipelineStageError, match="stage 1 ended: ProtocolError: stage 1 received Rollback before any "
                                                 "Extend"):
        with pipe:
            p.Rollback(torch.tensor([1])).send(pipe.transport, 1)
            p.receive(pipe.transport, 1)
    assert not any(t.is_alive() for t in pipe.threads)


# -- real process groups (torchrun, gloo) ------------------------------------------------------------------------------
def test_greedy_over_two_real_stages_with_a_tree_drafter(tmp_path):
    proc, result, _ = launch(2, "--drafter", "truncated-tree", "--max-new-tokens", "16", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert result["tokens"] == reference(16) and result["stages"] == 2
    assert result["steps"] < 16


def test_a_dead_stage_ends_every_process_with_an_error(tmp_path):
    proc, result, seconds = launch(3, "--die-after", "3", "--timeout", "10", "--max-new-tokens", "16", tmp_path=tmp_path,
                                   timeout=120)
    assert proc.returncode != 0 and result is None
    # either a stage reports the dead peer itself, or torchrun's agent tears the group down first and names it
    ours = "error: stage" in proc.stderr and ("got no answer" in proc.stderr or "cannot reach" in proc.stderr)
    agent = "exitcode" in proc.stderr and "rank" in proc.stderr
    assert ours or agent, proc.stderr[-2000:]
    assert seconds < 90


def test_bad_launches_get_named_errors(tmp_path, target):
    proc, _, _ = launch(2, "--plan", "0,1,2,4", tmp_path=tmp_path)
    assert proc.returncode != 0 and "3 stages but 2 processes" in proc.stderr
    with pytest.raises(PipelineConfigError, match="5 stages cannot split 4 layers"):
        plan_stages(4, 5)
    with pytest.raises(PipelineConfigError, match="rise strictly"):
        StagePlan((0, 2, 2, 4))
    with pytest.raises(PipelineConfigError, match="covers 3 layers but the model has 4"):
        build_stage_model(target, StagePlan((0, 1, 3)), 0)
    with pytest.raises(PipelineConfigError, match="cannot be split"):
        build_stage_model(torch.nn.Linear(2, 2), StagePlan((0, 1)), 0)
    with pytest.raises(PipelineConfigError, match="the plan has 3 stages but 2 processes"):
        InProcessPipeline.split(target, 2, StagePlan((0, 1, 2, 4)))
    with pytest.raises(PipelineConfigError, match="no process group: call mmspec.pipeline.init_group first"):
        run.generate(target, torch.tensor([PROMPT]), world_size=2, vocab_size=VOCAB, max_new_tokens=2)


def test_cost_balanced_plans():
    assert plan_stages(4, 2).boundaries == (0, 2, 4)
    assert plan_stages(30, 3).boundaries == (0, 10, 20, 30)
    assert plan_stages(7, 2, layer_costs=[4, 1, 1, 1, 1, 1, 1]).boundaries == (0, 2, 7)
    # the LM head costs 3 layers: the last stage gets fewer layers
    assert plan_stages(9, 2, last_extra=3.0).boundaries == (0, 6, 9)


def test_stage_models_compose_to_the_whole_model(target):
    plan = StagePlan((0, 1, 3, 4))
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        hidden = build_stage_model(target, plan, 0)(input_ids=ids).logits
        hidden = build_stage_model(target, plan, 1)(inputs_embeds=hidden).logits
        logits = build_stage_model(target, plan, 2)(inputs_embeds=hidden).logits
        full = target(input_ids=ids).logits
    assert torch.allclose(logits, full, atol=1e-5)
