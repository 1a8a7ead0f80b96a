"""Train the zoo's image-generation models on the scene world: VQ tokenizer, AR target, AR drafter and
the low-resolution model of MuLo-SD's multi-scale drafter.

Papers: Mentzer et al., "Finite Scalar Quantization: VQ-VAE Made Simple" (ICLR 2024) for the
tokenizer (``vector_quantize_pytorch.FSQ`` on a diffusers VQModel encoder/decoder); Sun et al.,
"LlamaGen" (2024) for the text-conditioned raster AR models with a dropped condition for
classifier-free guidance.

Glossary:
    stage         one model: ``vq`` (must run first), then ``target``, ``drafter``, ``lowres``,
                  ``resampler`` (need the tokenizer), ``head`` (needs the target); each trains through the
                  one loop (:func:`mmspec.zoo.training.run_stage`) with its ``LoopConfig`` written out below,
                  resumes from ``--run-dir`` and exports to ``--out/<stage>``
    head          an EAGLE-3 feature head over the target's hidden states (Li et al., arXiv 2503.01840),
                  trained with training-time test on teacher-forced scenes: both CFG halves (the prompt,
                  and the null prompt for ``head_uncond`` of the rows), the target's own distributions as
                  soft labels
    FSQ lattice   levels (8, 5, 5, 5): 1000 fixed codes; neighbouring lattice points decode to similar
                  patches (what LANTERN's and MuLo-SD's latent neighbourhoods need), and no code can die
    round-trip    an extra tokenizer loss ||bound(E(D(z_q))) - sg(z_q)||^2 that keeps encode(decode(t)) == t,
                  so tokens survive a decode/re-encode (needed by MuLo-SD's resolution changes)
    cond drop     10 % of the AR training prompts are replaced by the null prompt (the CFG "uncond" half)
    fp32          the AR stages train in fp32 (``--preset bf16``: forward passes under bf16 autocast;
                  faster steps, less faithful models)
    fixed points  the exported tokenizer encodes to fixed points of decode -> encode (exact round
                  trips, :mod:`mmspec.image_gen.fixed_point`); the AR stages train on one-pass FSQ tokens

Usage::

    python -m mmspec.zoo.train_image --out mmspec/zoo/weights/image          # the shipped models
    python -m mmspec.zoo.train_image --out /tmp/m --preset smoke             # seconds, for tests
    python -m mmspec.zoo.train_image --out /tmp/m --preset bf16 --stages target  # bf16-autocast target
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from mmspec.distill.loop import LoopConfig
from mmspec.heads.ttt import ttt_loss
from mmspec.image_gen.feature_head import forced_batch, image_head
from mmspec.image_gen.fixed_point import FixedPointEncoding
from mmspec.image_gen.model import ARImageConfig, ARImageModel
from mmspec.image_gen.multiscale import resize_images
from mmspec.image_gen.token_resampler import TokenResampler, TokenResamplerConfig
from mmspec.image_gen.tokenizer import VQTokenizer, write_fsq_codebook
from mmspec.zoo import LIVE_CODES_FILE, live_codes
from mmspec.zoo.scenes import CELLS, COLOURS, SHAPES

from .data import IMAGE_SIZE, render_batch, train_scenes
from .quality import SceneClassifier
from .training import run_stage, training_cli, zoo_stage

STAGES = ("vq", "target", "drafter", "lowres", "resampler", "head", "classifier")
WORDS = tuple(sorted({"a", "and", "at", "the", *COLOURS, *SHAPES, *(w for c in CELLS for w in c.split())}))
COND_DROP = 0.1
LOWRES_SCALE = 2


@dataclass(frozen=True)
class ImageZooConfig:
    fsq_levels: tuple[int, ...] = (8, 5, 5, 5)  # 1000 lattice codes of dimension 4 (the FSQ paper's 2^10 choice)
    codebook_size: int = 1000
    vq_channels: tuple[int, ...] = (16, 32, 64)
    vq: LoopConfig = zoo_stage(steps=1500, lr=2e-3, warmup=50, weight_decay=0.0, save_every=100)
    vq_batch: int = 16
    roundtrip_weight: float = 1.0
    target: ARImageConfig = ARImageConfig(codebook_size=1000, grid_size=16, words=WORDS, hidden_size=128,
                                          num_layers=6, num_heads=4, num_kv_heads=2, intermediate_size=384)
    drafter: ARImageConfig = ARImageConfig(codebook_size=1000, grid_size=16, words=WORDS, hidden_size=64,
                                           num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=192)
    # MuLo-SD's drafter is the same kind of model as the target at 1/2 resolution (the paper's Tar pairs have
    # equal capacity): the gain comes from 4x fewer low-res tokens, not from a smaller network
    lowres: ARImageConfig = ARImageConfig(codebook_size=1000, grid_size=8, words=WORDS, hidden_size=128,
                                          num_layers=6, num_heads=4, num_kv_heads=2, intermediate_size=384)
    # fp32 (docs/design/zoo.md: 3000 fp32 steps bound colours/shapes to the prompt in 70 % of samples against
    # 53 % under bf16 autocast; 719 ms a step, about 36 min, inside the 60-min script)
    target_budget: LoopConfig = zoo_stage(steps=3000, lr=2e-3, warmup=100, weight_decay=0.01, save_every=100)
    drafter_budget: LoopConfig = zoo_stage(steps=1500, lr=2e-3, warmup=100, weight_decay=0.01, save_every=100)
    lowres_budget: LoopConfig = zoo_stage(steps=3000, lr=2e-3, warmup=100, weight_decay=0.01, save_every=100)
    ar_batch: int = 24
    ar_bf16: bool = False  # bf16 autocast of the AR stages' forward pass (weights and optimiser stay fp32)
    # MuLo-SD's learned U_r / D_r (token space, cross-entropy on tokens of the same scene at both sizes)
    resampler: TokenResamplerConfig = TokenResamplerConfig(vocab_size=1000, scale=LOWRES_SCALE, width=96, depth=3)
    resampler_budget: LoopConfig = zoo_stage(steps=1500, lr=2e-3, warmup=50, weight_decay=0.01, save_every=100)
    resampler_batch: int = 32
    # the EAGLE-3 head on the target's features (both CFG halves; training-time test over 3 steps)
    head_budget: LoopConfig = zoo_stage(steps=2500, lr=1e-3, warmup=50, weight_decay=0.0, save_every=100)
    head_batch: int = 12
    head_uncond: float = 0.3  # fraction of rows under the null prompt (the head drafts both halves)
    head_ttt_steps: int = 3
    # HF hidden_states indices the head reads: low, middle and the final (normed) layer of the 6-layer target
    # (EAGLE-1 read the top feature; EAGLE-3's low / mid / high; the generic choice repeats layer 3 here)
    head_layers: tuple[int, int, int] = (2, 4, 6)
    classifier: LoopConfig = zoo_stage(steps=3000, lr=2e-3, warmup=30, weight_decay=0.0, save_every=100)
    classifier_batch: int = 32
    seed: int = 0


_SMOKE = zoo_stage(steps=3, lr=1e-3, warmup=1, weight_decay=0.0, save_every=2)
PRESETS = {
    "full": ImageZooConfig(),
    # the AR stages under bf16 autocast (faster steps, less faithful targets: docs/design/zoo.md)
    "bf16": ImageZooConfig(ar_bf16=True),
    # seconds-long run of the same shapes (tests): a few steps each
    "smoke": ImageZooConfig(vq=_SMOKE, vq_batch=2,
                            target_budget=_SMOKE, drafter_budget=_SMOKE, lowres_budget=_SMOKE, ar_batch=2,
                            resampler_budget=_SMOKE, resampler_batch=2, head_budget=_SMOKE, head_batch=2,
                            classifier=_SMOKE, classifier_batch=2),
}


def build_tokenizer(cfg: ImageZooConfig, seed: int) -> VQTokenizer:
    """A randomly initialised FSQ tokenizer: diffusers VQModel encoder/decoder, lattice of ``fsq_levels``."""
    n = len(cfg.vq_channels)
    d = len(cfg.fsq_levels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tok = VQTokenizer.from_config(
            image_size=IMAGE_SIZE, in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
            up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=cfg.vq_channels, layers_per_block=1,
            latent_channels=d, vq_embed_dim=d, num_vq_embeddings=cfg.codebook_size, norm_num_groups=8)
    write_fsq_codebook(tok.vq_model, cfg.fsq_levels)
    return VQTokenizer(tok.vq_model, IMAGE_SIZE, fsq_levels=cfg.fsq_levels)


def train_vq(cfg: ImageZooConfig, out: Path, run_dir: Path, progress: bool, minutes: float):
    """FSQ autoencoder: pixel MSE at the full and the half size, plus the round-trip loss (see glossary)."""
    if math.prod(cfg.fsq_levels) != cfg.codebook_size:
        raise ValueError(f"fsq_levels {cfg.fsq_levels} give {math.prod(cfg.fsq_levels)} codes, not {cfg.codebook_size}")
    tok = build_tokenizer(cfg, cfg.seed)
    vq, fsq = tok.vq_model, tok.fsq
    vq.quantize.embedding.weight.requires_grad_(False)  # the lattice is fixed

    def quantize(z: torch.Tensor) -> torch.Tensor:  # [B, d, H, W] -> lattice points (straight-through)
        return fsq(z)[0]

    levels = fsq._levels.view(1, -1, 1, 1).float()
    half_l = (levels - 1) * (1 + 1e-3) / 2
    offset = torch.where(levels % 2 == 0, 0.5, 0.0)

    def soft_bound(z: torch.Tensor) -> torch.Tensor:  # FSQ's bound before rounding, in lattice units [-1, 1]
        return (torch.tanh(z + torch.atanh(offset / half_l)) * half_l - offset) / torch.div(levels, 2, rounding_mode="floor")

    def loss_fn(step: int) -> torch.Tensor:
        x = render_batch(train_scenes(cfg.seed, step, cfg.vq_batch))
        total = x.new_zeros(())
        # the full size and the half size (MuLo-SD's low-resolution grid goes through the same tokenizer)
        for img in (x, resize_images(x[: max(1, cfg.vq_batch // 2)], IMAGE_SIZE // LOWRES_SCALE)):
            zq = quantize(vq.encode(img).latents)
            rec = vq.decode(zq, force_not_quantize=True).sample
            total = total + F.mse_loss(rec, img)
            if cfg.roundtrip_weight:  # re-encoding the decoded image lands on the same lattice point
                total = total + cfg.roundtrip_weight * F.mse_loss(soft_bound(vq.encode(rec).latents), zq.detach())
        return total

    vq.train()
    # the checkpoint name carries the recipe's hash: a changed lattice or budget never resumes a stale run
    recipe = repr((cfg.fsq_levels, cfg.vq_channels, cfg.vq, cfg.vq_batch, cfg.roundtrip_weight, cfg.seed))
    res = run_stage(f"vq_fsq-{hashlib.sha256(recipe.encode()).hexdigest()[:10]}", vq, loss_fn, cfg.vq, run_dir,
                    minutes=minutes, progress=progress)
    tok.vq_model.eval()
    if res.finished:  # a stage cut by the time cap resumes later; nothing half-trained is exported
        # shipped with fixed-point encoding (exact round trips); training re-encodes with one FSQ pass
        VQTokenizer(vq, IMAGE_SIZE, encoding=FixedPointEncoding(), fsq_levels=cfg.fsq_levels).save_pretrained(
            out / "tokenizer")
        export_live_codes(tok, out)
    return res


def export_live_codes(tok: VQTokenizer, out: Path) -> None:
    """``out/live_codes.json``: the codes the tokenizer produces on training scenes (LANTERN / MuLo-SD pool the
    target's mass over latent neighbours among them)."""
    live = live_codes(tok).nonzero().flatten().tolist()
    (out / LIVE_CODES_FILE).write_text(json.dumps({"live": live, "num_live": len(live)}) + "\n")


def scene_tokens(model: ARImageModel, tok: VQTokenizer, seed: int, step: int, batch: int, image_size: int,
                 cond_drop: float) -> tuple[torch.Tensor, list[list[int]]]:
    """One step's training scenes: their image tokens long [B, N] at ``image_size`` and each one's prefix ids,
    the null prompt's with probability ``cond_drop`` (a pure function of (seed, step))."""
    scenes = train_scenes(seed, step, batch)
    x = render_batch(scenes)
    if image_size != IMAGE_SIZE:
        x = resize_images(x, image_size)
    with torch.no_grad():
        codes = tok.encode(x).flatten(1)  # [B, N]
    g = torch.Generator().manual_seed(seed * 7919 + step)
    drop = torch.rand(batch, generator=g) < cond_drop
    return codes, [model.prefix_ids(s.caption(), unconditional=bool(d)) for s, d in zip(scenes, drop)]


def ar_batch(model: ARImageModel, tok: VQTokenizer, seed: int, step: int, batch: int, image_size: int):
    """Left-padded (prefix + image tokens) ids, mask, positions and next-token targets of one step."""
    codes, prefixes = scene_tokens(model, tok, seed, step, batch, image_size, COND_DROP)
    P = max(len(p) for p in prefixes)
    N = codes.shape[1]
    ids = torch.zeros(batch, P + N - 1, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, p in enumerate(prefixes):
        ids[b, P - len(p): P] = torch.tensor(p)
        mask[b, P - len(p):] = 1
    ids[:, P:] = codes[:, :-1]
    pos = (mask.cumsum(1) - 1).clamp_min(0)
    pos = torch.where(mask.bool(), pos, torch.ones_like(pos))
    return ids, mask, pos, codes, P


def ar_loss(model: ARImageModel, tok: VQTokenizer, seed: int, step: int, batch: int, image_size: int,
            bf16: bool) -> torch.Tensor:
    """Next-token cross-entropy of one AR training batch (forward under bf16 autocast if ``bf16``)."""
    ids, mask, pos, codes, P = ar_batch(model, tok, seed, step, batch, image_size)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
    return F.cross_entropy(logits[:, P - 1:].reshape(-1, logits.shape[-1]).float(), codes.reshape(-1))


def train_ar(stage: str, cfg: ImageZooConfig, out: Path, run_dir: Path, progress: bool, minutes: float):
    arch = getattr(cfg, stage)
    tok = VQTokenizer.from_pretrained(out / "tokenizer")
    image_size = IMAGE_SIZE * arch.grid_size // tok.grid_size[0]
    tok = tok.resized(image_size)
    if tok.grid_size[0] != arch.grid_size or tok.vocab_size != arch.codebook_size:
        raise ValueError(f"{stage}: tokenizer grid/codebook {tok.grid_size}/{tok.vocab_size} != model's")
    torch.manual_seed(cfg.seed + STAGES.index(stage))
    model = ARImageModel(arch)

    def loss_fn(step: int) -> torch.Tensor:
        return ar_loss(model, tok, cfg.seed + 17 * STAGES.index(stage), step, cfg.ar_batch, image_size, cfg.ar_bf16)

    # the checkpoint name carries the tokenizer's and the recipe's hash: a retrained tokenizer or a changed
    # budget never resumes stale AR weights
    budget = getattr(cfg, f"{stage}_budget")
    h = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in tok.vq_model.parameters()))
    h.update(repr((arch, budget, cfg.ar_batch, cfg.ar_bf16, cfg.seed)).encode())
    res = run_stage(f"{stage}-{h.hexdigest()[:10]}", model, loss_fn, budget, run_dir, minutes=minutes,
                    progress=progress)
    if res.finished:
        model.save_pretrained(out / stage)
    return res


def train_resampler(cfg: ImageZooConfig, out: Path, run_dir: Path, progress: bool, minutes: float):
    """MuLo-SD's learned U_r / D_r: cross-entropy between the tokens of a scene at 64 px and at 64/r px."""
    tok = VQTokenizer.from_pretrained(out / "tokenizer")
    hi_tok, lo_tok = tok.resized(IMAGE_SIZE), tok.resized(IMAGE_SIZE // cfg.resampler.scale)
    torch.manual_seed(cfg.seed + 41)
    model = TokenResampler(cfg.resampler)

    def loss_fn(step: int) -> torch.Tensor:
        x = render_batch(train_scenes(cfg.seed + 23, step, cfg.resampler_batch))
        with torch.no_grad():
            hi, lo = hi_tok.encode(x), lo_tok.encode(resize_images(x, lo_tok.image_size))  # [B, H, W], [B, h, w]
        return F.cross_entropy(model.up_logits(lo), hi) + F.cross_entropy(model.down_logits(hi), lo)

    h = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in tok.vq_model.parameters()))
    h.update(repr((cfg.resampler, cfg.resampler_budget, cfg.resampler_batch, cfg.seed)).encode())
    res = run_stage(f"resampler-{h.hexdigest()[:10]}", model, loss_fn, cfg.resampler_budget, run_dir,
                    minutes=minutes, progress=progress)
    if res.finished:
        model.eval().save_pretrained(out / "resampler")
    return res


def head_batch(target: ARImageModel, tok: VQTokenizer, seed: int, step: int, batch: int, uncond: float,
               layers: tuple[int, ...]):
    """One teacher-forced batch of training scenes for the feature head, a row under the null prompt with
    probability ``uncond`` (:func:`mmspec.image_gen.feature_head.forced_batch`)."""
    codes, prefixes = scene_tokens(target, tok, seed, step, batch, IMAGE_SIZE, uncond)
    return forced_batch(target, prefixes, codes, layers)


def train_feature_head(cfg: ImageZooConfig, out: Path, run_dir: Path, progress: bool, minutes: float):
    """The EAGLE-3 head over the exported target (``out/target``), exported to ``out/head``."""
    if not (out / "target").is_dir():
        raise FileNotFoundError(f"{out / 'target'} missing: the head stage needs the target (run the target stage)")
    tok = VQTokenizer.from_pretrained(out / "tokenizer").resized(IMAGE_SIZE)
    target = ARImageModel.from_pretrained(out / "target")
    for p in target.parameters():
        p.requires_grad_(False)
    layers = tuple(min(i, target.config.num_layers) for i in cfg.head_layers)
    torch.manual_seed(cfg.seed + 53)
    head = image_head(target, layers)
    seed = cfg.seed + 31

    def loss_fn(step: int) -> torch.Tensor:
        batch = head_batch(target, tok, seed, step, cfg.head_batch, cfg.head_uncond, layers)
        return ttt_loss(head, batch, cfg.head_ttt_steps, 0.8)[0]

    h = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in target.parameters()))
    h.update(repr((cfg.head_budget, cfg.head_batch, cfg.head_uncond, cfg.head_ttt_steps, layers, cfg.seed)).encode())
    res = run_stage(f"head-{h.hexdigest()[:10]}", head, loss_fn, cfg.head_budget, run_dir, minutes=minutes,
                    progress=progress)
    if res.finished:
        head.eval()
        with torch.no_grad():  # held-out scenes (another seed), both halves in the training mix
            held = [ttt_loss(head, head_batch(target, tok, seed + 1000, i, 16, cfg.head_uncond, layers),
                             cfg.head_ttt_steps, 0.8)[1] for i in range(4)]
        top1 = [round(sum(a[j] for a in held) / len(held), 4) for j in range(len(held[0]))]
        head.save(out / "head", dtype=torch.float32,
                  extra={"training": {"steps": res.steps_done, "heldout_top1_per_step": top1,
                                      "uncond_fraction": cfg.head_uncond}})
        if progress:
            print(json.dumps({"head_heldout_top1_per_step": top1}))
    return res


def train_classifier(cfg: ImageZooConfig, out: Path, run_dir: Path, progress: bool, minutes: float):
    """The scene classifier whose features the benchmarks' Fréchet distance uses."""
    torch.manual_seed(cfg.seed + 99)
    model = SceneClassifier()

    def loss_fn(step: int) -> torch.Tensor:
        scenes = train_scenes(cfg.seed + 5, step, cfg.classifier_batch)
        x = render_batch(scenes)
        x = x + 0.05 * torch.randn(x.shape, generator=torch.Generator().manual_seed(step))  # decoder-like noise
        return model.loss(x.clamp(-1, 1), scenes)

    res = run_stage("classifier", model, loss_fn, cfg.classifier, run_dir, minutes=minutes, progress=progress)
    if res.finished:
        model.save_pretrained(out / "classifier")
    return res


TRAINERS = {"vq": train_vq, "classifier": train_classifier, "resampler": train_resampler, "head": train_feature_head}


def train_stage(stage: str, cfg: ImageZooConfig, out: Path, run_dir: Path, progress: bool, minutes: float):
    if stage in TRAINERS:
        return TRAINERS[stage](cfg, out, run_dir, progress, minutes)
    return train_ar(stage, cfg, out, run_dir, progress, minutes)


def _check(stages: list[str], out: Path) -> str | None:
    if "vq" not in stages and set(stages) - {"classifier"} and not (out / "tokenizer").is_dir():
        return f"{out / 'tokenizer'} missing: run the vq stage first"
    if "head" in stages and "target" not in stages and not (out / "target").is_dir():
        return f"{out / 'target'} missing: the head stage needs the target (run the target stage first)"
    return None


def main(argv: list[str] | None = None) -> int:
    return training_cli(argv, description=__doc__.split("\n\n")[0], family="image", stages=STAGES, presets=PRESETS,
                        out_help="export directory (tokenizer/, target/, drafter/, lowres/, resampler/, classifier/)",
                        check=_check, train=train_stage)


if __name__ == "__main__":
    raise SystemExit(main())
