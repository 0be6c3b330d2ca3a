"""The decode path shared by `generate`, `serve`, the ablations and training's `val_generate`.

Plain `transformers` `generate` spends most of a decoding step on its own per-step Python (logits processors,
stopping criteria, `prepare_inputs_for_generation`, causal-mask construction, a cache that grows by `cat`),
not on the language model: on the demo release one thread spends ~1.3 ms per step on a model whose arithmetic
takes a fraction of that. This module keeps what the arithmetic needs and nothing else:

- the image prefix (ViT, Q-Former, projection, scattered into the prompt embeddings) is computed once per study,
  and the prompt is prefilled once per study (beam search copies the prefilled cache to its beams);
- the KV cache is a static buffer per layer, sized from buckets of batch size and total length (prompt + new
  tokens, rounded up), written in place at one slot per step;
- one decoding step calls the model's own layer modules (so LoRA, bitsandbytes and every numeric detail are the
  model's) with the same attention function and masks `generate` would pass, which is why greedy and beam
  search are token-for-token equal to `generate` (tests/test_decode.py);
- the loop is minimal: greedy, beam search (the same algorithm as `generate`: 2*beams candidates, length
  penalty, early-stop heuristic), sampling (temperature, top-k, top-p; seeded), repetition penalty,
  min_new_tokens, EOS handling;
- `compile=True` runs the step through `torch.compile` on full static buffers (CUDA graphs on CUDA via
  mode="reduce-overhead"); compiled graphs are cached per (batch bucket, length bucket) and inductor's
  compile cache directory (`TORCHINDUCTOR_CACHE_DIR`) is reused across runs.

Anything this loop does not implement (no_repeat_ngram_size, num_return_sequences, constraints, ...) goes to
plain `generate`, so every setting still works; `fallback_reason` says why.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from dataclasses import dataclass

import torch

log = logging.getLogger("clinicalblip.decode")

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
# The cache length (prompt + new tokens) is rounded up to one of these, then to a multiple of the last: few
# shapes, so a server with varied prompts and max_new_tokens compiles a handful of graphs, not one per request.
LENGTH_BUCKETS = (128, 256, 512, 1024, 2048)

# generate() keywords this loop implements; any other keyword, or a generation_config field set to something
# other than its default (see _UNSUPPORTED_FIELDS), goes to plain generate.
SUPPORTED = {"max_new_tokens", "min_new_tokens", "num_beams", "do_sample", "temperature", "top_p", "top_k",
             "repetition_penalty", "length_penalty", "early_stopping", "seed"}
_UNSUPPORTED_FIELDS = {"no_repeat_ngram_size": 0, "num_return_sequences": 1, "bad_words_ids": None,
                       "force_words_ids": None, "constraints": None, "num_beam_groups": 1, "diversity_penalty": 0.0,
                       "encoder_no_repeat_ngram_size": 0, "forced_bos_token_id": None, "forced_eos_token_id": None,
                       "suppress_tokens": None, "begin_suppress_tokens": None, "min_length": 0,
                       "exponential_decay_length_penalty": None, "sequence_bias": None, "typical_p": 1.0,
                       "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "min_p": None, "renormalize_logits": False,
                       "guidance_scale": None, "watermarking_config": None, "max_time": None, "stop_strings": None,
                       "prompt_lookup_num_tokens": None, "assistant_model": None}


@dataclass
class Settings:
    """Effective decoding settings: the language model's generation_config overridden by the call's keywords."""

    max_new_tokens: int
    min_new_tokens: int
    num_beams: int
    do_sample: bool
    temperature: float
    top_k: int
    top_p: float
    repetition_penalty: float
    length_penalty: float
    early_stopping: bool | str
    eos: list[int]
    pad: int
    seed: int


def resolve(lm, kwargs: dict) -> tuple[Settings | None, str]:
    """(Settings, "") when this loop can run the call, else (None, the reason plain generate runs it)."""
    unknown = sorted(set(kwargs) - SUPPORTED)
    if unknown:
        return None, f"not implemented by the fast loop: {', '.join(unknown)}"
    gc = copy.deepcopy(lm.generation_config)
    seed = int(kwargs.get("seed") or 0)
    gc.update(**{k: v for k, v in kwargs.items() if k != "seed" and v is not None})
    for name, default in _UNSUPPORTED_FIELDS.items():
        value = getattr(gc, name, default)
        if value not in (default, None) and not (name == "min_length" and not value):
            return None, f"generation_config.{name}={value!r} is not implemented by the fast loop"
    if gc.max_new_tokens is None:
        return None, "max_new_tokens is not set"
    eos = gc.eos_token_id
    eos = [] if eos is None else [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]
    pad = gc.pad_token_id if gc.pad_token_id is not None else (eos[0] if eos else 0)
    if (gc.num_beams or 1) > 1 and gc.do_sample:
        return None, "beam sampling is not implemented by the fast loop"
    return Settings(max_new_tokens=int(gc.max_new_tokens), min_new_tokens=int(gc.min_new_tokens or 0),
                    num_beams=int(gc.num_beams or 1), do_sample=bool(gc.do_sample),
                    temperature=float(gc.temperature if gc.temperature is not None else 1.0),
                    top_k=int(gc.top_k or 0), top_p=float(gc.top_p if gc.top_p is not None else 1.0),
                    repetition_penalty=float(gc.repetition_penalty or 1.0),
                    length_penalty=float(gc.length_penalty if gc.length_penalty is not None else 1.0),
                    early_stopping=gc.early_stopping if gc.early_stopping is not None else False,
                    eos=eos, pad=int(pad), seed=seed), ""


def _bucket(n: int, buckets=BATCH_BUCKETS) -> int:
    for b in buckets:
        if n <= b:
            return b
    return n


def _round_up(n: int) -> int:
    for b in LENGTH_BUCKETS:
        if n <= b:
            return b
    k = LENGTH_BUCKETS[-1]
    return (n + k - 1) // k * k


def compile_cache_dir() -> str:
    """Inductor's compile cache folder: TORCHINDUCTOR_CACHE_DIR, else ~/.cache/clinicalblip/inductor (reused by
    every run on this machine, so only the first run pays the full compile)."""
    path = os.environ.get("TORCHINDUCTOR_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "clinicalblip", "inductor")
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", path)
    os.makedirs(path, exist_ok=True)
    return path


def refuse_compile_reason(model) -> str:
    """Why `compile=True` cannot be honoured for this model ('' when it can)."""
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        return ("bitsandbytes 4-bit/8-bit layers do not compile (their kernels are opaque to torch.compile): "
                "the static-cache loop runs them eagerly")
    return ""


# ------------------------------------------------------------------------------------------------- caches
class _LlamaCache:
    """What a LLaMA attention layer needs of a cache: `update` writes this step's K/V at `slot` (one slot for the
    whole batch: left padding keeps rows aligned) and returns the keys the step may see."""

    def __init__(self, k: list[torch.Tensor], v: list[torch.Tensor]):
        self.k, self.v = k, v
        self.slot: int | torch.Tensor = 0
        self.visible: int | None = None  # eager: attend to slots [0, visible); None: the whole buffer (compiled)

    def update(self, key, value, layer_idx, *args, **kwargs):
        k, v = self.k[layer_idx], self.v[layer_idx]
        if isinstance(self.slot, torch.Tensor):
            k.index_copy_(2, self.slot, key)
            v.index_copy_(2, self.slot, value)
        else:
            k[:, :, self.slot: self.slot + 1] = key
            v[:, :, self.slot: self.slot + 1] = value
        if self.visible is None:
            return k, v
        return k[:, :, : self.visible], v[:, :, : self.visible]

    def reorder(self, index: torch.Tensor) -> None:
        for buf in self.k + self.v:
            buf.copy_(buf.index_select(0, index))


def _attention_fn(config):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    impl = config._attn_implementation
    if impl in (None, "eager"):
        return None
    return ALL_ATTENTION_FUNCTIONS.get_interface(impl, None)


# ------------------------------------------------------------------------------------------------- decoder
class Decoder:
    """Fast decoding for one InstructBLIP model (LLaMA-style or T5-style language model).

    compile: run the decoding step through torch.compile (refused with a logged reason for bitsandbytes models).
    """

    def __init__(self, model, compile: bool = False):
        self.model = model
        self.lm = model.language_model
        self.encoder_decoder = bool(self.lm.config.is_encoder_decoder)
        reason = refuse_compile_reason(model) if compile else ""
        if reason:
            log.warning("--compile refused: %s", reason)
        self.compile = bool(compile) and not reason
        self.compile_refused = reason
        self._compiled = None
        self._plan = None
        self._rope = None
        self.fallback_reason = ""
        self.first_call_s: float | None = None  # wall time of the first compiled call (compile included)
        if self.compile:
            compile_cache_dir()
            import torch._dynamo

            # one graph per (batch bucket, length bucket); dynamo's default limit of 8 would fall back to eager
            for name in ("cache_size_limit", "recompile_limit"):
                if hasattr(torch._dynamo.config, name):
                    setattr(torch._dynamo.config, name, max(64, getattr(torch._dynamo.config, name)))

    @property
    def device(self):
        return next(self.lm.parameters()).device

    # ------------------------------------------------------------------ prefix
    def prefix(self, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt embeddings with the image features scattered into the image-token positions (as
        InstructBlipForConditionalGeneration.generate builds them), and the attention mask."""
        m = self.model
        feats = m.get_image_features(inputs["pixel_values"], qformer_input_ids=inputs.get("qformer_input_ids"),
                                     qformer_attention_mask=inputs.get("qformer_attention_mask"),
                                     return_dict=True).pooler_output
        ids = inputs["input_ids"]
        embeds = m.get_input_embeddings()(ids)
        feats = feats.to(embeds.device, embeds.dtype)
        embeds = embeds.masked_scatter(m.get_placeholder_mask(ids, inputs_embeds=embeds), feats)
        mask = inputs.get("attention_mask")
        return embeds, torch.ones_like(ids) if mask is None else mask

    # ------------------------------------------------------------------ entry point
    @torch.no_grad()
    def generate(self, inputs: dict, **kwargs) -> torch.Tensor:
        """New tokens only ([batch, n], finished rows padded), for `inputs` as the collator makes them."""
        settings, reason = resolve(self.lm, kwargs)
        if settings is None:
            self.fallback_reason = reason
            kw = {k: v for k, v in kwargs.items() if k != "seed"}
            if "seed" in kwargs and kwargs.get("do_sample"):
                torch.manual_seed(int(kwargs["seed"] or 0))
            out = self.model.generate(**inputs, **kw)
            start = 1 if self.encoder_decoder else inputs["input_ids"].shape[1]
            return out[:, start:] if out.shape[1] > start else out[:, :0]
        self.fallback_reason = ""
        embeds, mask = self.prefix(inputs)
        t0 = time.perf_counter()
        if self.encoder_decoder:
            out = self._t5(embeds, mask, settings)
        else:
            out = self._llama(embeds, mask, inputs["input_ids"], settings)
        if self.compile and self.first_call_s is None:
            self.first_call_s = time.perf_counter() - t0
        return out

    # ------------------------------------------------------------------ LLaMA-style
    def _llama(self, embeds, mask, input_ids, s: Settings) -> torch.Tensor:
        lm = self.lm
        B, L = input_ids.shape
        nb = s.num_beams
        pos = mask.long().cumsum(-1) - 1
        pos.masked_fill_(mask == 0, 1)
        out = lm(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
        logits = out.logits[:, -1, :].float()
        rows = B * nb
        total = L + s.max_new_tokens
        size = _round_up(total)
        nrows = _bucket(rows) if self.compile else rows
        ks, vs = [], []
        for layer in out.cache.layers:
            k, v = layer.keys, layer.values
            kb = k.new_zeros((nrows, k.shape[1], size, k.shape[3]))
            vb = v.new_zeros((nrows, v.shape[1], size, v.shape[3]))
            kb[:rows, :, :L] = k.repeat_interleave(nb, 0) if nb > 1 else k
            vb[:rows, :, :L] = v.repeat_interleave(nb, 0) if nb > 1 else v
            ks.append(kb)
            vs.append(vb)
        del out
        cache = _LlamaCache(ks, vs)
        if nb > 1:
            logits = logits.repeat_interleave(nb, 0)
            mask = mask.repeat_interleave(nb, 0)
            input_ids = input_ids.repeat_interleave(nb, 0)
        next_pos = pos[:, -1].repeat_interleave(nb, 0) + 1 if nb > 1 else pos[:, -1] + 1
        padded = bool((mask == 0).any())
        state = _LlamaState(self, cache, mask, next_pos, L, rows, nrows, size, padded, self.rope_table(size, embeds))
        if nb > 1:
            return _beam_search(state, logits, input_ids, s, B, prompt_len=L)
        return _greedy_or_sample(state, logits, input_ids, s)

    def _llama_step(self, ids, position_ids, mask4d, cache, table=None):
        """One token for every row through the model's own weights, in the same op order as LlamaDecoderLayer
        (the module wrappers, hub-kernel hooks and deprecation shims around it cost more than the arithmetic at
        small sizes). Linear layers that are not plain nn.Linear (LoRA, bitsandbytes) are called as modules.
        table: (cos, sin with the rotate-half sign folded in) per position, from rope_table; else computed."""
        lm = self.lm
        if self._plan is None:
            self._plan = _llama_plan(lm)
        embed, layers, norm, head, attn, direct = self._plan
        h = embed(ids)
        if table is not None:
            cos, sin_signed = table[0][position_ids], table[1][position_ids]  # [B, 1, D]
        else:
            cos, sin = lm.model.rotary_emb(h, position_ids)
            half = sin.shape[-1] // 2
            sin_signed = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
        cos, sin_signed = cos.unsqueeze(1), sin_signed.unsqueeze(1)
        half = cos.shape[-1] // 2
        B = h.shape[0]
        for i, (ln1, q_proj, k_proj, v_proj, o_proj, module, ln2, gate, up, down, act) in enumerate(layers):
            x = ln1(h)
            hd = module.head_dim
            q = q_proj(x).view(B, 1, -1, hd).transpose(1, 2)
            k = k_proj(x).view(B, 1, -1, hd).transpose(1, 2)
            v = v_proj(x).view(B, 1, -1, hd).transpose(1, 2)
            # apply_rotary_pos_emb: x*cos + cat(-x2, x1)*sin == x*cos + roll(x)*(sin with its first half negated)
            q = q * cos + q.roll(half, -1) * sin_signed
            k = k * cos + k.roll(half, -1) * sin_signed
            k, v = cache.update(k, v, i)
            if direct:  # what sdpa_attention_forward runs for one query without grouped heads
                o = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask4d, dropout_p=0.0,
                                                                     scale=module.scaling, is_causal=False)
                o = o.transpose(1, 2)
            else:
                o, _ = attn(module, q, k, v, mask4d, dropout=0.0, scaling=module.scaling)
            h = h + o_proj(o.reshape(B, 1, -1).contiguous())
            x = ln2(h)
            h = h + down(act(gate(x)) * up(x))
        return head(norm(h))[:, -1, :]

    def rope_table(self, size: int, like: torch.Tensor):
        """cos and sign-folded sin for positions 0..size-1 computed by the model's rotary module at once, or None
        where a table could differ from per-step values in the last bit (scaled rope types; head sizes whose
        rows would not fill whole vector lanes)."""
        re = self.lm.model.rotary_emb
        hd = self.lm.model.layers[0].self_attn.head_dim
        if getattr(re, "rope_type", "default") != "default" or hd % 32:
            return None
        key = (size, like.dtype, like.device)
        if self._rope is None or self._rope[0] != key:
            cos, sin = re(like, torch.arange(size, device=like.device)[None])
            half = hd // 2
            sin_signed = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
            self._rope = (key, (cos[0], sin_signed[0]))
        return self._rope[1]

    # ------------------------------------------------------------------ T5-style
    def _t5(self, embeds, mask, s: Settings) -> torch.Tensor:
        lm = self.lm
        enc = lm.encoder(inputs_embeds=embeds, attention_mask=mask, return_dict=True).last_hidden_state
        B = enc.shape[0]
        nb = s.num_beams
        rows = B * nb
        nrows = _bucket(rows) if self.compile else rows
        size = _round_up(1 + s.max_new_tokens)
        blocks = lm.decoder.block
        ks, vs, cks, cvs = [], [], [], []
        for blk in blocks:
            att = blk.layer[0].SelfAttention
            H, D = att.n_heads, att.key_value_proj_dim
            ks.append(enc.new_zeros((nrows, H, size, D)))
            vs.append(enc.new_zeros((nrows, H, size, D)))
            ca = blk.layer[1].EncDecAttention
            ck = ca.k(enc).view(B, -1, ca.n_heads, ca.key_value_proj_dim).transpose(1, 2)
            cv = ca.v(enc).view(B, -1, ca.n_heads, ca.key_value_proj_dim).transpose(1, 2)
            idx = torch.arange(B, device=enc.device).repeat_interleave(nb)
            if nrows > rows:
                idx = torch.cat([idx, idx[:1].expand(nrows - rows)])
            cks.append(ck.index_select(0, idx).contiguous())
            cvs.append(cv.index_select(0, idx).contiguous())
        enc_mask = mask.repeat_interleave(nb, 0) if nb > 1 else mask
        cross_mask = None
        if self.compile:  # the encoder length to its bucket too (masked slots): one graph for many prompt lengths
            extra = _round_up(enc.shape[1]) - enc.shape[1]
            cks = [torch.nn.functional.pad(t, (0, 0, 0, extra)) for t in cks]
            cvs = [torch.nn.functional.pad(t, (0, 0, 0, extra)) for t in cvs]
            enc_mask = torch.nn.functional.pad(enc_mask, (0, extra))
        if self.compile or bool((enc_mask == 0).any()):
            m = enc_mask.bool()
            if nrows > rows:
                m = torch.cat([m, m[:1].expand(nrows - rows, -1)])
            cross_mask = m[:, None, None, :]
        state = _T5State(self, ks, vs, cks, cvs, cross_mask, rows, nrows, size)
        start = lm.config.decoder_start_token_id
        first = torch.full((rows, 1), start, dtype=torch.long, device=enc.device)
        logits = state.step(first[:, 0])
        if nb > 1:
            return _beam_search(state, logits, first, s, B, prompt_len=1)
        return _greedy_or_sample(state, logits, first, s)

    def _t5_step(self, ids, slot, visible, ks, vs, cks, cvs, self_mask, cross_mask):
        """One decoder token for every row. slot: where this token's K/V go; visible: keys the step sees (int,
        eager) or None with self_mask [rows, 1, 1, size] (compiled, full static buffer)."""
        lm = self.lm
        attn = _attention_fn(lm.config)
        h = lm.decoder.embed_tokens(ids[:, None])
        rows = h.shape[0]
        bias = cross_bias = None
        for i, blk in enumerate(lm.decoder.block):
            sa = blk.layer[0]
            att = sa.SelfAttention
            x = sa.layer_norm(h)
            H, D = att.n_heads, att.key_value_proj_dim
            q = att.q(x).view(rows, 1, H, D).transpose(1, 2)
            k = att.k(x).view(rows, 1, H, D).transpose(1, 2)
            v = att.v(x).view(rows, 1, H, D).transpose(1, 2)
            if isinstance(slot, torch.Tensor):
                ks[i].index_copy_(2, slot, k)
                vs[i].index_copy_(2, slot, v)
                K, V = ks[i], vs[i]
            else:
                ks[i][:, :, slot: slot + 1] = k
                vs[i][:, :, slot: slot + 1] = v
                K, V = ks[i][:, :, :visible], vs[i][:, :, :visible]
            if bias is None:  # the first layer owns the relative position bias; the others reuse it (as T5Stack)
                bias = att.compute_bias(1, K.shape[2], device=q.device, past_seen_tokens=slot)
            o = _attend(att, attn, q, K, V, self_mask, bias)
            h = h + att.o(o.reshape(rows, 1, -1))
            ca = blk.layer[1]
            cat_ = ca.EncDecAttention
            x = ca.layer_norm(h)
            q = cat_.q(x).view(rows, 1, cat_.n_heads, cat_.key_value_proj_dim).transpose(1, 2)
            if cross_bias is None:
                cross_bias = torch.zeros((1, cat_.n_heads, 1, cks[i].shape[2]), device=q.device, dtype=q.dtype)
            o = _attend(cat_, attn, q, cks[i], cvs[i], cross_mask, cross_bias)
            h = h + cat_.o(o.reshape(rows, 1, -1))
            h = blk.layer[-1](h)
        h = lm.decoder.final_layer_norm(h)
        if getattr(lm.config, "scale_decoder_outputs", lm.config.tie_word_embeddings):
            h = h * (lm.model_dim**-0.5)
        return lm.lm_head(h)[:, -1, :]


def _linear(mod):
    """A plain nn.Linear as F.linear on its (live) weights; anything else (LoRA, bitsandbytes) as the module."""
    if type(mod) is torch.nn.Linear:
        return lambda x: torch.nn.functional.linear(x, mod.weight, mod.bias)
    return mod


def _rms(mod):
    """LlamaRMSNorm's arithmetic, op for op (float32 variance, weight times the input dtype)."""
    if type(mod).__name__ != "LlamaRMSNorm":
        return mod
    eps = mod.variance_epsilon

    def norm(x):
        dtype = x.dtype
        h = x.to(torch.float32) if dtype != torch.float32 else x
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        return mod.weight * (h.to(dtype) if dtype != torch.float32 else h)
    return norm


def _llama_plan(lm):
    """Per-layer callables for the lean LLaMA step, resolved once per model."""
    from transformers.models.llama.modeling_llama import eager_attention_forward

    attn = _attention_fn(lm.config) or eager_attention_forward
    layers = []
    for layer in lm.model.layers:
        a, mlp = layer.self_attn, layer.mlp
        layers.append((_rms(layer.input_layernorm), _linear(a.q_proj), _linear(a.k_proj), _linear(a.v_proj),
                       _linear(a.o_proj), a, _rms(layer.post_attention_layernorm), _linear(mlp.gate_proj),
                       _linear(mlp.up_proj), _linear(mlp.down_proj), mlp.act_fn))
    emb = lm.model.embed_tokens
    embed = (lambda ids: torch.nn.functional.embedding(ids, emb.weight, emb.padding_idx)) \
        if type(emb) is torch.nn.Embedding else emb
    impl = lm.config._attn_implementation
    a0 = lm.model.layers[0].self_attn
    direct = impl == "sdpa" and a0.num_key_value_groups == 1
    return embed, layers, _rms(lm.model.norm), _linear(lm.lm_head), attn, direct


def _attend(module, attn, q, k, v, mask, bias):
    """T5 attention exactly as T5Attention calls it: the configured attention function with the position bias."""
    if attn is None:  # eager
        from transformers.models.t5.modeling_t5 import eager_attention_forward as attn
    out, _ = attn(module, q, k, v, mask, dropout=0.0, scaling=module.scaling, position_bias=bias)
    return out


# ------------------------------------------------------------------------------------------------- step states
class _LlamaState:
    """One batch's static cache and the per-step inputs for a LLaMA-style step (eager or compiled)."""

    def __init__(self, dec: Decoder, cache: _LlamaCache, prompt_mask, next_pos, L, rows, nrows, size, padded,
                 table):
        self.dec, self.cache, self.rows, self.nrows, self.size = dec, cache, rows, nrows, size
        self.table = table
        self.slot = L
        self.pos = next_pos
        dev = next_pos.device
        self.padded = padded
        self.valid = torch.zeros((nrows, size), dtype=torch.bool, device=dev)
        self.valid[:rows, :L] = prompt_mask.bool()
        if nrows > rows:
            self.valid[rows:, :L] = prompt_mask[:1].bool()
            self.pos = torch.cat([self.pos, self.pos[:1].expand(nrows - rows)])
        if dec.compile:
            self.fn = _compiled(dec, "llama", nrows, size)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        rows, nrows = self.rows, self.nrows
        if nrows > rows:
            tokens = torch.cat([tokens, tokens[:1].expand(nrows - rows)])
        self.valid[:, self.slot] = True
        ids = tokens[:, None]
        position_ids = self.pos[:, None]
        if self.dec.compile:
            slot = torch.tensor([self.slot], device=tokens.device)
            logits = self.fn(ids, position_ids, self.valid[:, None, None, :], slot, self.cache.k, self.cache.v,
                             self.table)
            logits = logits.clone()
        else:
            self.cache.slot, self.cache.visible = self.slot, self.slot + 1
            mask = self.valid[:, None, None, : self.slot + 1] if self.padded else None
            logits = self.dec._llama_step(ids, position_ids, mask, self.cache, self.table)
        self.slot += 1
        self.pos = self.pos + 1
        return logits[:rows].float()

    def reorder(self, index: torch.Tensor) -> None:
        if self.nrows > self.rows:
            index = torch.cat([index, index[:1].expand(self.nrows - self.rows)])
        self.cache.reorder(index)
        self.valid.copy_(self.valid.index_select(0, index))
        self.pos = self.pos.index_select(0, index)


class _T5State:
    def __init__(self, dec: Decoder, ks, vs, cks, cvs, cross_mask, rows, nrows, size):
        self.dec, self.ks, self.vs, self.cks, self.cvs = dec, ks, vs, cks, cvs
        self.cross_mask, self.rows, self.nrows, self.size = cross_mask, rows, nrows, size
        self.slot = 0
        if dec.compile:
            self.valid = torch.zeros((nrows, size), dtype=torch.bool, device=cks[0].device)
            self.fn = _compiled(dec, "t5", nrows, size)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        rows, nrows = self.rows, self.nrows
        if nrows > rows:
            tokens = torch.cat([tokens, tokens[:1].expand(nrows - rows)])
        if self.dec.compile:
            self.valid[:, self.slot] = True
            slot = torch.tensor([self.slot], device=tokens.device)
            logits = self.fn(tokens, slot, self.valid[:, None, None, :], self.ks, self.vs, self.cks, self.cvs,
                             self.cross_mask).clone()
        else:
            logits = self.dec._t5_step(tokens, self.slot, self.slot + 1, self.ks, self.vs, self.cks, self.cvs,
                                       None, self.cross_mask)
        self.slot += 1
        return logits[:rows].float()

    def reorder(self, index: torch.Tensor) -> None:
        if self.nrows > self.rows:
            index = torch.cat([index, index[:1].expand(self.nrows - self.rows)])
        for buf in self.ks + self.vs:
            buf.copy_(buf.index_select(0, index))
        if self.dec.compile:
            self.valid.copy_(self.valid.index_select(0, index))


def _compiled(dec: Decoder, kind: str, nrows: int, size: int):
    """The compiled step for this model (one torch.compile; static shapes per (batch, length) bucket)."""
    if dec._compiled is None:
        mode = "reduce-overhead" if dec.device.type == "cuda" else None
        if kind == "llama":
            def fn(ids, position_ids, mask4d, slot, k, v, table):
                cache = _LlamaCache(k, v)
                cache.slot, cache.visible = slot, None
                return dec._llama_step(ids, position_ids, mask4d, cache, table)
        else:
            def fn(ids, slot, self_mask, ks, vs, cks, cvs, cross_mask):
                return dec._t5_step(ids, slot, None, ks, vs, cks, cvs, self_mask, cross_mask)
        dec._compiled = torch.compile(fn, mode=mode, dynamic=False)
    return dec._compiled


# ------------------------------------------------------------------------------------------------- processors
def _repetition_penalty(scores: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty as generate applies it: every token already in the sequence (prompt included for a
    decoder-only model) has its score divided by the penalty (multiplied when negative)."""
    picked = torch.gather(scores, 1, seen)
    picked = torch.where(picked < 0, picked * penalty, picked / penalty)
    return scores.scatter(1, seen, picked)


def _process(scores, seen, n_new: int, s: Settings) -> torch.Tensor:
    if s.repetition_penalty != 1.0:
        scores = _repetition_penalty(scores, seen, s.repetition_penalty)
    if n_new < s.min_new_tokens and s.eos:
        scores[:, s.eos] = float("-inf")  # in place: scores is this step's own tensor
    return scores


def _sample(scores: torch.Tensor, s: Settings, gen: torch.Generator) -> torch.Tensor:
    if s.temperature != 1.0:
        scores = scores / s.temperature
    if s.top_k and s.top_k < scores.shape[-1]:
        kth = torch.topk(scores, s.top_k)[0][..., -1, None]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if s.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=False)
        cum = sorted_scores.softmax(-1).cumsum(-1)
        drop = cum <= (1 - s.top_p)
        drop[..., -1:] = False  # keep at least one token
        scores = scores.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    probs = scores.softmax(-1)
    return torch.multinomial(probs, 1, generator=gen)[:, 0]


def _greedy_or_sample(state, logits, prompt_ids, s: Settings) -> torch.Tensor:
    rows = logits.shape[0]
    dev = logits.device
    eos = torch.tensor(s.eos, device=dev) if s.eos else None
    seen = torch.empty((rows, prompt_ids.shape[1] + s.max_new_tokens), dtype=torch.long, device=dev)
    seen[:, : prompt_ids.shape[1]] = prompt_ids
    n_seen = prompt_ids.shape[1]
    gen = None
    if s.do_sample:
        gen = torch.Generator(device=dev)
        gen.manual_seed(s.seed)
    unfinished = torch.ones(rows, dtype=torch.bool, device=dev)
    new = []
    for step in range(s.max_new_tokens):
        scores = _process(logits, seen[:, :n_seen], step, s)
        tok = _sample(scores, s, gen) if s.do_sample else scores.argmax(-1)
        tok = torch.where(unfinished, tok, torch.full_like(tok, s.pad))
        new.append(tok)
        seen[:, n_seen] = tok
        n_seen += 1
        if eos is not None:
            unfinished &= ~torch.isin(tok, eos)
            if not bool(unfinished.any()):
                break
        if step + 1 == s.max_new_tokens:
            break
        logits = state.step(tok)
    return torch.stack(new, 1) if new else prompt_ids[:, :0]


def _beam_search(state, logits, prompt_ids, s: Settings, batch: int, prompt_len: int) -> torch.Tensor:
    """Beam search as `generate` runs it (same candidates, scores, length penalty and stopping), on rows laid out
    batch-major ([study0 beam0, study0 beam1, ...]). Returns the best beam's new tokens per study."""
    nb = s.num_beams
    dev = logits.device
    V = logits.shape[-1]
    max_len = prompt_len + s.max_new_tokens
    keep = max(2, 1 + len(s.eos)) * nb
    eos = torch.tensor(s.eos, device=dev) if s.eos else None
    fill = s.pad or (s.eos[0] if s.eos else -1)  # generate's fill value (a pad id of 0 falls through to EOS)
    running = torch.full((batch, nb, max_len), fill, dtype=torch.long, device=dev)
    running[:, :, :prompt_len] = prompt_ids.view(batch, nb, -1)
    sequences = running.clone()
    run_scores = torch.zeros((batch, nb), dtype=torch.float, device=dev)
    run_scores[:, 1:] = -1e9
    fin_scores = torch.full((batch, nb), -1e9, dtype=torch.float, device=dev)
    finished = torch.zeros((batch, nb), dtype=torch.bool, device=dev)
    improvable = torch.ones((batch, 1), dtype=torch.bool, device=dev)
    hits = torch.zeros((batch, nb), dtype=torch.bool, device=dev)
    run_hist = torch.full((batch, nb, s.max_new_tokens), -1, dtype=torch.int32, device=dev)
    fin_hist = run_hist.clone()
    top_mask = torch.cat([torch.ones(nb, dtype=torch.bool), torch.zeros(keep - nb, dtype=torch.bool)]).to(dev)
    offset = torch.arange(batch, device=dev).view(-1, 1) * nb
    cur = prompt_len
    while True:
        flat = running[:, :, :cur].reshape(batch * nb, cur)
        lp = torch.log_softmax(logits, dim=-1)
        lp = _process(lp, flat, cur - prompt_len, s)
        lp = (lp.view(batch, nb, V) + run_scores[:, :, None]).view(batch, nb * V)
        top_lp, top_idx = torch.topk(lp, k=keep)
        src = top_idx // V
        tok = top_idx % V
        top_seq = torch.take_along_dim(running, src[:, :, None], dim=1)
        top_seq[:, :, cur] = tok
        top_hist = torch.take_along_dim(run_hist, src[:, :, None], dim=1)
        top_hist[:, :, cur - prompt_len] = (src + offset).to(torch.int32)
        hits = torch.isin(tok, eos) if eos is not None else torch.zeros_like(tok, dtype=torch.bool)
        if cur + 1 >= max_len:
            hits = torch.ones_like(hits)
        # the best `nb` candidates that did not just finish keep running
        alive_lp = top_lp + hits.to(torch.float32) * -1.0e9
        nxt = torch.topk(alive_lp, k=nb)[1]
        running = torch.take_along_dim(top_seq, nxt[:, :, None], dim=1)
        run_scores = torch.take_along_dim(alive_lp, nxt, dim=1)
        run_hist = torch.take_along_dim(top_hist, nxt[:, :, None], dim=1)
        # candidates that finished among the top `nb` compete with the finished hypotheses
        just = hits & top_mask[None, :]
        cand = top_lp / ((cur + 1 - prompt_len) ** s.length_penalty)
        full = torch.all(finished, dim=-1, keepdim=True) & (s.early_stopping is True)
        cand = cand + full.to(torch.float32) * -1.0e9
        cand = cand + (~improvable).to(torch.float32) * -1.0e9
        cand = cand + (~just) * -1.0e9
        m_scores = torch.cat([fin_scores, cand], 1)
        best = torch.topk(m_scores, k=nb)[1]
        sequences = torch.take_along_dim(torch.cat([sequences, top_seq], 1), best[:, :, None], dim=1)
        fin_hist = torch.take_along_dim(torch.cat([fin_hist, top_hist], 1), best[:, :, None], dim=1)
        finished = torch.take_along_dim(torch.cat([finished, just], 1), best, dim=1)
        fin_scores = torch.take_along_dim(m_scores, best, dim=1)
        beam_src = run_hist[:, :, cur - prompt_len].reshape(-1).long()
        cur += 1
        # generate's early-stop heuristic (early_stopping=False: the best running beam scored at today's length)
        if s.early_stopping == "never" and s.length_penalty > 0.0:
            best_len = max_len - prompt_len
        else:
            best_len = cur - prompt_len
        best_possible = run_scores[:, :1] / (best_len ** s.length_penalty)
        worst = torch.where(finished, torch.min(fin_scores, dim=1, keepdim=True)[0], -1.0e9)
        improvable = improvable & torch.any(best_possible > worst, dim=-1, keepdim=True)
        go = bool(torch.any(improvable)) and not (bool(torch.all(finished)) and s.early_stopping is True) \
            and not bool(torch.all(hits))
        if not go:
            break
        state.reorder(beam_src)
        logits = state.step(running[:, :, cur - 1].reshape(-1))
    best_seq = sequences[:, 0]
    n = int((fin_hist[:, 0] + 1).bool().sum(1).max())
    return best_seq[:, prompt_len: prompt_len + n]


def decoder_for(model, compile: bool = False) -> Decoder:
    """The model's Decoder (made once per model and compile setting: compiled graphs live in it)."""
    dec = model.__dict__.get("_clinicalblip_decoder")
    if dec is None or dec.model is not model or dec.compile != (bool(compile) and not refuse_compile_reason(model)):
        dec = Decoder(model, compile=compile)
        model.__dict__["_clinicalblip_decoder"] = dec
    return dec


def default_compile(device) -> bool:
    """compile's default ("auto"): on for CUDA, off on the CPU.

    Measured (benchmarks/decode_speed.py, demo-sized tiny release, one thread): the compiled step is faster per
    token than the eager static-cache loop, but inductor's first compile of one (batch, length) bucket takes
    ~40-80 s on a 2-core CPU (~10-20 s when the compile cache directory already holds it), which a one-off
    `generate` or a CPU server does not win back. On CUDA, compilation with CUDA graphs is what removes the
    per-step launch overhead, so it is on by default there.
    """
    return torch.device(device).type == "cuda"


def warm_up(rm, batch_sizes=(1,), max_new_tokens: int | None = None) -> dict:
    """Generate once for each batch size on a synthetic study (black views, a short indication), so that the
    compiled shapes the first requests need exist before they arrive. Returns the seconds each took."""
    from PIL import Image

    size = rm.processor.image_processor.size
    img = Image.new("RGB", (size.get("width", 224), size.get("height", 224)))
    rec = {"id": "warm-up", "images": [{"image": img, "view": "PA"}, {"image": img, "view": "LATERAL"}],
           "indication": "Cough.", "history": None, "comparison": None}
    collate = rm.collator()
    took, t_all = {}, time.perf_counter()
    for b in batch_sizes:
        batch = collate([dict(rec, id=f"warm-up-{i}") for i in range(b)])
        t0 = time.perf_counter()
        rm.generate_batch(batch, max_new_tokens=max_new_tokens or rm.max_new_tokens)
        took[str(b)] = round(time.perf_counter() - t0, 2)
    return {"compile": bool(rm.compile), "batch_seconds": took, "total_s": round(time.perf_counter() - t_all, 2),
            "compile_cache_dir": compile_cache_dir() if rm.compile else None}


def warm_batch_sizes(max_batch: int) -> tuple[int, ...]:
    """The batch buckets a server with this --max-batch can fill."""
    sizes = [b for b in BATCH_BUCKETS if b < max_batch] + [_bucket(max_batch)]
    return tuple(dict.fromkeys(sizes))
