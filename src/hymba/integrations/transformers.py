"""Hymba checkpoints in transformers without `trust_remote_code`: model_type "hymba" for the Auto classes.

    import hymba.integrations.transformers  # registers "hymba" with AutoConfig and AutoModelForCausalLM
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    model = AutoModelForCausalLM.from_pretrained("nvidia/Hymba-1.5B-Base")
    generator = pipeline("text-generation", model=model, tokenizer=AutoTokenizer.from_pretrained(...))

`HymbaForCausalLMHF` is our `HymbaModel` plus the LM head under the checkpoint's own tensor names
(`model.layers.*`, `lm_head`), wrapped as a `PreTrainedModel` + `GenerationMixin`; the released weights load
unchanged and the logits are ours. transformers' generation runs without a KV cache (each step is a full forward
over the sequence): correct, not fast. Generate with `hymba.generate` or `hymba serve` when speed matters.
"""

from __future__ import annotations

import dataclasses

import torch
import transformers
from torch import nn

if int(transformers.__version__.split(".")[0]) < 5:
    raise ImportError(f"hymba.integrations.transformers needs transformers >= 5 (its dataclass configs and "
                      f"`transformers.initialization`); found {transformers.__version__}")

from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import CausalLMOutputWithPast

from hymba.config import HymbaConfig
from hymba.model import HymbaForCausalLM, HymbaMixer, HymbaModel

__all__ = ["HymbaConfigHF", "HymbaForCausalLMHF"]


class HymbaConfigHF(PretrainedConfig):
    """The released config.json as a transformers config; `to_hymba()` gives our validated `HymbaConfig`.

    Keys missing from a file take `HymbaConfig`'s defaults (the release's), so both sides agree on every value.
    """

    model_type = "hymba"

    def __post_init__(self, **kwargs):
        defaults = HymbaConfig().to_dict()
        # Not defaulted: a class attribute, transformers' bookkeeping, a generation setting it pops, and auto_map,
        # which transformers only tolerates when it is a dict.
        for key in ("model_type", "transformers_version", "architectures", "torch_dtype", "use_cache", "auto_map"):
            defaults.pop(key, None)
        kwargs = {**defaults, **kwargs}
        # The release's "flex" names its own kernel choice; transformers would read it as one of its backends.
        # Ours picks its attention backend at run time, so the key is dropped.
        kwargs.pop("attn_implementation", None)
        super().__post_init__(**kwargs)

    def to_hymba(self) -> HymbaConfig:
        """Our config from the released keys; transformers' own bookkeeping keys are left out."""
        bookkeeping = PretrainedConfig().to_dict().keys() - {f.name for f in dataclasses.fields(HymbaConfig)}
        data = {key: value for key, value in self.to_dict().items() if key not in bookkeeping}
        if self.dtype is not None:
            data["torch_dtype"] = str(self.dtype).removeprefix("torch.")
        return HymbaConfig.from_dict(data)


class HymbaForCausalLMHF(PreTrainedModel, GenerationMixin):
    """Hymba as a transformers causal LM (our modules; see the module docstring)."""

    config_class = HymbaConfigHF
    base_model_prefix = "model"
    _no_split_modules = ["HymbaDecoderLayer"]
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: HymbaConfigHF):
        super().__init__(config)
        self.hymba_config = config.to_hymba()
        self.model = HymbaModel(self.hymba_config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # transformers' default covers linears, convs, embeddings and RMSNorms as the release does; the SSM
        # constants and meta tokens are ours (as HymbaForCausalLM.init_weights). `init.*` skips loaded tensors.
        super()._init_weights(module)
        if isinstance(module, HymbaMixer) and module.use_ssm:
            d_state = self.hymba_config.mamba_d_state
            init.copy_(module.A_log[0], torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).expand_as(
                module.A_log[0]))
            init.ones_(module.D[0])
        elif isinstance(module, HymbaModel) and self.hymba_config.num_memory_tokens:
            init.normal_(module.memory_tokens, mean=0.0, std=1.0)

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the Hymba state (meta tokens, ring buffers, SSM) is not a DynamicCache

    def prepare_inputs_for_generation(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                                      **kwargs) -> dict:
        # No cache on this side: every step sees the whole (left-padded) sequence.
        return {"input_ids": input_ids, "attention_mask": attention_mask, "logits_to_keep": kwargs.get(
            "logits_to_keep", 0)}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, logits_to_keep: int = 0, **kwargs) -> CausalLMOutputWithPast:
        """Logits (b, L, vocab), or the last `logits_to_keep` positions; with `labels`, the mean next-token loss.

        Padding must be on the left (as transformers pads decoder-only models for generation)."""
        out = HymbaForCausalLM.forward(self, input_ids, attention_mask, labels, logits_to_keep=logits_to_keep or None)
        return CausalLMOutputWithPast(loss=out.loss, logits=out.logits)

AutoConfig.register("hymba", HymbaConfigHF, exist_ok=True)
AutoModelForCausalLM.register(HymbaConfigHF, HymbaForCausalLMHF, exist_ok=True)
