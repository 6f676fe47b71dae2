"""The lm-evaluation-harness model `hymba`: lm-eval's own tasks, prompts and metrics run on our model.

lm-eval finds models only among those registered when its command line starts, so run its command line through
this module, which registers `hymba` first:

    python -m hymba.eval.lm_eval_adapter --model hymba --model_args pretrained=nvidia/Hymba-1.5B-Base,dtype=bfloat16 \\
        --device cuda --tasks piqa,arc_easy --batch_size 16

From Python, `import hymba.eval.lm_eval_adapter` and then `lm_eval.simple_evaluate(model="hymba", ...)`.
Requests are tokenized by lm-eval (`TemplateLM`) and scored by `hymba.eval.harness.ModelScorer`, the batched
forward `hymba eval` uses. Nothing else in hymba imports this module; it needs `pip install lm-eval`.
"""

from __future__ import annotations

import json

from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from hymba.errors import HymbaError
from hymba.eval.harness import ModelScorer


@register_model("hymba")
class HymbaLM(TemplateLM):
    """`--model_args pretrained=DIR_OR_HUB_ID[,dtype=bfloat16][,tokenizer=DIR][,add_bos_token=False][,max_gen_toks=256]`
    with `--device` (lm-eval's default is cuda:0; pass cpu without a GPU) and `--batch_size N` (a number: lm-eval's
    "auto" search is not offered).

    `add_bos_token` as in lm-eval's HF model: unset follows the tokenizer (Hymba's adds BOS).
    `max_batch_size` is accepted because lm-eval always passes it, and unused.
    """

    def __init__(self, pretrained: str, dtype: str | None = None, device: str | None = None,
                 batch_size: int | str = 8, tokenizer: str | None = None, add_bos_token: bool | None = None,
                 max_gen_toks: int = 256, max_batch_size: int | None = None):
        super().__init__()
        from hymba.generate_cli import load_model_and_tokenizer
        from hymba.tokenizer import HymbaTokenizer

        if not str(batch_size).isdigit():
            raise HymbaError(f"batch_size must be a number, got {batch_size!r}")
        self.model, self.tokenizer = load_model_and_tokenizer(pretrained, device, dtype)
        if tokenizer:
            self.tokenizer = HymbaTokenizer.from_pretrained(tokenizer)
        self.add_bos_token = add_bos_token
        self.max_gen_toks = int(max_gen_toks)
        self.scorer = ModelScorer(self.model, self.tokenizer, int(batch_size), add_bos_token)

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        # What an empty context is scored after: BOS, else EOS (lm-eval's HF model).
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self.scorer.max_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs) -> list[int]:
        add_bos = self.add_bos_token if add_special_tokens is None else add_special_tokens
        if add_special_tokens is None and self.tokenizer.bos_token and string.startswith(self.tokenizer.bos_token):
            add_bos = False  # the text spells BOS already (lm-eval's has_bos_prefix rule)
        ids = self.tokenizer.encode(string, add_bos=add_bos)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        self.scorer.progress = not disable_tqdm
        return self.scorer.loglikelihood_tokens([(context, continuation) for _, context, continuation in requests])

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole texts in disjoint windows of `max_length` tokens, as lm-eval's HF model."""
        windows, owners = [], []
        for index, (text,) in enumerate(request.args for request in requests):
            for window in lm_utils.get_rolling_token_windows(token_list=self.tok_encode(text),
                                                             prefix_token=self.prefix_token_id,
                                                             max_seq_len=self.max_length, context_len=1):
                windows.append(lm_utils.make_disjoint_window(window))
                owners.append(index)
        self.scorer.progress = not disable_tqdm
        totals = [0.0] * len(requests)
        for index, (loglikelihood, _) in zip(owners, self.scorer.loglikelihood_tokens(windows)):
            totals[index] += loglikelihood
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Completions, one batch run per distinct set of generation arguments (until, max_gen_toks, sampling)."""
        self.scorer.progress = not disable_tqdm
        by_kwargs: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            by_kwargs.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(index)
        outputs = [""] * len(requests)
        for indices in by_kwargs.values():
            kwargs = dict(requests[indices[0]].args[1])
            until = kwargs.get("until") or []
            sampling = {k: kwargs[k] for k in ("do_sample", "temperature", "top_p", "top_k") if k in kwargs}
            texts = self.scorer.generate([requests[i].args[0] for i in indices],
                                         [until] if isinstance(until, str) else until,
                                         int(kwargs.get("max_gen_toks", self.max_gen_toks)), **sampling)
            for i, text in zip(indices, texts):
                outputs[i] = text
        return outputs


if __name__ == "__main__":
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
