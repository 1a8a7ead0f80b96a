"""``torchrun --nproc-per-node N -m mmspec pipeline``: the target split over N stage processes (gloo), rank 0
decoding (plain pipelined AR, or speculative with a drafter on rank 0). Rank 0 prints the result (and writes
``--out`` as JSON); a stage that dies or stops answering makes every process exit with code 5 and one line."""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch


def _example_target(seed: int, layers: int) -> torch.nn.Module:
    """A tiny random Llama (the same on every rank: built from the seed)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2, max_position_embeddings=512)
    model = LlamaForCausalLM(cfg).to(torch.float32).eval()
    model.generation_config.eos_token_id = None
    return model


def main(argv: list[str] | None = None) -> int:
    from mmspec.pipeline.plan import PipelineConfigError, StagePlan
    from mmspec.pipeline.run import DEFAULT_TIMEOUT_S, generate, init_group, serve_stage, stage_for_rank
    from mmspec.pipeline.session import PipelineStageError
    from mmspec.pipeline.stage import truncated_copy

    ap = argparse.ArgumentParser(prog="torchrun --nproc-per-node N -m mmspec pipeline", description=__doc__.split("\n")[0])
    ap.add_argument("--example", action="store_true", help="a tiny random Llama (tests) instead of SmolLM2")
    ap.add_argument("--example-layers", type=int, default=4)
    ap.add_argument("--plan", default=None, help="stage boundaries, e.g. 0,10,30 (default: even split)")
    ap.add_argument("--drafter", default="none", choices=["none", "prompt_lookup", "truncated", "truncated-tree"],
                    help="none: pipelined AR; truncated: the target's first layer as a drafter on rank 0 (chains, "
                         "or an EAGLE-2 dynamic tree of 8 nodes)")
    ap.add_argument("--draft-layers", type=int, default=1, help="layers of the truncated drafter")
    ap.add_argument("--flowspec", action="store_true",
                    help="FlowSpec: stream score-ordered segments of a growing draft tree through the stages "
                         "(the truncated drafter; batch 1)")
    ap.add_argument("--segment-size", type=int, default=4)
    ap.add_argument("--max-in-flight", type=int, default=None, help="segments in flight (default: one per stage)")
    ap.add_argument("--top-k", type=int, default=3, help="FlowSpec: children per expanded node")
    ap.add_argument("--max-nodes", type=int, default=64, help="FlowSpec: nodes per draft tree")
    ap.add_argument("--draft-model", default="truncated", choices=["truncated", "distilled", "head"],
                    help="the target's first --draft-layers layers; SmolLM2's shipped distilled 2-layer drafter; or an "
                         "EAGLE-3 head reading the target's hidden states (SmolLM2: the shipped head; --example: a "
                         "random one)")
    ap.add_argument("--pack", action="store_true", help="pre-pack linear weights for oneDNN (CPU, float32)")
    ap.add_argument("--draws", type=int, default=1, help="FlowSpec: generations with seeds seed, seed + 1, ... "
                    "(sampling tests; all_tokens in the result)")
    ap.add_argument("--num-draft-tokens", type=int, default=4)
    ap.add_argument("--prompt-ids", default="5,17,33,9,41,12", help="--example: comma-separated ids")
    ap.add_argument("--prompt", default="Give me three tips for staying focused while studying.")
    ap.add_argument("--batch", type=int, default=1, help="--example: rows of the same prompt (sampling tests)")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds any stage waits for another")
    ap.add_argument("--die-after", type=int, default=0, help=argparse.SUPPRESS)  # tests: rank 1 exits after n forwards
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    try:
        rank, world = init_group(a.timeout)
        tokenizer = None
        if a.example:
            target = _example_target(0, a.example_layers)  # the same weights on every rank and in the tests
            input_ids = torch.tensor([[int(x) for x in a.prompt_ids.split(",")]]).expand(a.batch, -1).contiguous()
            attention_mask = None
        else:
            from mmspec.pretrained import chat_inputs, load_causal_lm

            target, tokenizer = load_causal_lm()
            enc = chat_inputs(tokenizer, [a.prompt])
            input_ids, attention_mask = enc["input_ids"], enc["attention_mask"]
        vocab = int(target.config.vocab_size)
        drafter = None
        draft_model = None
        if rank == 0 and (a.drafter in ("truncated", "truncated-tree") or a.flowspec) and a.draft_model == "head":
            draft_model = _head(target, a.example)
        elif rank == 0 and (a.drafter in ("truncated", "truncated-tree") or a.flowspec):
            if a.draft_model == "distilled" and not a.example:
                from mmspec.zoo.smollm2 import load_smollm2_drafter

                draft_model = load_smollm2_drafter("model", target)
            else:
                draft_model = truncated_copy(target, a.draft_layers)
            if a.pack:
                from mmspec.cpu_packing import pack_linear_weights

                pack_linear_weights(draft_model)
        if rank == 0 and (a.drafter == "truncated" or a.flowspec):
            drafter = draft_model
        elif rank == 0 and a.drafter == "truncated-tree":
            from mmspec.drafters.feature import FeatureDrafter
            from mmspec.drafters.model import ModelDrafter
            from mmspec.drafters.tree import DynamicTree

            tree = DynamicTree(depth=3, top_k=3, num_nodes=8)
            drafter = (FeatureDrafter(draft_model.head, tree=tree) if a.draft_model == "head"
                       else ModelDrafter(draft_model, tree=tree))
        elif a.drafter == "prompt_lookup":
            drafter = "prompt_lookup"
        plan = StagePlan(tuple(int(x) for x in a.plan.split(","))) if a.plan else None
        eos = target.generation_config.eos_token_id
        stage = stage_for_rank(target, rank, world, plan)
        if a.pack:
            from mmspec.cpu_packing import pack_linear_weights

            pack_linear_weights(stage)
        if rank > 0:
            if a.die_after and rank == 1:
                _die_after(stage, a.die_after)
            serve_stage(stage, rank, world)
            return 0
        if a.flowspec:
            return _run_flowspec(a, stage, input_ids, attention_mask, world, vocab, drafter, eos, tokenizer)
        t0 = time.perf_counter()
        out = generate(stage, input_ids, world_size=world, vocab_size=vocab, drafter=drafter,
                       max_new_tokens=a.max_new_tokens, temperature=a.temperature, seed=a.seed,
                       num_draft_tokens=a.num_draft_tokens, eos_token_id=eos, attention_mask=attention_mask)
        seconds = time.perf_counter() - t0

        from mmspec.pipeline.session import stop_stages

        stop_stages(world)
        new = out.sequences[0, input_ids.shape[1]:].tolist()
        result = {"tokens": new, "seconds": seconds,
                  "all_tokens": out.sequences[:, input_ids.shape[1]:].tolist() if a.batch > 1 else None, "stages": world, "steps": out.stats.steps,
                  "accepted": out.stats.accepted_tokens, "drafted": out.stats.drafted_tokens}
        return _report(result, new, tokenizer, a.out)
    except (PipelineStageError, PipelineConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 5 if isinstance(exc, PipelineStageError) else 2
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001 - a dead peer can make the teardown itself fail
                pass


def _head(target: torch.nn.Module, example: bool):
    """An EAGLE-3 feature drafter: SmolLM2's shipped head, or (``--example``) a random head (seeded, so the
    same on every run) over the tiny target."""
    if not example:
        from mmspec.zoo.smollm2 import load_smollm2_drafter

        return load_smollm2_drafter("head", target, draft_length=4)
    from mmspec.drafters.feature import FeatureDrafter
    from mmspec.heads.eagle3 import Eagle3Config, Eagle3Head

    torch.manual_seed(1)
    vocab = int(target.config.vocab_size)
    d2t = torch.randperm(vocab)[:64].sort().values
    head = Eagle3Head(Eagle3Config.from_target(target, d2t.numel()), d2t=d2t).eval()
    head.init_from_target(target)
    return FeatureDrafter(head.attach(target), 4)


def _run_flowspec(a, stage, input_ids, attention_mask, world, vocab, drafter, eos, tokenizer) -> int:
    from mmspec.pipeline.flowspec import FlowSpecConfig, generate
    from mmspec.pipeline.session import stop_stages

    config = FlowSpecConfig(segment_size=a.segment_size, max_in_flight=a.max_in_flight, top_k=a.top_k,
                            max_nodes=a.max_nodes)
    t0 = time.perf_counter()
    draws = []
    for i in range(max(1, a.draws)):
        out = generate(stage, input_ids[:1], world_size=world, vocab_size=vocab, drafter=drafter, config=config,
                       max_new_tokens=a.max_new_tokens, temperature=a.temperature, seed=a.seed + i,
                       eos_token_id=eos, attention_mask=None if attention_mask is None else attention_mask[:1],
                       collect_stage_stats=i == a.draws - 1 or a.draws <= 1)
        draws.append(out.sequences[0, input_ids.shape[1]:].tolist())
    seconds = time.perf_counter() - t0
    stop_stages(world)
    st = out.stats
    new = draws[0]
    result = {"tokens": new, "all_tokens": draws if a.draws > 1 else None, "seconds": seconds, "stages": world,
              "rounds": st.rounds, "segments": st.segments,
              "accepted": st.accepted_tokens, "nodes_sent": st.nodes_sent, "killed_in_flight": st.killed_in_flight,
              "pruned_in_flight": st.pruned_in_flight, "time_split": st.time_split, "stage_stats": st.stages}
    return _report(result, new, tokenizer, a.out)


def _report(result: dict, new: list[int], tokenizer, out: str | None) -> int:
    """Rank 0: print the result as one JSON line (with the text when there is a tokenizer) and write ``out``."""
    if tokenizer is not None:
        result["text"] = tokenizer.decode(new, skip_special_tokens=True)
    print(json.dumps(result))
    if out:
        with open(out, "w") as f:
            json.dump(result, f)
    return 0


def _die_after(stage: torch.nn.Module, forwards: int) -> None:
    """Tests: make this process exit (as if killed) after ``forwards`` forwards."""
    import os

    count = {"n": 0}
    original = stage.forward

    def forward(*args, **kwargs):
        count["n"] += 1
        if count["n"] > forwards:
            os._exit(9)
        return original(*args, **kwargs)

    stage.forward = forward


if __name__ == "__main__":
    sys.exit(main())
