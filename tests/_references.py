"""Hand-written references that need neither Hugging Face peft nor peftlab's own code paths.

Each function recomputes, from the base model's weights and an adapter's saved tensors, what the
adapted model must output. The prefix-tuning references build every attention by hand (the base
model's linear layers, norms and heads are only called as plain functions), so a wrong cache
layout, mask or position shift in peftlab disagrees with them, whatever transformers version runs.

The prefix layout they decode is the one peft's checkpoints define: ``prompt_embeddings`` is
(n, num_layers * 2 * kv_width); viewed as (n, num_layers * 2, kv_heads, head_dim), block ``2 l``
holds layer l's keys and block ``2 l + 1`` its values (keys already position-encoded: they are
cache entries).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

PROMPT_KEY = "prompt_embeddings"


# ----- LoRA --------------------------------------------------------------------------------------
def lora_linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                          lora_b: torch.Tensor, alpha: float, r: int, rslora: bool) -> torch.Tensor:
    """``x W^T + b + s x A^T B^T`` with ``s = alpha / sqrt(r)`` (rsLoRA) or ``alpha / r``, summed term by term."""
    scaling = alpha / math.sqrt(r) if rslora else alpha / r
    out = x @ weight.T + (bias if bias is not None else 0)
    return out + scaling * ((x @ lora_a.T) @ lora_b.T)


# ----- DoRA --------------------------------------------------------------------------------------
def dora_gradients(x: torch.Tensor, g: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                   magnitude: torch.Tensor, scaling: float) -> dict[str, torch.Tensor]:
    """Gradients of ``L = sum(g * y)`` for ``y = k * (x V^T) + b``, ``V = W + s B A``, ``k = m / ||V||_row``
    with the norm held constant (detached), written out by hand:

        dL/dm = sum_n g_n * (V x_n) / ||V||         dL/dA = s B^T diag(k) G^T X         dL/dB = s diag(k) G^T X A^T

    x (N, in), g (N, out), weight (out, in), lora_a (r, in), lora_b (out, r), magnitude (out,).
    """
    combined = weight + scaling * lora_b @ lora_a
    norm = combined.norm(dim=1)
    k = magnitude / norm
    weighted = k[:, None] * g.T  # (out, N): diag(k) G^T
    return {
        "magnitude": (g * (x @ combined.T)).sum(0) / norm,
        "lora_A": scaling * lora_b.T @ weighted @ x,
        "lora_B": scaling * weighted @ x @ lora_a.T,
    }


# ----- prefix tuning -----------------------------------------------------------------------------
def prefix_blocks(rows: torch.Tensor, layers: int, kv_heads: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (keys, values), each (kv_heads, n, head_dim), decoded from peft's row layout."""
    n = rows.shape[0]
    blocks = rows.reshape(n, layers * 2, kv_heads, -1).permute(1, 2, 0, 3)  # (2 * layers, heads, n, head_dim)
    return [(blocks[2 * i], blocks[2 * i + 1]) for i in range(layers)]


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_k: torch.Tensor, prefix_v: torch.Tensor,
           causal: bool, scale: float) -> torch.Tensor:
    """Softmax attention of q (B, H, T, d) over [prefix ; real] keys/values; prefix (Hkv, n, d), real (B, Hkv, T, d).

    Every query sees all ``n`` prefix positions; with ``causal`` real key j is seen by query i only if j <= i.
    Grouped-query attention: query head h reads key/value head h // (H / Hkv).
    """
    batch, heads, length, _ = q.shape
    keys = torch.cat((prefix_k.expand(batch, -1, -1, -1), k), dim=2)
    values = torch.cat((prefix_v.expand(batch, -1, -1, -1), v), dim=2)
    group = heads // keys.shape[1]
    keys, values = keys.repeat_interleave(group, dim=1), values.repeat_interleave(group, dim=1)
    scores = (q @ keys.transpose(-1, -2)) * scale  # (B, H, T, n + T)
    n = prefix_k.shape[1]
    if causal:
        seen = torch.ones(length, n + length, dtype=torch.bool)
        seen[:, n:] = torch.ones(length, length, dtype=torch.bool).tril()
        scores = scores.masked_fill(~seen, float("-inf"))
    return scores.softmax(-1) @ values


def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    batch, length, width = t.shape
    return t.view(batch, length, heads, width // heads).transpose(1, 2)


def _merge_heads(t: torch.Tensor) -> torch.Tensor:
    batch, heads, length, dim = t.shape
    return t.transpose(1, 2).reshape(batch, length, heads * dim)


def _rms(x: torch.Tensor, norm: nn.Module, eps: float) -> torch.Tensor:
    return norm.weight * (x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rotate(t: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary position encoding (Su et al. 2021) of t (B, H, T, d) at ``positions`` (T,), half-split layout."""
    dim = t.shape[-1]
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    angles = positions.double()[:, None] * inv_freq[None]  # (T, d/2)
    cos, sin = torch.cat((angles, angles), -1).cos().to(t.dtype), torch.cat((angles, angles), -1).sin().to(t.dtype)
    half = dim // 2
    rotated = torch.cat((-t[..., half:], t[..., :half]), dim=-1)
    return t * cos + rotated * sin


def llama_prefix_reference(model: nn.Module, rows: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits of a LlamaForCausalLM whose every layer also attends to the prefix (all-ones attention mask).

    Real tokens sit at positions n..n+T-1 (the prefix takes 0..n-1), as a cache of length n implies.
    """
    cfg = model.config
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = cfg.hidden_size // heads
    theta = getattr(cfg, "rope_theta", None) or cfg.rope_parameters["rope_theta"]
    n, length = rows.shape[0], input_ids.shape[1]
    positions = torch.arange(n, n + length)
    h = model.model.embed_tokens(input_ids)
    for layer, (pk, pv) in zip(model.model.layers, prefix_blocks(rows, cfg.num_hidden_layers, kv_heads)):
        attn = layer.self_attn
        x = _rms(h, layer.input_layernorm, cfg.rms_norm_eps)
        q = _rotate(_heads(attn.q_proj(x), heads), positions, theta)
        k = _rotate(_heads(attn.k_proj(x), kv_heads), positions, theta)
        v = _heads(attn.v_proj(x), kv_heads)
        h = h + attn.o_proj(_merge_heads(attend(q, k, v, pk, pv, causal=True, scale=head_dim ** -0.5)))
        x = _rms(h, layer.post_attention_layernorm, cfg.rms_norm_eps)
        mlp = layer.mlp
        h = h + mlp.down_proj(F.silu(mlp.gate_proj(x)) * mlp.up_proj(x))
    return model.lm_head(_rms(h, model.model.norm, cfg.rms_norm_eps))


def gpt2_prefix_reference(model: nn.Module, rows: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits of a GPT2LMHeadModel whose every block also attends to the prefix; positions start at n."""
    cfg = model.config
    heads, width = cfg.n_head, cfg.n_embd
    n, length = rows.shape[0], input_ids.shape[1]
    tr = model.transformer
    h = tr.wte(input_ids) + tr.wpe(torch.arange(n, n + length))
    for block, (pk, pv) in zip(tr.h, prefix_blocks(rows, cfg.n_layer, heads)):
        x = F.layer_norm(h, (width,), block.ln_1.weight, block.ln_1.bias, cfg.layer_norm_epsilon)
        q, k, v = block.attn.c_attn(x).split(width, dim=-1)
        out = attend(_heads(q, heads), _heads(k, heads), _heads(v, heads), pk, pv, causal=True, scale=(width // heads) ** -0.5)
        h = h + block.attn.c_proj(_merge_heads(out))
        x = F.layer_norm(h, (width,), block.ln_2.weight, block.ln_2.bias, cfg.layer_norm_epsilon)
        inner = block.mlp.c_fc(x)
        gelu_tanh = 0.5 * inner * (1 + torch.tanh(math.sqrt(2 / math.pi) * (inner + 0.044715 * inner.pow(3))))
        h = h + block.mlp.c_proj(gelu_tanh)
    h = F.layer_norm(h, (width,), tr.ln_f.weight, tr.ln_f.bias, cfg.layer_norm_epsilon)
    return model.lm_head(h)


def bert_prefix_reference(model: nn.Module, rows: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Class logits of a BertForSequenceClassification / RobertaForSequenceClassification whose every
    layer also attends (both ways) to the prefix; all-ones attention mask, token type 0.

    Position ids move past the n cached positions, as both models count a cache's length:
    BERT uses n..n+T-1, RoBERTa (no padding in the input) padding_idx + 1 + n + i.
    """
    cfg = model.config
    encoder_model = model.bert if hasattr(model, "bert") else model.roberta
    emb = encoder_model.embeddings
    heads, width = cfg.num_attention_heads, cfg.hidden_size
    n, length = rows.shape[0], input_ids.shape[1]
    positions = torch.arange(n, n + length)
    if hasattr(model, "roberta"):
        positions = positions + cfg.pad_token_id + 1
    h = emb.word_embeddings(input_ids) + emb.position_embeddings(positions) + emb.token_type_embeddings(torch.zeros_like(input_ids))
    h = F.layer_norm(h, (width,), emb.LayerNorm.weight, emb.LayerNorm.bias, cfg.layer_norm_eps)
    for layer, (pk, pv) in zip(encoder_model.encoder.layer, prefix_blocks(rows, cfg.num_hidden_layers, heads)):
        sa = layer.attention.self
        out = attend(_heads(sa.query(h), heads), _heads(sa.key(h), heads), _heads(sa.value(h), heads), pk, pv,
                     causal=False, scale=(width // heads) ** -0.5)
        ao = layer.attention.output
        h = F.layer_norm(ao.dense(_merge_heads(out)) + h, (width,), ao.LayerNorm.weight, ao.LayerNorm.bias, cfg.layer_norm_eps)
        inner = F.gelu(layer.intermediate.dense(h))
        lo = layer.output
        h = F.layer_norm(lo.dense(inner) + h, (width,), lo.LayerNorm.weight, lo.LayerNorm.bias, cfg.layer_norm_eps)
    if hasattr(model, "bert"):
        pooled = torch.tanh(encoder_model.pooler.dense(h[:, 0]))
        return model.classifier(pooled)
    head = model.classifier  # RoBERTa: dense -> tanh -> out_proj on the <s> token
    return head.out_proj(torch.tanh(head.dense(h[:, 0])))


def t5_prefix_reference(model: nn.Module, rows: torch.Tensor, input_ids: torch.Tensor,
                        decoder_input_ids: torch.Tensor) -> torch.Tensor:
    """Logits of a T5ForConditionalGeneration whose decoder self-attention also attends to the prefix.

    The encoder and cross-attention are untouched. peft's seq2seq layout doubles the row blocks and
    reads them in groups of four (self k, self v, cross k, cross v), so decoder layer i takes blocks
    4i and 4i + 1 modulo 2 * num_layers. T5 attention is unscaled and carries a relative position
    bias (layer 0's table, shared by all layers) from query positions n..n+T-1 to keys 0..n+T-1.
    """
    from transformers.models.t5.modeling_t5 import T5Attention

    cfg = model.config
    heads, layers = cfg.num_heads, cfg.num_decoder_layers
    n, length = rows.shape[0], decoder_input_ids.shape[1]
    blocks = rows.reshape(n, layers * 2, heads, -1).permute(1, 2, 0, 3)
    encoded = model.encoder(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)).last_hidden_state
    decoder = model.decoder
    table = decoder.block[0].layer[0].SelfAttention.relative_attention_bias
    relative = torch.arange(n + length)[None, :] - torch.arange(n, n + length)[:, None]  # key - query
    buckets = T5Attention._relative_position_bucket(relative, bidirectional=False, num_buckets=cfg.relative_attention_num_buckets,
                                                    max_distance=cfg.relative_attention_max_distance)
    bias = table(buckets).permute(2, 0, 1)[None]  # (1, heads, T, n + T)
    seen = torch.ones(length, n + length, dtype=torch.bool)
    seen[:, n:] = torch.ones(length, length, dtype=torch.bool).tril()
    eps = cfg.layer_norm_epsilon
    h = decoder.embed_tokens(decoder_input_ids)
    for i, block in enumerate(decoder.block):
        sa = block.layer[0].SelfAttention
        x = _rms(h, block.layer[0].layer_norm, eps)
        keys = torch.cat((blocks[(4 * i) % (2 * layers)].expand(h.shape[0], -1, -1, -1), _heads(sa.k(x), heads)), dim=2)
        values = torch.cat((blocks[(4 * i + 1) % (2 * layers)].expand(h.shape[0], -1, -1, -1), _heads(sa.v(x), heads)), dim=2)
        scores = (_heads(sa.q(x), heads) @ keys.transpose(-1, -2) + bias).masked_fill(~seen, float("-inf"))
        h = h + sa.o(_merge_heads(scores.softmax(-1) @ values))
        ca = block.layer[1].EncDecAttention
        x = _rms(h, block.layer[1].layer_norm, eps)
        scores = _heads(ca.q(x), heads) @ _heads(ca.k(encoded), heads).transpose(-1, -2)
        h = h + ca.o(_merge_heads(scores.softmax(-1) @ _heads(ca.v(encoded), heads)))
        ff = block.layer[2].DenseReluDense
        h = h + ff.wo(F.relu(ff.wi(_rms(h, block.layer[2].layer_norm, eps))))
    h = _rms(h, decoder.final_layer_norm, eps)
    if cfg.tie_word_embeddings:  # T5 rescales before a tied output layer
        h = h * cfg.d_model ** -0.5
    return model.lm_head(h)


PREFIX_REFERENCES = {
    "LlamaForCausalLM": llama_prefix_reference,
    "GPT2LMHeadModel": gpt2_prefix_reference,
    "BertForSequenceClassification": bert_prefix_reference,
    "RobertaForSequenceClassification": bert_prefix_reference,
    "T5ForConditionalGeneration": t5_prefix_reference,  # takes decoder_input_ids too
}


def with_saved_heads(base: nn.Module, saved: dict[str, torch.Tensor]) -> nn.Module:
    """A copy of ``base`` whose heads take the adapter's saved values (prompt methods save them as
    ``base_model.<head path>.<tensor>``, peft's layout); the prefix rows are left out."""
    import copy

    model = copy.deepcopy(base)
    heads = {k[len("base_model."):]: v for k, v in saved.items() if k != PROMPT_KEY}
    missing = set(heads) - set(model.state_dict())
    assert not missing, f"saved head tensors the base model has no place for: {sorted(missing)}"
    model.load_state_dict(heads, strict=False)
    return model


def prefix_reference_logits(base: nn.Module, saved: dict[str, torch.Tensor], input_ids: torch.Tensor,
                            decoder_input_ids: torch.Tensor | None = None) -> torch.Tensor:
    """What a prefix-tuned ``base`` with these saved tensors must output for ``input_ids`` (eval mode, no grad)."""
    model = with_saved_heads(base, saved).eval()
    with torch.no_grad():
        if decoder_input_ids is not None:
            return t5_prefix_reference(model, saved[PROMPT_KEY], input_ids, decoder_input_ids)
        return PREFIX_REFERENCES[type(base).__name__](model, saved[PROMPT_KEY], input_ids)


def prompt_reference_logits(base: nn.Module, kind: str, saved: dict[str, torch.Tensor], num_virtual_tokens: int,
                            input_ids: torch.Tensor, decoder_input_ids: torch.Tensor | None = None) -> torch.Tensor | None:
    """Reference logits of a prompt method, or None where no reference is written.

    ``kind`` "prefix": the hand-built attention above. "embeddings" (prompt tuning, P-tuning; Lester et
    al. 2021): the saved rows go in front of the base model's own input embeddings, with the attention
    mask covering them; causal-LM logits keep the n virtual positions in front, as peft's do.
    """
    if kind == "prefix":
        if type(base).__name__ not in PREFIX_REFERENCES:
            return None
        return prefix_reference_logits(base, saved, input_ids, decoder_input_ids)
    model = with_saved_heads(base, saved).eval()
    with torch.no_grad():
        embeds = model.get_input_embeddings()(input_ids)
        rows = saved[PROMPT_KEY][:num_virtual_tokens].to(embeds.dtype)
        inputs = {"inputs_embeds": torch.cat((rows.expand(input_ids.shape[0], -1, -1), embeds), dim=1)}
        inputs["attention_mask"] = torch.ones(inputs["inputs_embeds"].shape[:2], dtype=torch.long)
        if decoder_input_ids is not None:
            inputs["decoder_input_ids"] = decoder_input_ids
        return model(**inputs).logits


def greedy_by_reference(forward, start: torch.Tensor, steps: int, eos: int | None, pad: int | None) -> torch.Tensor:
    """Greedy decoding with a full recompute per step: ``forward(sequence) -> logits`` whose last position
    predicts the next token; ``start`` is the prompt (decoder-only) or the decoder start column (seq2seq).
    Rows that produced EOS continue with the pad token, as ``generate`` does."""
    out = start
    done = torch.zeros(start.shape[0], dtype=torch.bool)
    for _ in range(steps):
        step = forward(out)[:, -1].argmax(-1)
        step = torch.where(done, torch.full_like(step, pad if pad is not None else 0), step)
        done |= step == eos if eos is not None else torch.zeros_like(done)
        out = torch.cat((out, step[:, None]), dim=1)
    return out
