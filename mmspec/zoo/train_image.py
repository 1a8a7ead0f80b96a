"""Train the zoo's image-generation models on the scene world: VQ tokenizer, AR target, AR drafter and
the low-resolution model of MuLo-SD's multi-scale drafter.

Papers: van den Oord et al., "Neural Discrete Representation Learning" (VQ-VAE, 2017) for the
tokenizer; Sun et al., "LlamaGen" (2024) for the text-conditioned raster AR models with a dropped
condition for classifier-free guidance.

Glossary:
    stage         one model: ``vq`` (must run first), then ``target``, ``drafter``, ``lowres`` (need the
                  tokenizer); each resumes from ``--run-dir`` and exports to ``--out/<stage>``
    round-trip    an extra tokenizer loss ||E(D(z_q)) - sg(z_q)||^2 that keeps encode(decode(t)) == t,
                  so tokens survive a decode/re-encode (needed by MuLo-SD's resolution changes)
    code restart  codes unused over the last ``restart_every`` steps are moved onto random encoder
                  outputs (early steps only), so the codebook is used
    consolidate   after training, near-duplicate codes (closer than ``merge_distance`` to a more used
                  code) are retired (moved far away, so nearest-code search never picks them) and the
                  encoder/decoder are fine-tuned with the codebook frozen and a round-trip
                  cross-entropy: re-encoding a decoded image must pick the same codes.  Without it,
                  codes 0.01 apart swap on re-encoding and half the tokens change
    cond drop     10 % of the AR training prompts are replaced by the null prompt (the CFG "uncond" half)
    bf16 autocast the AR stages' forward passes run in bf16 (weights, their gradients and the AdamW state
                  stay fp32); ``--preset fp32`` turns it off
    fixed points  the exported tokenizer encodes to fixed points of decode -> encode (exact round
                  trips, :mod:`mmspec.image_gen.fixed_point`); the AR stages train on one-pass
                  nearest-code tokens

Usage::

    python -m mmspec.zoo.train_image --out mmspec/zoo/weights/image          # the shipped models
    python -m mmspec.zoo.train_image --out /tmp/m --preset smoke             # seconds, for tests
    python -m mmspec.zoo.train_image --out /tmp/m --preset fp32 --stages target  # the fp32 reference target
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from mmspec.image_gen.fixed_point import FixedPointEncoding
from mmspec.image_gen.model import ARImageConfig, ARImageModel
from mmspec.image_gen.multiscale import resize_images
from mmspec.image_gen.tokenizer import VQTokenizer
from mmspec.scenes import CELLS, COLOURS, SHAPES

from .quality import SceneClassifier
from .data import IMAGE_SIZE, render_batch, train_scenes
from .training import StageBudget, run_stage, training_cli

STAGES = ("vq", "target", "drafter", "lowres", "classifier")
WORDS = tuple(sorted({"a", "and", "at", "the", *COLOURS, *SHAPES, *(w for c in CELLS for w in c.split())}))
COND_DROP = 0.1
LOWRES_SCALE = 2


@dataclass(frozen=True)
class ImageZooConfig:
    codebook_size: int = 256
    vq_channels: tuple[int, ...] = (16, 32, 64)
    code_dim: int = 8
    vq: StageBudget = StageBudget(steps=1200, lr=2e-3, warmup=50)
    # (the consolidation budget follows)
    vq_batch: int = 16
    restart_every: int = 100
    roundtrip_weight: float = 1.0
    merge_distance: float = 0.04
    consolidate: StageBudget = StageBudget(steps=400, lr=5e-4, warmup=20)
    assign_temperature: float = 1e-3  # distance^2 scale of the assignment cross-entropy
    target: ARImageConfig = ARImageConfig(codebook_size=256, grid_size=16, words=WORDS, hidden_size=128,
                                          num_layers=6, num_heads=4, num_kv_heads=2, intermediate_size=384)
    drafter: ARImageConfig = ARImageConfig(codebook_size=256, grid_size=16, words=WORDS, hidden_size=64,
                                           num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=192)
    lowres: ARImageConfig = ARImageConfig(codebook_size=256, grid_size=8, words=WORDS, hidden_size=96,
                                          num_layers=3, num_heads=3, num_kv_heads=1, intermediate_size=288)
    # 1500 fp32 steps bound colours/shapes to the prompt in 25 % of samples; 3000 bf16-autocast steps in 53 %
    # (avx512_bf16 on this CPU: 588 against 719 ms a step, python -m benchmarks.zoo_training), inside the
    # 60-min script
    target_budget: StageBudget = StageBudget(steps=3000, lr=2e-3, warmup=100, weight_decay=0.01)
    drafter_budget: StageBudget = StageBudget(steps=1500, lr=2e-3, warmup=100, weight_decay=0.01)
    lowres_budget: StageBudget = StageBudget(steps=1500, lr=2e-3, warmup=100, weight_decay=0.01)
    ar_batch: int = 24
    ar_bf16: bool = True  # bf16 autocast of the AR stages' forward pass (weights and optimiser stay fp32)
    classifier: StageBudget = StageBudget(steps=3000, lr=2e-3, warmup=30)
    classifier_batch: int = 32
    seed: int = 0


_SMOKE = StageBudget(steps=3, warmup=1, save_every=2)
PRESETS = {
    "full": ImageZooConfig(),
    # the AR stages in fp32 (the reference run of docs/design/zoo.md; the target alone took 37.8 min here)
    "fp32": ImageZooConfig(ar_bf16=False),
    # seconds-long run of the same shapes (tests): a few steps each
    "smoke": ImageZooConfig(vq=StageBudget(steps=3, warmup=1, save_every=2), vq_batch=2, restart_every=2,
                            consolidate=_SMOKE,
                            target_budget=_SMOKE, drafter_budget=_SMOKE, lowres_budget=_SMOKE, ar_batch=2,
                            classifier=StageBudget(steps=3, warmup=1, save_every=2), classifier_batch=2),
}


def build_tokenizer(cfg: ImageZooConfig, seed: int) -> VQTokenizer:
    n = len(cfg.vq_channels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return VQTokenizer.from_config(
            image_size=IMAGE_SIZE, in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
            up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=cfg.vq_channels, layers_per_block=1,
            latent_channels=cfg.code_dim, num_vq_embeddings=cfg.codebook_size, norm_num_groups=8)


def train_vq(cfg: ImageZooConfig, out: Path, run_dir: Path, progress: bool, minutes: float):
    tok = build_tokenizer(cfg, cfg.seed)
    vq = tok.vq_model
    usage = torch.zeros(cfg.codebook_size)

    def loss_fn(step: int) -> torch.Tensor:
        x = render_batch(train_scenes(cfg.seed, step, cfg.vq_batch))
        total = x.new_zeros(())
        # the full size and the half size (MuLo-SD's low-resolution grid goes through the same tokenizer)
        for i, img in enumerate((x, resize_images(x[: max(1, cfg.vq_batch // 2)], IMAGE_SIZE // LOWRES_SCALE))):
            z = vq.encode(img).latents
            zq, commit, (_, _, idx) = vq.quantize(z)
            rec = vq.decode(zq, force_not_quantize=True).sample
            total = total + F.mse_loss(rec, img) + commit.mean()
            if i == 0:
                usage.index_add_(0, idx.flatten().cpu(), torch.ones(idx.numel()))
                if cfg.roundtrip_weight:
                    z2 = vq.encode(rec).latents
                    total = total + cfg.roundtrip_weight * F.mse_loss(z2, zq.detach())
                if step % cfg.restart_every == cfg.restart_every - 1 and step < 0.6 * cfg.vq.steps:
                    dead = (usage == 0).nonzero().flatten()
                    if len(dead):
                        flat = z.detach().permute(0, 2, 3, 1).reshape(-1, z.shape[1])
                        pick = flat[torch.randint(len(flat), (len(dead),), generator=torch.Generator().manual_seed(step))]
                        noise = torch.randn(pick.shape, generator=torch.Generator().manual_seed(step + 1))
                        with torch.no_grad():
                            vq.quantize.embedding.weight[dead] = pick + 0.01 * noise
                    usage.zero_()
        return total

    res = run_stage("vq", vq, loss_fn, replace(cfg.vq, minutes=minutes), run_dir, progress=progress)
    if not res.finished:
        return res
    res = consolidate_codebook(tok, cfg, run_dir, progress, minutes)
    tok.vq_model.eval()
    if res.finished:  # a stage cut by the time cap resumes later; nothing half-trained is exported
        # shipped with fixed-point encoding (exact round trips); training re-encodes with nearest codes
        VQTokenizer(tok.vq_model, IMAGE_SIZE, encoding=FixedPointEncoding()).save_pretrained(out / "tokenizer")
    return res


RETIRED = 100.0  # coordinate of retired codes: far from every encoder output
CE_W = 1e-3  # weight of the assignment cross-entropies (reconstruction stays the main loss)


def retire_duplicate_codes(tok: VQTokenizer, cfg: ImageZooConfig) -> torch.Tensor:
    """Keep, in order of use on training images, each code farther than ``merge_distance`` from every code
    kept before it; move the rest to RETIRED.  Returns the bool mask of live codes [V]."""
    vq = tok.vq_model
    with torch.no_grad():
        x = render_batch(train_scenes(cfg.seed, 10**6, 256))
        usage = torch.bincount(tok.encode(x).flatten(), minlength=cfg.codebook_size)
        weight = vq.quantize.embedding.weight
        live = torch.zeros(cfg.codebook_size, dtype=torch.bool)
        for c in usage.argsort(descending=True, stable=True).tolist():
            if usage[c] == 0:
                break
            if live.any() and (weight[live] - weight[c]).norm(dim=1).min() < cfg.merge_distance:
                continue
            live[c] = True
        weight[~live] = RETIRED
    return live


def consolidate_codebook(tok: VQTokenizer, cfg: ImageZooConfig, run_dir: Path, progress: bool, minutes: float):
    vq = tok.vq_model
    live = retire_duplicate_codes(tok, cfg)
    vq.quantize.embedding.weight.requires_grad_(False)
    codes = vq.quantize.embedding.weight[live].detach()  # [n_live, d]
    live_ids = live.nonzero().flatten()

    def assign_logits(z: torch.Tensor) -> torch.Tensor:  # [B, d, H, W] -> [B*H*W, n_live]
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        return -torch.cdist(flat, codes).pow(2) / cfg.assign_temperature

    def loss_fn(step: int) -> torch.Tensor:
        x = render_batch(train_scenes(cfg.seed + 1, step, cfg.vq_batch))
        total = x.new_zeros(())
        for img in (x, resize_images(x[: max(1, cfg.vq_batch // 2)], IMAGE_SIZE // LOWRES_SCALE)):
            z = vq.encode(img).latents
            logits = assign_logits(z)
            idx = logits.argmax(1)
            zq = codes[idx].view(z.shape[0], z.shape[2], z.shape[3], -1).permute(0, 3, 1, 2)
            rec = vq.decode(zq, force_not_quantize=True).sample
            logits2 = assign_logits(vq.encode(rec).latents)
            total = total + F.mse_loss(rec, img) + CE_W * (F.cross_entropy(logits, idx) + F.cross_entropy(logits2, idx))
        return total

    res = run_stage("vq_consolidate", vq, loss_fn, replace(cfg.consolidate, minutes=minutes), run_dir,
                    progress=progress)
    vq.quantize.embedding.weight.requires_grad_(True)
    assert bool((vq.quantize.embedding.weight[~live] == RETIRED).all()) and len(live_ids) > 0
    return res


def ar_batch(model: ARImageModel, tok: VQTokenizer, seed: int, step: int, batch: int, image_size: int):
    """Left-padded (prefix + image tokens) ids, mask, positions and next-token targets of one step."""
    scenes = train_scenes(seed, step, batch)
    x = render_batch(scenes)
    if image_size != IMAGE_SIZE:
        x = resize_images(x, image_size)
    with torch.no_grad():
        codes = tok.encode(x).flatten(1)  # [B, N]
    g = torch.Generator().manual_seed(seed * 7919 + step)
    drop = torch.rand(batch, generator=g) < COND_DROP
    prefixes = [model.prefix_ids(s.caption(), unconditional=bool(d)) for s, d in zip(scenes, drop)]
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
    tok = VQTokenizer(tok.vq_model, image_size)
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
    res = run_stage(f"{stage}-{h.hexdigest()[:10]}", model, loss_fn, replace(budget, minutes=minutes),
                    run_dir, progress=progress)
    if res.finished:
        model.save_pretrained(out / stage)
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

    res = run_stage("classifier", model, loss_fn, replace(cfg.classifier, minutes=minutes), run_dir, progress=progress)
    if res.finished:
        model.save_pretrained(out / "classifier")
    return res


TRAINERS = {"vq": train_vq, "classifier": train_classifier}


def train_stage(stage: str, cfg: ImageZooConfig, out: Path, run_dir: Path, progress: bool, minutes: float):
    if stage in TRAINERS:
        return TRAINERS[stage](cfg, out, run_dir, progress, minutes)
    return train_ar(stage, cfg, out, run_dir, progress, minutes)


def _check(stages: list[str], out: Path) -> str | None:
    if "vq" not in stages and set(stages) - {"classifier"} and not (out / "tokenizer").is_dir():
        return f"{out / 'tokenizer'} missing: run the vq stage first"
    return None


def main(argv: list[str] | None = None) -> int:
    return training_cli(argv, description=__doc__.split("\n\n")[0], family="image", stages=STAGES, presets=PRESETS,
                        out_help="export directory (tokenizer/, target/, drafter/, lowres/, classifier/)",
                        check=_check, train=train_stage)


if __name__ == "__main__":
    raise SystemExit(main())
