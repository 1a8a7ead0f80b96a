"""The pipelined target (mmspec.pipeline): real multi-process gloo groups on loopback started with torchrun.
Greedy output equals HF generate for 1, 2 and 3 stages with and without a drafter; a stage that dies makes
rank 0 exit with a clear error within the timeout; bad plans get named errors."""

import json
import socket
import subprocess
import sys
import time

import pytest
import torch

from mmspec.pipeline import PipelineConfigError, StagePlan, build_stage_model, plan_stages
from mmspec.cli.pipeline import _example_target

PROMPT = [5, 17, 33, 9, 41, 12]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(nproc: int, *args: str, tmp_path, timeout: float = 180.0):
    out = tmp_path / "result.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), "-m", "mmspec", "pipeline", "--example", "--out", str(out), *args]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    result = json.loads(out.read_text()) if out.exists() else None
    return proc, result, time.perf_counter() - t0


def reference(new_tokens: int, layers: int = 4) -> list[int]:
    model = _example_target(0, layers)
    with torch.no_grad():
        out = model.generate(torch.tensor([PROMPT]), max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return out[0, len(PROMPT):].tolist()


CORE = {(1, "truncated"), (2, "none"), (2, "truncated-tree"), (2, "prompt_lookup")}  # CI runs these (3 stages: FlowSpec's
# tests); the rest of the grid is marked extended, beyond CI's budget (each launch takes ~9 s)


@pytest.mark.parametrize("stages, drafter", [
    pytest.param(s, d, marks=() if (s, d) in CORE else pytest.mark.extended)
    for s in (1, 2, 3) for d in ("none", "truncated", "truncated-tree", "prompt_lookup")])
def test_greedy_pipeline_equals_hf_generate(tmp_path, stages, drafter):
    proc, result, _ = launch(stages, "--drafter", drafter, "--max-new-tokens", "16", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert result["tokens"] == reference(16) and result["stages"] == stages
    if drafter.startswith("truncated"):
        assert result["steps"] < 16  # drafts were accepted: fewer pipeline passes than tokens


@pytest.mark.extended  # ~30 s; CI keeps FlowSpec's sampling test over 2 stages
def test_sampling_over_two_stages_follows_the_target_and_repeats_the_single_process_run(tmp_path):
    from stat_helpers import chisquare_pvalue

    args = ("--drafter", "truncated", "--temperature", "1.0", "--batch", "20000", "--max-new-tokens", "2", "--seed", "3")
    proc, two, _ = launch(2, *args, tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    first = torch.tensor([row[0] for row in two["all_tokens"]])
    with torch.no_grad():
        p = _example_target(0, 4)(input_ids=torch.tensor([PROMPT])).logits[0, -1].double().softmax(-1)
    assert chisquare_pvalue(first, p) > 1e-3
    assert 0 < two["accepted"] < two["drafted"]
    proc, one, _ = launch(1, *args, tmp_path=tmp_path)  # the same seeds: the same tokens as one process
    assert proc.returncode == 0 and one["all_tokens"] == two["all_tokens"]


@pytest.mark.extended
def test_an_uneven_plan_decodes_the_same(tmp_path):
    proc, result, _ = launch(3, "--plan", "0,1,3,4", "--drafter", "truncated", "--max-new-tokens", "12", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert result["tokens"] == reference(12)


def test_a_dead_stage_ends_every_process_with_an_error(tmp_path):
    proc, result, seconds = launch(3, "--die-after", "3", "--timeout", "10", "--max-new-tokens", "16", tmp_path=tmp_path,
                                   timeout=120)
    assert proc.returncode != 0 and result is None
    # either a stage reports the dead peer itself, or torchrun's agent tears the group down first and names it
    ours = "error: stage" in proc.stderr and ("got no answer" in proc.stderr or "cannot reach" in proc.stderr)
    agent = "exitcode" in proc.stderr and "rank" in proc.stderr
    assert ours or agent, proc.stderr[-2000:]
    assert seconds < 90


def test_bad_launches_get_named_errors(tmp_path):
    proc, _, _ = launch(2, "--plan", "0,1,2,4", tmp_path=tmp_path)
    assert proc.returncode != 0 and "3 stages but 2 processes" in proc.stderr
    with pytest.raises(PipelineConfigError, match="5 stages cannot split 4 layers"):
        plan_stages(4, 5)
    with pytest.raises(PipelineConfigError, match="rise strictly"):
        StagePlan((0, 2, 2, 4))
    with pytest.raises(PipelineConfigError, match="covers 3 layers but the model has 4"):
        build_stage_model(_example_target(0, 4), StagePlan((0, 1, 3)), 0)
    with pytest.raises(PipelineConfigError, match="cannot be split"):
        build_stage_model(torch.nn.Linear(2, 2), StagePlan((0, 1)), 0)


def test_cost_balanced_plans():
    assert plan_stages(4, 2).boundaries == (0, 2, 4)
    assert plan_stages(30, 3).boundaries == (0, 10, 20, 30)
    assert plan_stages(7, 2, layer_costs=[4, 1, 1, 1, 1, 1, 1]).boundaries == (0, 2, 7)
    # the LM head costs 3 layers: the last stage gets fewer layers
    assert plan_stages(9, 2, last_extra=3.0).boundaries == (0, 6, 9)


def test_stage_models_compose_to_the_whole_model():
    model = _example_target(0, 4)
    plan = StagePlan((0, 1, 3, 4))
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        hidden = build_stage_model(model, plan, 0)(input_ids=ids).logits
        hidden = build_stage_model(model, plan, 1)(inputs_embeds=hidden).logits
        logits = build_stage_model(model, plan, 2)(inputs_embeds=hidden).logits
        full = model(input_ids=ids).logits
    assert torch.allclose(logits, full, atol=1e-5)
