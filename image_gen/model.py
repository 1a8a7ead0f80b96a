"""Autoregressive image model: a Llama-style decoder over raster-ordered VQ tokens.

Paper: Sun et al., "Autoregressive Model Beats Diffusion: Llama for Scalable Image Generation"
(LlamaGen, 2024) for the class-conditional (c2i) layout; Ho & Salimans, "Classifier-Free
Diffusion Guidance" (2022) for CFG as used by LlamaGen.

Glossary:
    image token    a VQ codebook index in [0, V_img); the model's output head covers only these
    prefix         the condition: one class token (c2i) or the prompt's word tokens followed by a
                   begin-of-image token (t2i); the unconditional prefix uses the null class / the
                   null prompt (CFG's "uncond" half)
    backbone ids   one shared embedding table: [0, V_img) image tokens, then num_classes + 1 class
                   tokens (the last is the null class), then the text words, NULL_TEXT and BOI

Conversion of LlamaGen c2i checkpoints: LlamaGen keeps image tokens (``tok_embeddings``) and
classes (``cls_embedding``, with a null class for CFG) in two tables and uses 1-D RoPE over
``cls_token_num`` class positions followed by the raster; here both tables are concatenated in the
order above (image rows then class rows), ``output`` maps to ``lm_head``, the attention and MLP
weights map one-to-one onto the Llama layers (``wqkv`` split into q/k/v, ``w1/w3/w2`` to
gate/up/down), and ``cls_token_num=1``. LlamaGen's QK/FFN dims must be set in the config.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.modeling_outputs import CausalLMOutputWithPast

from mmspec.errors import MMSpecError
from mmspec.guidance import guidance_scale, guide  # noqa: F401  (re-exported: CFG lives in the core)

CONFIG_NAME = "mmspec_ar_image.json"
WEIGHTS_NAME = "model.safetensors"


class ConditionError(MMSpecError):
    """A class id or prompt the model cannot take (unknown class, empty prompt, unknown word)."""


@dataclass(frozen=True)
class ARImageConfig:
    codebook_size: int
    grid_size: int
    num_classes: int = 0
    words: tuple[str, ...] = ()  # text-conditional vocabulary (empty for class-conditional models)
    max_prompt_words: int = 24
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 256
    init_range: float = 0.02

    def __post_init__(self) -> None:
        if (self.num_classes > 0) == (len(self.words) > 0):
            raise MMSpecError("an AR image model is either class-conditional (num_classes > 0) or "
                              "text-conditional (words), not both or neither")

    # -- backbone id layout ------------------------------------------------------------------
    @property
    def class_offset(self) -> int:
        return self.codebook_size

    @property
    def null_class(self) -> int:
        return self.class_offset + self.num_classes

    @property
    def word_offset(self) -> int:
        return self.codebook_size + (self.num_classes + 1 if self.num_classes else 0)

    @property
    def null_text(self) -> int:
        return self.word_offset + len(self.words)

    @property
    def boi(self) -> int:
        return self.null_text + 1

    @property
    def backbone_vocab(self) -> int:
        return self.boi + 1 if self.words else self.null_class + 1

    @property
    def num_image_tokens(self) -> int:
        return self.grid_size * self.grid_size

    @property
    def text_conditional(self) -> bool:
        return bool(self.words)

    def llama_config(self) -> LlamaConfig:
        """The backbone's HF config (its vocabulary is the backbone's: image tokens, conditions, words)."""
        return LlamaConfig(
            vocab_size=self.backbone_vocab, hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size, num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads, num_key_value_heads=self.num_kv_heads,
            max_position_embeddings=self.num_image_tokens + self.max_prompt_words + 8,
            initializer_range=self.init_range, tie_word_embeddings=False,
        )

    def get_text_config(self) -> LlamaConfig:
        """HF's accessor: what a feature head sizes itself by (hidden size, heads, layers, RoPE)."""
        return self.llama_config()


class _ImageRows(torch.nn.Module):
    """The first ``rows`` rows of a linear output layer (a view, never a copy; not a registered submodule)."""

    def __init__(self, head: torch.nn.Linear, rows: int):
        super().__init__()
        self.__dict__["_head"] = head
        self.rows = rows

    @property
    def weight(self) -> torch.Tensor:
        return self._head.weight[: self.rows]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden @ self.weight.T


def tokenize_words(prompt: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", prompt.lower())


class ARImageModel(torch.nn.Module):
    """Models never decode: ``forward`` maps (prefix + image) ids to image-token logits."""

    def __init__(self, config: ARImageConfig):
        super().__init__()
        self.config = config
        self.backbone = LlamaForCausalLM(config.llama_config())

    # -- conditions ---------------------------------------------------------------------------
    def prefix_ids(self, condition: int | str, *, unconditional: bool = False) -> list[int]:
        """Backbone ids of the prefix for one class id or prompt (or its unconditional twin)."""
        cfg = self.config
        if not cfg.text_conditional:
            if unconditional:
                return [cfg.null_class]
            if isinstance(condition, bool) or not isinstance(condition, int):
                raise ConditionError(f"this model is class-conditional: condition must be a class id, got {condition!r}")
            if not 0 <= condition < cfg.num_classes:
                raise ConditionError(f"unknown class id {condition}; the model has classes 0..{cfg.num_classes - 1}")
            return [cfg.class_offset + condition]
        if unconditional:
            return [cfg.null_text, cfg.boi]
        if not isinstance(condition, str):
            raise ConditionError(f"this model is text-conditional: condition must be a prompt, got {condition!r}")
        words = tokenize_words(condition)
        if not words:
            raise ConditionError("empty prompt: a text-conditional model needs at least one word")
        index = {w: i for i, w in enumerate(cfg.words)}
        unknown = [w for w in words if w not in index]
        if unknown:
            raise ConditionError(f"unknown word(s) {unknown} in prompt; the model knows: {' '.join(cfg.words)}")
        if len(words) > cfg.max_prompt_words:
            raise ConditionError(f"prompt has {len(words)} words; at most {cfg.max_prompt_words}")
        return [cfg.word_offset + index[w] for w in words] + [cfg.boi]

    # -- forward ------------------------------------------------------------------------------
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=True, logits_to_keep: int = 0, output_hidden_states: bool = False,
                **kwargs: Any) -> CausalLMOutputWithPast:
        """Logits over the codebook; ``output_hidden_states`` adds the backbone's hidden states (HF's
        tuple: embeddings, then each layer, the last one after the final norm), which a feature head reads."""
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                            logits_to_keep=logits_to_keep, output_hidden_states=output_hidden_states)
        return CausalLMOutputWithPast(logits=out.logits[..., : self.config.codebook_size],
                                      past_key_values=out.past_key_values, hidden_states=out.hidden_states)

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.backbone.get_input_embeddings()

    def get_output_embeddings(self) -> torch.nn.Module:
        """The LM head's image-token rows (weight [V_img, d], a view of the backbone's head): the output
        layer as the verification sees it."""
        return _ImageRows(self.backbone.get_output_embeddings(), self.config.codebook_size)

    @property
    def model(self) -> torch.nn.Module:
        """The decoder stack (HF's ``LlamaForCausalLM.model``: embeddings, layers, final norm)."""
        return self.backbone.model

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # -- persistence --------------------------------------------------------------------------
    def save_pretrained(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / CONFIG_NAME).write_text(json.dumps(asdict(self.config), indent=2))
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(path / WEIGHTS_NAME))

    @classmethod
    def from_pretrained(cls, path: str | Path, *, dtype: torch.dtype | None = None) -> "ARImageModel":
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / CONFIG_NAME).is_file():
            raise FileNotFoundError(f"no AR image model at {str(path)!r} (missing {CONFIG_NAME})")
        raw = json.loads((path / CONFIG_NAME).read_text())
        raw["words"] = tuple(raw.get("words", ()))
        model = cls(ARImageConfig(**raw))
        model.load_state_dict(load_file(str(path / WEIGHTS_NAME)))
        if dtype is not None:
            model = model.to(dtype)
        return model.eval()
