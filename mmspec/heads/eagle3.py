"""An EAGLE-3 draft head over any HF causal LM's hidden states, predicting over an FR-Spec reduced vocabulary.

Papers: Li et al., "EAGLE-3: Scaling up Inference Acceleration of Large Language Models via
Training-Time Test" (arXiv 2503.01840); Zhao et al., "FR-Spec: Accelerating Large-Vocabulary
Language Models via Frequency-Ranked Speculative Sampling" (arXiv 2502.14856).

Glossary:
    features     the target's hidden states at a low, a middle and a high layer (HF ``hidden_states``
                 indices in ``config.feature_layers``) concatenated: float [B, w, 3d]; ``fuse`` maps them
                 to d with one linear layer
    pair t       the head's input at slot t: (feature of position t, token t + 1); it predicts token
                 t + 2. While drafting, a drafted token's feature is the head's own output hidden state
                 at its parent (the head never sees the target's features for drafted tokens)
    draft vocab  FR-Spec: the ``draft_vocab_size`` most frequent target tokens; ``d2t`` long [Vd] maps a
                 draft id to its target id. The head's output layer is the target's LM head restricted
                 to those rows, taken from the target when the head is attached, like the token embedding
    attach       ``head.attach(target)`` borrows the target's input embedding and LM-head rows (frozen,
                 never stored with the head's weights)
    TTT          training-time test: ``forward_ttt`` unrolls the head on its own output hidden states for
                 several steps, each step's query seeing the real-feature keys of its prefix plus the keys
                 its own earlier steps made (the attention pattern of drafting)

The head is a causal LM in the HF calling convention (``input_ids``, ``attention_mask`` 2-D valid mask
or 4-D additive mask, ``position_ids``, ``past_key_values`` a ``DynamicCache``, ``use_cache``), plus
``features`` float [B, w, d] (already fused), so a :class:`~mmspec.cache.CacheSession` drives it like
any drafter model, chains and trees alike.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import VocabularyMismatchError


def feature_layers(num_layers: int) -> tuple[int, int, int]:
    """EAGLE-3's low / middle / high layers as HF ``hidden_states`` indices (0 = embeddings)."""
    return (min(3, num_layers), max(1, num_layers // 2), max(1, num_layers - 2))


_default_layers = feature_layers  # (``Eagle3Config.from_target`` has a parameter of that name)


@dataclass
class Eagle3Config:
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    feature_layers: tuple[int, int, int]
    draft_vocab_size: int
    target_vocab_size: int
    target_name: str = ""
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_target(cls, target: nn.Module, draft_vocab_size: int, feature_layers: tuple[int, int, int] | None = None,
                    ) -> "Eagle3Config":
        c = target.config.get_text_config() if hasattr(target.config, "get_text_config") else target.config
        heads = c.num_attention_heads
        rope = getattr(c, "rope_parameters", None) or {}
        theta = rope.get("rope_theta", getattr(c, "rope_theta", 10000.0)) if isinstance(rope, dict) else 10000.0
        vocab = target.get_output_embeddings().weight.shape[0]
        return cls(hidden_size=c.hidden_size, num_attention_heads=heads,
                   num_key_value_heads=getattr(c, "num_key_value_heads", None) or heads,
                   head_dim=getattr(c, "head_dim", None) or c.hidden_size // heads,
                   intermediate_size=getattr(c, "intermediate_size", None) or 4 * c.hidden_size,
                   rms_norm_eps=float(getattr(c, "rms_norm_eps", 1e-6) or 1e-6), rope_theta=float(theta),
                   feature_layers=tuple(feature_layers or _default_layers(c.num_hidden_layers)),
                   draft_vocab_size=min(int(draft_vocab_size), int(vocab)), target_vocab_size=int(vocab),
                   target_name=str(getattr(target.config, "_name_or_path", "")))


@dataclass
class HeadOutput:
    logits: torch.Tensor  # [B, w, Vd] over the draft vocabulary
    past_key_values: Any
    hidden_states: tuple[torch.Tensor, ...] | None  # (output hidden [B, w, d],): the next step's feature


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


class Eagle3Head(nn.Module):
    """One decoder layer over (token embedding, fused target features) with an FR-Spec output layer."""

    def __init__(self, config: Eagle3Config, d2t: torch.Tensor | None = None):
        super().__init__()
        self.config = config
        d, h, kv, hd = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.fc = nn.Linear(3 * d, d, bias=False)
        self.embed_norm = nn.RMSNorm(d, eps=config.rms_norm_eps)
        self.feature_norm = nn.RMSNorm(d, eps=config.rms_norm_eps)
        self.q_proj = nn.Linear(2 * d, h * hd, bias=False)
        self.k_proj = nn.Linear(2 * d, kv * hd, bias=False)
        self.v_proj = nn.Linear(2 * d, kv * hd, bias=False)
        self.o_proj = nn.Linear(h * hd, d, bias=False)
        self.post_norm = nn.RMSNorm(d, eps=config.rms_norm_eps)
        self.gate_proj = nn.Linear(d, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(d, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, d, bias=False)
        self.final_norm = nn.RMSNorm(d, eps=config.rms_norm_eps)
        inv = 1.0 / (config.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
        self.register_buffer("inv_freq", inv, persistent=False)
        if d2t is None:
            d2t = torch.arange(config.draft_vocab_size)
        self.register_buffer("d2t", d2t.to(torch.long).clone(), persistent=True)
        # borrowed from the target by attach() (not parameters of the head, never saved with it)
        self.__dict__["_embed"] = None
        self._lm_weight: torch.Tensor | None = None

    # ----------------------------------------------------------------------------------------- target
    def attach(self, target: nn.Module) -> "Eagle3Head":
        """Borrow ``target``'s token embedding and the LM-head rows of the draft vocabulary."""
        vocab = target.get_output_embeddings().weight.shape[0]
        if vocab != self.config.target_vocab_size:
            raise VocabularyMismatchError(
                f"the head was trained for a target vocabulary of {self.config.target_vocab_size}, this target has {vocab}")
        self.__dict__["_embed"] = target.get_input_embeddings()  # borrowed: not a submodule of the head
        w = target.get_output_embeddings().weight.detach()
        self._lm_weight = w[self.d2t.to(w.device)].to(self.fc.weight.dtype)  # [Vd, d] (a copy of the rows)
        return self

    @property
    def attached(self) -> bool:
        return self._embed is not None

    def _check_attached(self) -> None:
        if self._embed is None:
            raise RuntimeError("Eagle3Head is not attached to a target: call head.attach(target) first")

    def fuse(self, target_features: torch.Tensor) -> torch.Tensor:
        """float [B, w, 3d] (low, mid, high layers concatenated) -> float [B, w, d]."""
        return self.fc(target_features.to(self.fc.weight.dtype))

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Output hidden [.., d] -> logits over the draft vocabulary [.., Vd]."""
        return self.final_norm(hidden) @ self._lm_weight.T

    # ------------------------------------------------------------------------------------- blocks
    def _rope(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        # x [B, H, w, hd], pos [B, w]
        ang = pos.unsqueeze(-1).to(self.inv_freq.dtype) * self.inv_freq  # [B, w, hd/2]
        emb = torch.cat([ang, ang], dim=-1).unsqueeze(1)  # [B, 1, w, hd]
        return x * emb.cos().to(x.dtype) + _rotate_half(x) * emb.sin().to(x.dtype)

    def _qkv(self, input_ids: torch.Tensor, features: torch.Tensor, pos: torch.Tensor):
        b, w = input_ids.shape
        c = self.config
        with torch.no_grad():  # the borrowed embedding stays frozen
            emb = self._embed(input_ids).to(features.dtype)
        x = torch.cat([self.embed_norm(emb), self.feature_norm(features)], dim=-1)  # [B, w, 2d]
        q = self.q_proj(x).view(b, w, c.num_attention_heads, c.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, w, c.num_key_value_heads, c.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, w, c.num_key_value_heads, c.head_dim).transpose(1, 2)
        return self._rope(q, pos), self._rope(k, pos), v

    def _out(self, features: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        # attn [B, H, w, hd] -> output hidden [B, w, d]; the residual stream is the feature
        b, _, w, _ = attn.shape
        hid = features + self.o_proj(attn.transpose(1, 2).reshape(b, w, -1))
        x = self.post_norm(hid)
        return hid + self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    def _expand_kv(self, t: torch.Tensor) -> torch.Tensor:
        rep = self.config.num_attention_heads // self.config.num_key_value_heads
        return t if rep == 1 else t.repeat_interleave(rep, dim=1)

    # ------------------------------------------------------------------------------------ decoding
    def forward(self, input_ids: torch.Tensor, features: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, past_key_values: Any = None, use_cache: bool = True,
                output_hidden_states: bool = False, logits_to_keep: int = 0, **_: Any) -> HeadOutput:
        """Cached forward over w slots (HF causal-LM convention; ``features`` float [B, w, d] fused)."""
        from transformers import DynamicCache

        self._check_attached()
        b, w = input_ids.shape
        device = input_ids.device
        cache = past_key_values if past_key_values is not None else DynamicCache()
        past = cache.get_seq_length() if len(getattr(cache, "layers", [])) else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + w, device=device).expand(b, w)
        q, k, v = self._qkv(input_ids, features, position_ids)
        k, v = cache.update(k, v, 0)  # [B, KV, S, hd]
        s = k.shape[2]
        dtype = q.dtype
        if attention_mask is None:
            attention_mask = torch.ones((b, s), dtype=torch.long, device=device)
        if attention_mask.dim() == 2:
            cols = torch.arange(s, device=device)
            rows = past + torch.arange(w, device=device)
            allowed = attention_mask.bool().unsqueeze(1) & (cols.unsqueeze(0) <= rows.unsqueeze(1)).unsqueeze(0)
            allowed[:, torch.arange(w, device=device), rows] = True  # every query sees itself
            mask = torch.zeros((b, 1, w, s), dtype=dtype, device=device).masked_fill(
                ~allowed.unsqueeze(1), torch.finfo(dtype).min)
        else:
            mask = attention_mask.to(dtype)
        attn = F.scaled_dot_product_attention(q, self._expand_kv(k), self._expand_kv(v), attn_mask=mask)
        hid = self._out(features, attn)
        keep = hid if not logits_to_keep else hid[:, -logits_to_keep:]
        return HeadOutput(logits=self.lm_logits(keep), past_key_values=cache,
                          hidden_states=(hid,) if output_hidden_states else None)

    # ------------------------------------------------------------------------------------ training
    def forward_ttt(self, input_ids: torch.Tensor, target_features: torch.Tensor, valid: torch.Tensor,
                    steps: int, *, logits: bool = True, positions: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Training-time test over whole sequences (no cache).

        input_ids long [B, L]: the token of each pair (pair t holds token t + 1 of the conversation);
        target_features float [B, L, 3d]: the target's features of pair t (position t); valid long [B, L].
        Returns per step j (0 .. steps-1) logits [B, L, Vd]; step j's row t predicts token t + j + 2
        after drafting j tokens from pair t with its own hidden states (row t uses input token t + j).
        ``logits=False`` returns the output hidden states [B, L, d] instead (training scores only some
        rows: :meth:`lm_logits` on those is cheaper than the draft-vocabulary head on all).
        ``positions`` long [B, L]: each pair's position (default: the count of valid pairs before it; a
        pruned context passes its rows' original positions).
        """
        self._check_attached()
        b, L = input_ids.shape
        device = input_ids.device
        pos0 = (valid.cumsum(1) - 1).clamp_min(0) if positions is None else positions
        feat = self.fuse(target_features)
        q, k0, v0 = self._qkv(input_ids, feat, pos0)
        k0, v0 = self._expand_kv(k0), self._expand_kv(v0)
        scale = self.config.head_dim ** -0.5
        causal = torch.ones((L, L), dtype=torch.bool, device=device).tril()
        allowed = causal.unsqueeze(0) & valid.bool().unsqueeze(1)  # [B, L, L]
        neg = torch.finfo(q.dtype).min
        diag_k: list[torch.Tensor] = []
        diag_v: list[torch.Tensor] = []
        out = []
        for j in range(steps):
            if j > 0:
                shifted = torch.cat([input_ids[:, j:], input_ids.new_zeros((b, j))], dim=1)  # token t + j
                q, kj, vj = self._qkv(shifted, feat, pos0 + j)
                diag_k.append(self._expand_kv(kj))
                diag_v.append(self._expand_kv(vj))
            scores = (q @ k0.transpose(-1, -2)) * scale  # [B, H, L, L]
            scores = scores.masked_fill(~allowed.unsqueeze(1), neg)
            if diag_k:
                dk = torch.stack([(q * kk).sum(-1) for kk in diag_k], dim=-1) * scale  # [B, H, L, j]
                probs = torch.cat([scores, dk], dim=-1).softmax(dim=-1)
                attn = probs[..., :L] @ v0 + sum(probs[..., L + i, None] * vv for i, vv in enumerate(diag_v))
            else:
                attn = scores.softmax(dim=-1) @ v0
            hid = self._out(feat, attn)
            out.append(self.lm_logits(hid) if logits else hid)
            feat = hid  # the next step drafts from the head's own hidden states
        return out

    # --------------------------------------------------------------------------------------- I/O
    def init_from_target(self, target: nn.Module) -> None:
        """EAGLE's start: random layers, the final norm copied from the target (whose LM head the head
        borrows). Copying the target's last layer would make the head predict the token it is fed (its
        residual stream starts from position t's features, which decode to token t + 1, not t + 2)."""
        norm = getattr(getattr(target, "model", None), "norm", None)
        if norm is not None and getattr(norm, "weight", None) is not None and norm.weight.shape == self.final_norm.weight.shape:
            with torch.no_grad():
                self.final_norm.weight.copy_(norm.weight)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items()}

    def with_draft_vocabulary(self, d2t: torch.Tensor) -> "Eagle3Head":
        """A copy of this head with another draft vocabulary ``d2t`` long [Vd'] (its layers' weights kept: the
        output rows are the target's, borrowed by :meth:`attach`, so only the selection changes); unattached."""
        from dataclasses import replace

        head = Eagle3Head(replace(self.config, draft_vocab_size=int(d2t.numel())), d2t=d2t)
        own = {k: v for k, v in self.state_dict().items() if k != "d2t"}
        missing, unexpected = head.load_state_dict(own, strict=False)
        assert missing == ["d2t"] and not unexpected, (missing, unexpected)
        return head.to(self.fc.weight.dtype)

    def save(self, folder: str | Path, *, dtype: torch.dtype = torch.float16, extra: dict | None = None) -> Path:
        """``head.safetensors`` (weights in ``dtype`` + d2t) and ``head_config.json``."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        sd = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in self.state_dict().items()}
        save_file(sd, str(folder / "head.safetensors"))
        cfg = asdict(self.config)
        cfg["feature_layers"] = list(cfg["feature_layers"])
        if extra:
            cfg["extra"] = {**cfg.get("extra", {}), **extra}
        (folder / "head_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        return folder

    @classmethod
    def load(cls, folder: str | Path, target: nn.Module | None = None, *, dtype: torch.dtype = torch.float32) -> "Eagle3Head":
        from safetensors.torch import load_file

        folder = Path(folder)
        cfg_path = folder / "head_config.json"
        if not cfg_path.is_file():
            raise FileNotFoundError(f"no EAGLE-3 head at {folder} (head_config.json missing)")
        cfg = json.loads(cfg_path.read_text())
        cfg["feature_layers"] = tuple(cfg["feature_layers"])
        sd = load_file(str(folder / "head.safetensors"))
        head = cls(Eagle3Config(**cfg), d2t=sd["d2t"]).to(dtype)
        head.load_state_dict({k: (v.to(dtype) if v.is_floating_point() else v) for k, v in sd.items()})
        head.eval()
        if target is not None:
            head.attach(target)
        return head
