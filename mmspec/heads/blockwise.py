"""Blockwise parallel prediction heads: h heads on the target's last hidden state, head i predicting the
token i positions after the target's own next token.

Papers: Stern, Shazeer, Uszkoreit, "Blockwise Parallel Decoding for Deep Autoregressive Models" (NeurIPS 2018);
Kim et al., "Exploring and Improving Drafts in Blockwise Parallel Decoding" (arXiv 2404.09221); the head
shape is Medusa's (Cai et al., ICML 2024: a residual SiLU block per head over the shared LM head).

Glossary:
    final hidden   the target's last hidden state (HF ``hidden_states[-1]``, after the final norm) at the
                   position of the last token it has read: the target's LM head maps it to the next token
                   (t + 1)
    head i         i = 1..h: ``num_layers`` residual blocks x + SiLU(W x + b) on the final hidden, then the
                   target's LM-head rows of the draft vocabulary; predicts token t + 1 + i. W starts at zero,
                   so an untrained head predicts what the target's own head predicts
    draft vocab    an FR-Spec subset of the target vocabulary (``d2t`` maps head indices to target ids); the
                   LM-head rows are borrowed from the target by :meth:`BlockwiseHeads.attach`, never saved
    files          ``blockwise.safetensors`` (the blocks + d2t) and ``blockwise_config.json``
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import VocabularyMismatchError

CONFIG_NAME = "blockwise_config.json"
WEIGHTS_NAME = "blockwise.safetensors"


@dataclass
class BlockwiseConfig:
    hidden_size: int
    num_heads: int
    draft_vocab_size: int
    target_vocab_size: int
    num_layers: int = 1
    target_name: str = ""
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_heads", "draft_vocab_size", "target_vocab_size", "num_layers"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if self.draft_vocab_size > self.target_vocab_size:
            raise ValueError(f"draft_vocab_size {self.draft_vocab_size} > target_vocab_size {self.target_vocab_size}")

    @classmethod
    def from_target(cls, target: nn.Module, *, num_heads: int = 4, draft_vocab_size: int = 4096,
                    num_layers: int = 1) -> "BlockwiseConfig":
        c = target.config.get_text_config() if hasattr(target.config, "get_text_config") else target.config
        vocab = int(target.get_output_embeddings().weight.shape[0])
        return cls(hidden_size=int(c.hidden_size), num_heads=int(num_heads),
                   draft_vocab_size=min(int(draft_vocab_size), vocab), target_vocab_size=vocab,
                   num_layers=int(num_layers), target_name=str(getattr(target.config, "_name_or_path", "")))


class ResBlock(nn.Module):
    """x + SiLU(W x + b), W and b starting at zero (the identity)."""

    def __init__(self, d: int):
        super().__init__()
        self.linear = nn.Linear(d, d)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.silu(self.linear(x))


class BlockwiseHeads(nn.Module):
    """``BlockwiseHeads(config, d2t)``; ``heads(final)`` -> logits [..., h, Vd] (see the module glossary)."""

    def __init__(self, config: BlockwiseConfig, d2t: torch.Tensor | None = None):
        super().__init__()
        self.config = config
        d = config.hidden_size
        self.heads = nn.ModuleList(
            nn.Sequential(*(ResBlock(d) for _ in range(config.num_layers))) for _ in range(config.num_heads))
        if d2t is None:
            d2t = torch.arange(config.draft_vocab_size)
        if d2t.ndim != 1 or d2t.numel() != config.draft_vocab_size:
            raise ValueError(f"d2t must be long [{config.draft_vocab_size}], got shape {tuple(d2t.shape)}")
        self.register_buffer("d2t", d2t.to(torch.long).clone(), persistent=True)
        self._lm_weight: torch.Tensor | None = None  # [Vd, d], borrowed from the target by attach()

    @property
    def num_heads(self) -> int:
        return self.config.num_heads

    def attach(self, target: nn.Module) -> "BlockwiseHeads":
        """Borrow ``target``'s LM-head rows of the draft vocabulary."""
        w = target.get_output_embeddings().weight.detach()
        if w.shape[0] != self.config.target_vocab_size:
            raise VocabularyMismatchError(
                f"the heads were trained for a target vocabulary of {self.config.target_vocab_size}, "
                f"this target has {w.shape[0]}")
        if w.shape[1] != self.config.hidden_size:
            raise ValueError(f"the heads read hidden states of width {self.config.hidden_size}, "
                             f"this target's are {w.shape[1]}")
        self._lm_weight = w[self.d2t.to(w.device)].to(self.heads[0][0].linear.weight.dtype)
        return self

    @property
    def attached(self) -> bool:
        return self._lm_weight is not None

    def forward(self, final: torch.Tensor) -> torch.Tensor:
        """final hidden float [..., d] -> logits [..., h, Vd] over the draft vocabulary."""
        if self._lm_weight is None:
            raise RuntimeError("BlockwiseHeads is not attached to a target: call heads.attach(target) first")
        x = final.to(self._lm_weight.dtype)
        out = torch.stack([head(x) for head in self.heads], dim=-2)  # [..., h, d]
        return out @ self._lm_weight.T

    # --------------------------------------------------------------------------------------- I/O
    def save(self, folder: str | Path, *, dtype: torch.dtype = torch.float16, extra: dict | None = None) -> Path:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        sd = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in self.state_dict().items()}
        save_file(sd, str(folder / WEIGHTS_NAME))
        cfg = asdict(self.config)
        if extra:
            cfg["extra"] = {**cfg.get("extra", {}), **extra}
        (folder / CONFIG_NAME).write_text(json.dumps(cfg, indent=2) + "\n")
        return folder

    @classmethod
    def load(cls, folder: str | Path, target: nn.Module | None = None, *,
             dtype: torch.dtype = torch.float32) -> "BlockwiseHeads":
        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / CONFIG_NAME).is_file():
            raise FileNotFoundError(f"no blockwise heads at {folder} ({CONFIG_NAME} missing)")
        cfg = json.loads((folder / CONFIG_NAME).read_text())
        sd = load_file(str(folder / WEIGHTS_NAME))
        heads = cls(BlockwiseConfig(**cfg), d2t=sd["d2t"]).to(dtype)
        heads.load_state_dict({k: (v.to(dtype) if v.is_floating_point() else v) for k, v in sd.items()})
        heads.eval()
        if target is not None:
            heads.attach(target)
        return heads
