"""A Llama-architecture decoder in ``tvm.relax.frontend.nn`` whose attention runs tvm_attn's kernels.

RMSNorm, RoPE (applied by the KV cache's split-rotary kernel), GQA attention through
:class:`tvm_attn.relax.layer.Attention` over :class:`tvm_attn.relax.kv_cache.AttnPagedKVCache`, SwiGLU
MLP. Exported functions (MLC-LLM's calling convention, weights passed packed as one tuple)::

    create_paged_kv_cache(max_batch_size, max_total_seq_len, prefill_chunk_size) -> cache
    prefill(input_ids: int32 [1, total_len], cache, params) -> logits float32 [1, total_len, vocab]
    decode(input_ids: int32 [batch, 1], cache, params)      -> logits float32 [batch, 1, vocab]

The caller drives the cache with TVM's runtime functions (``vm.builtin.kv_state_add_sequence``,
``..._begin_forward(cache, seq_ids, append_lengths)``, ``..._end_forward``, ``..._fork_sequence``,
``..._popn``, ``..._remove_sequence``): ``prefill`` takes the new tokens of every sequence in the
forward laid end to end, ``decode`` one token per sequence. Unlike MLC-LLM's create function, the page
size is fixed when the model is built (the kernels are generated for it).

Weights are random (:func:`random_weights`) or read from a local safetensors file in Hugging Face's
Llama naming (:func:`load_safetensors`). :func:`numpy_forward` is the pure-numpy forward pass of the
same weights that the tests compare against.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace

import numpy as np


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    #: Hugging Face ``rope_scaling`` as (key, value) pairs, e.g. Llama-3.1's ``rope_type: llama3``
    rope_scaling: tuple = ()
    dtype: str = "float16"
    page_size: int = 16
    tie_word_embeddings: bool = False
    variant: object = field(default=None, compare=False)

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every weight by name, in Hugging Face's naming with fused qkv and gate/up projections."""
        h, d, hq, hkv = self.hidden_size, self.head_dim, self.num_attention_heads, self.num_key_value_heads
        shapes = {"model.embed_tokens.weight": (self.vocab_size, h)}
        for i in range(self.num_hidden_layers):
            p = f"model.layers.{i}."
            shapes.update({
                p + "self_attn.qkv_proj.weight": ((hq + 2 * hkv) * d, h),
                p + "self_attn.o_proj.weight": (h, hq * d),
                p + "mlp.gate_up_proj.weight": (2 * self.intermediate_size, h),
                p + "mlp.down_proj.weight": (h, self.intermediate_size),
                p + "input_layernorm.weight": (h,),
                p + "post_attention_layernorm.weight": (h,),
            })
        shapes["model.norm.weight"] = (h,)
        if not self.tie_word_embeddings:
            shapes["lm_head.weight"] = (self.vocab_size, h)
        return shapes


CONFIGS = {
    # CI: runs on the CPU in a second; head_dim 64 is the smallest the kernels take.
    "tiny": LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=64, rope_theta=10000.0,
                        dtype="float32"),
    # Llama-3.1-8B's shapes (random or loaded weights).
    "llama3-8b": LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                             num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                             head_dim=128, rope_theta=500000.0,
                             rope_scaling=(("rope_type", "llama3"), ("factor", 8.0), ("low_freq_factor", 1.0),
                                           ("high_freq_factor", 4.0),
                                           ("original_max_position_embeddings", 8192)),
                             dtype="float16"),
}


def get_config(name: str, **overrides) -> LlamaConfig:
    if name not in CONFIGS:
        raise ValueError(f"unknown model config {name!r}; choose one of {sorted(CONFIGS)}")
    return replace(CONFIGS[name], **overrides)


# ---------------------------------------------------------------------------------------------- model
KV_CACHES = ("tvm_attn", "tvm_builtin")


def build_module(config: LlamaConfig, target: str = "llvm", kv_cache: str = "tvm_attn"):
    """``(IRModule, param names in call order)`` of the exported model (nothing compiled yet).

    ``kv_cache``: ``"tvm_attn"`` (:class:`~tvm_attn.relax.kv_cache.AttnPagedKVCache`, our kernels in
    its attention slots) or ``"tvm_builtin"`` (TVM's ``TIRPagedKVCache``, the baseline).
    """
    if kv_cache not in KV_CACHES:
        raise ValueError(f"kv_cache: must be one of {KV_CACHES}, got {kv_cache!r}")
    from tvm.relax.frontend import nn

    from ..relax.kv_cache import AttnPagedKVCache, KVCacheConfig
    from ..relax.layer import Attention, cache_variant

    c = config

    class MLP(nn.Module):
        def __init__(self):
            self.gate_up_proj = nn.Linear(c.hidden_size, 2 * c.intermediate_size, bias=False, dtype=c.dtype)
            self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False, dtype=c.dtype)

        def forward(self, x):
            gate, up = nn.op.split(self.gate_up_proj(x), 2, axis=-1)
            return self.down_proj(nn.op.silu(gate) * up)

    class DecoderLayer(nn.Module):
        def __init__(self, i: int):
            self.input_layernorm = nn.RMSNorm(c.hidden_size, -1, c.rms_norm_eps, bias=False, dtype=c.dtype)
            self.self_attn = Attention(c.hidden_size, c.num_attention_heads, c.num_key_value_heads,
                                       c.head_dim, i, variant=c.variant, dtype=c.dtype)
            self.post_attention_layernorm = nn.RMSNorm(c.hidden_size, -1, c.rms_norm_eps, bias=False,
                                                       dtype=c.dtype)
            self.mlp = MLP()

        def forward(self, x, cache):
            x = x + self.self_attn(self.input_layernorm(x), cache)
            return x + self.mlp(self.post_attention_layernorm(x))

    class Model(nn.Module):
        def __init__(self):
            self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size, dtype=c.dtype)
            self.layers = nn.ModuleList([DecoderLayer(i) for i in range(c.num_hidden_layers)])
            self.norm = nn.RMSNorm(c.hidden_size, -1, c.rms_norm_eps, bias=False, dtype=c.dtype)

    class LlamaForCausalLM(nn.Module):
        def __init__(self):
            self.model = Model()
            if not c.tie_word_embeddings:
                self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False, dtype=c.dtype)

        def _logits(self, input_ids, cache):
            x = self.model.embed_tokens(input_ids)
            for layer in self.model.layers:
                x = layer(x, cache)
            x = self.model.norm(x)
            if c.tie_word_embeddings:
                logits = nn.op.matmul(x, nn.op.permute_dims(self.model.embed_tokens.weight))
            else:
                logits = self.lm_head(x)
            return logits.astype("float32")

        def prefill(self, input_ids, paged_kv_cache):
            return self._logits(input_ids, paged_kv_cache)

        def batch_prefill(self, input_ids, logit_positions, paged_kv_cache):
            """Logits of the rows ``logit_positions`` only (each sequence's last token), as MLC-LLM."""
            x = self.model.embed_tokens(input_ids)
            for layer in self.model.layers:
                x = layer(x, paged_kv_cache)
            x = nn.op.take(x, logit_positions, axis=1)
            x = self.model.norm(x)
            if c.tie_word_embeddings:
                return nn.op.matmul(x, nn.op.permute_dims(self.model.embed_tokens.weight)).astype("float32")
            return self.lm_head(x).astype("float32")

        def decode(self, input_ids, paged_kv_cache):
            return self._logits(input_ids, paged_kv_cache)

        def create_paged_kv_cache(self, max_batch_size, max_total_seq_len, prefill_chunk_size):
            if kv_cache == "tvm_builtin":
                return _builtin_cache(c, target, max_batch_size, max_total_seq_len, prefill_chunk_size)
            kv = KVCacheConfig(c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.head_dim,
                               c.dtype, c.page_size, rope_theta=c.rope_theta, rope_scaling=c.rope_scaling,
                               target=target)
            variant = cache_variant([layer.self_attn for layer in self.model.layers])
            return AttnPagedKVCache(kv, max_batch_size, max_total_seq_len, prefill_chunk_size,
                                    variant=variant)

    from tvm.relax.frontend.nn.llm.kv_cache import PagedKVCache

    model = LlamaForCausalLM()
    cache_spec = nn.spec.Object(object_type=PagedKVCache)
    spec = {
        "prefill": {"input_ids": nn.spec.Tensor([1, "total_len"], "int32"), "paged_kv_cache": cache_spec,
                    "$": {"param_mode": "packed", "effect_mode": "none"}},
        "batch_prefill": {"input_ids": nn.spec.Tensor([1, "total_len"], "int32"),
                          "logit_positions": nn.spec.Tensor(["num_seqs"], "int32"),
                          "paged_kv_cache": cache_spec, "$": {"param_mode": "packed", "effect_mode": "none"}},
        "decode": {"input_ids": nn.spec.Tensor(["batch_size", 1], "int32"), "paged_kv_cache": cache_spec,
                   "$": {"param_mode": "packed", "effect_mode": "none"}},
        "create_paged_kv_cache": {"max_batch_size": int, "max_total_seq_len": int, "prefill_chunk_size": int,
                                  "$": {"param_mode": "none", "effect_mode": "none"}},
    }
    mod, params, ext_mods = model.export_tvm(spec=spec, allow_extern=True)
    if ext_mods:  # the CUDA cache's plan/run functions (tvm_attn.relax.kv_backend), linked into the library
        from ..relax.kv_cache import external_mods

        mod = mod.with_attr("external_mods", external_mods(ext_mods))
    names = [name for name, _ in params]
    if sorted(names) != sorted(c.param_shapes()):
        raise AssertionError(f"model parameters {names} differ from LlamaConfig.param_shapes()")
    return mod, names


def _builtin_cache(c: LlamaConfig, target: str, max_batch_size, max_total_seq_len, prefill_chunk_size):
    """TVM's own ``TIRPagedKVCache`` with the same configuration (the end-to-end baseline)."""
    from tvm import relax as rx
    from tvm.relax.frontend.nn.llm.kv_cache import RopeMode, TIRPagedKVCache

    from ..build import target_of
    from ..relax.kv_cache import tree_kernels_without_rope_scaling

    with tree_kernels_without_rope_scaling():
        return TIRPagedKVCache(
            attn_kind="mha", max_batch_size=max_batch_size, max_total_seq_len=max_total_seq_len,
            prefill_chunk_size=prefill_chunk_size, page_size=c.page_size, support_sliding_window=0,
            layer_partition=rx.ShapeExpr([0, c.num_hidden_layers]), num_hidden_layers=c.num_hidden_layers,
            num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_key_value_heads,
            qk_head_dim=c.head_dim, v_head_dim=c.head_dim, mla_original_qk_head_dim=0,
            mla_original_v_head_dim=0, rope_mode=RopeMode.NORMAL, rope_scale=1, rope_theta=c.rope_theta,
            rope_scaling=dict(c.rope_scaling), rope_ext_factors=rx.prim_value(0), rotary_dim=c.head_dim,
            enable_disaggregation=False, dtype=c.dtype, target=target_of(target),
        )


# -------------------------------------------------------------------------------------------- weights
def random_weights(config: LlamaConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Random weights with the scale of a trained model (norm weights near 1, projections ~1/sqrt(fan_in))."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in config.param_shapes().items():
        if name.endswith("norm.weight"):
            w = 1.0 + 0.1 * rng.standard_normal(shape)
        elif "embed_tokens" in name:
            w = rng.standard_normal(shape)
        else:
            w = rng.standard_normal(shape) / math.sqrt(shape[1])
        out[name] = w.astype(np.float32).astype(config.dtype)
    return out


_SAFETENSORS_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


def read_safetensors(path) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file: 8-byte little-endian header size, JSON header, raw bytes."""
    import ml_dtypes

    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 8:
        raise ValueError(f"{path}: not a safetensors file (shorter than its 8-byte header size)")
    size = int.from_bytes(data[:8], "little")
    if size > len(data) - 8:
        raise ValueError(f"{path}: header size {size} runs past the end of the file")
    header = json.loads(data[8 : 8 + size])
    body = memoryview(data)[8 + size :]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
        if dtype is None:
            raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        np_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
        arr = np.frombuffer(body[begin:end], dtype=np_dtype)
        out[name] = arr.reshape(info["shape"])
    return out


def load_safetensors(config: LlamaConfig, paths) -> dict[str, np.ndarray]:
    """Weights from local safetensors files in Hugging Face Llama naming (separate q/k/v and gate/up
    projections are fused here); cast to the model dtype. Raises naming any missing or misshapen weight."""
    raw = {}
    for path in [paths] if isinstance(paths, (str, bytes)) or hasattr(paths, "__fspath__") else paths:
        raw.update(read_safetensors(path))
    out = {}
    for name, shape in config.param_shapes().items():
        if name.endswith("qkv_proj.weight"):
            p = name[: -len("qkv_proj.weight")]
            w = np.concatenate([_take(raw, p + f"{x}_proj.weight") for x in "qkv"])
        elif name.endswith("gate_up_proj.weight"):
            p = name[: -len("gate_up_proj.weight")]
            w = np.concatenate([_take(raw, p + "gate_proj.weight"), _take(raw, p + "up_proj.weight")])
        else:
            w = _take(raw, name)
        if tuple(w.shape) != shape:
            raise ValueError(f"weight {name}: shape {tuple(w.shape)} in the file, the config needs {shape}")
        out[name] = np.asarray(w).astype(np.float32).astype(config.dtype)
    return out


def _take(raw: dict, name: str) -> np.ndarray:
    if name not in raw:
        raise ValueError(f"weight {name!r} is not in the safetensors file(s)")
    return raw[name]


def write_safetensors(path, tensors: dict[str, np.ndarray]) -> None:
    """Write ``tensors`` as a safetensors file (used by the tests to check the reader)."""
    inverse = {v: k for k, v in _SAFETENSORS_DTYPES.items()}
    header, chunks, offset = {}, [], 0
    for name, arr in tensors.items():
        arr = np.ascontiguousarray(arr)
        raw = arr.tobytes()
        header[name] = {"dtype": inverse[str(arr.dtype)], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    blob = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for raw in chunks:
            f.write(raw)


# ------------------------------------------------------------------------------------- numpy forward
def rope_frequencies(config: LlamaConfig) -> np.ndarray:
    """Inverse frequencies ``[head_dim / 2]`` as TVM's ``llama_rope_with_position_map`` computes them."""
    d = config.head_dim
    inv = 1.0 / np.power(np.float32(config.rope_theta), (2 * np.arange(d // 2)) / np.float32(d))
    scaling = dict(config.rope_scaling)
    if scaling.get("rope_type") == "llama3":
        lo, hi = scaling["low_freq_factor"], scaling["high_freq_factor"]
        alpha = scaling["original_max_position_embeddings"] / (2 * math.pi) / (hi - lo)
        beta = lo / (hi - lo)
        smooth = np.clip(alpha * inv - beta, 0.0, 1.0)
        inv = (1 - smooth) * inv / scaling["factor"] + smooth * inv
    elif scaling:
        raise ValueError(f"rope_scaling {scaling} is not supported by the numpy forward")
    return inv.astype(np.float64)


def _rope(x, positions, inv_freq):
    angle = positions[:, None].astype(np.float64) * inv_freq[None, :]
    cos, sin = np.cos(angle)[:, None, :], np.sin(angle)[:, None, :]
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def _rms(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def numpy_forward(config: LlamaConfig, weights: dict[str, np.ndarray], tokens) -> np.ndarray:
    """Logits ``[len(tokens), vocab]`` (float64) of one sequence, every position, causal attention.

    Independent of TVM: dense causal softmax attention with GQA, float64 throughout. The config's
    variant (position-free, as the cache requires) enters through its numpy twin ``ref_logits_transform``.
    """
    from ..reference import variant_params
    from ..variants.base import RefContext, compose

    c = config
    variant = compose(c.variant)
    vparams = variant_params(variant, None, num_qo_heads=c.num_attention_heads,
                             num_kv_heads=c.num_key_value_heads, head_dim=c.head_dim)
    w = {k: np.asarray(v).astype(np.float64) for k, v in weights.items()}
    tokens = np.asarray(tokens)
    n, hq, hkv, d = len(tokens), c.num_attention_heads, c.num_key_value_heads, c.head_dim
    inv_freq, pos = rope_frequencies(c), np.arange(n)
    x = w["model.embed_tokens.weight"][tokens]
    causal = np.tril(np.ones((n, n), bool))
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        h = _rms(x, w[p + "input_layernorm.weight"], c.rms_norm_eps)
        qkv = (h @ w[p + "self_attn.qkv_proj.weight"].T).reshape(n, hq + 2 * hkv, d)
        q, k, v = (_rope(qkv[:, :hq], pos, inv_freq), _rope(qkv[:, hq : hq + hkv], pos, inv_freq),
                   qkv[:, hq + hkv :])
        k, v = np.repeat(k, hq // hkv, axis=1), np.repeat(v, hq // hkv, axis=1)
        logits = np.einsum("qhd,khd->hqk", q, k) / math.sqrt(d)
        logits = np.stack([
            variant.ref_logits_transform(
                RefContext(0, pos[:, None], pos[None, :], head, head // (hq // hkv), n, n, d, vparams),
                logits[head])
            for head in range(hq)
        ])
        logits = np.where(causal[None], logits, -np.inf)
        p_attn = np.exp(logits - logits.max(-1, keepdims=True))
        p_attn /= p_attn.sum(-1, keepdims=True)
        o = np.einsum("hqk,khd->qhd", p_attn, v).reshape(n, hq * d)
        x = x + o @ w[p + "self_attn.o_proj.weight"].T
        h = _rms(x, w[p + "post_attention_layernorm.weight"], c.rms_norm_eps)
        gate, up = np.split(h @ w[p + "mlp.gate_up_proj.weight"].T, 2, axis=-1)
        x = x + (gate / (1 + np.exp(-gate)) * up) @ w[p + "mlp.down_proj.weight"].T
    x = _rms(x, w["model.norm.weight"], c.rms_norm_eps)
    head = w["model.embed_tokens.weight"] if c.tie_word_embeddings else w["lm_head.weight"]
    return x @ head.T
