"""The ONNX Runtime peer of the benchmark: T5 as three ONNX graphs and a lean numpy decoding loop.

This is how Optimum's ORTModelForSeq2SeqLM runs T5: an encoder graph, a graph that computes the
cross-attention keys/values once, and one decoder-step graph that takes the past self-attention
keys/values and returns them grown by one position. The graphs are exported (TorchScript
exporter) from a functional T5 written over the checkpoint's own state dict, so every family the
suite measures (T5 v1.0, mT5, umT5) runs the reference's weights and maths. ``int8`` applies
ONNX Runtime's dynamic quantization to the exported graphs.

Greedy and beam search (eos disabled, fixed length: the benchmark's setting) are numpy loops over
``InferenceSession.run``; beam search keeps the best ``num_beams`` of ``2 * num_beams`` candidates
per step, as the reference does when no hypothesis can finish.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from t5kit.modeling import relative_position_bucket


class _Functional(nn.Module):
    """T5 maths over a reference state dict: the three graphs are methods selected by ``mode``."""

    def __init__(self, state: dict[str, torch.Tensor], config: dict, mode: str) -> None:
        super().__init__()
        self.s, self.c, self.mode = state, config, mode
        self.h, self.d = config["num_heads"], config["d_kv"]
        self.gated = config.get("feed_forward_proj", "relu").startswith("gated")
        act = config.get("feed_forward_proj", "relu").split("-")[-1]
        self.act = F.relu if act == "relu" else (lambda x: F.gelu(x, approximate="tanh")) if act == "gelu" else F.silu
        self.n_enc, self.n_dec = config["num_layers"], config.get("num_decoder_layers") or config["num_layers"]

    def _norm(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return self.s[name] * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.c.get("layer_norm_epsilon", 1e-6)))

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], x.shape[1], self.h, self.d).transpose(1, 2)  # (B, H, T, D)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, o: str) -> torch.Tensor:
        w = torch.softmax(q @ k.transpose(-1, -2) + bias, dim=-1)
        out = (w @ v).transpose(1, 2)
        return out.reshape(out.shape[0], out.shape[1], self.h * self.d) @ self.s[o].t()

    def _ff(self, x: torch.Tensor, p: str) -> torch.Tensor:
        if self.gated:
            x = self.act(x @ self.s[p + "wi_0.weight"].t()) * (x @ self.s[p + "wi_1.weight"].t())
        else:
            x = self.act(x @ self.s[p + "wi.weight"].t())
        return x @ self.s[p + "wo.weight"].t()

    def _rel_bias(self, stack: str, i: int, buckets: torch.Tensor, attn: str) -> torch.Tensor | None:
        table = self.s.get(f"{stack}.block.{i}.layer.0.{attn}.relative_attention_bias.weight")
        return None if table is None else F.embedding(buckets, table).permute(2, 0, 1).unsqueeze(0)  # (1, H, T, K)

    def encode(self, ids: torch.Tensor, mask: torch.Tensor, buckets: torch.Tensor) -> torch.Tensor:
        x = F.embedding(ids, self.s["shared.weight"])
        pad = (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
        bias = None
        for i in range(self.n_enc):
            p = f"encoder.block.{i}.layer."
            rel = self._rel_bias("encoder", i, buckets, "SelfAttention")
            bias = rel + pad if rel is not None else bias
            h = self._norm(x, p + "0.layer_norm.weight")
            a = p + "0.SelfAttention."
            q, k, v = (self._heads(h @ self.s[a + n + ".weight"].t()) for n in "qkv")
            x = x + self._attend(q, k, v, bias, a + "o.weight")
            x = x + self._ff(self._norm(x, p + "1.layer_norm.weight"), p + "1.DenseReluDense.")
        return self._norm(x, "encoder.final_layer_norm.weight")

    def cross(self, hidden: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for i in range(self.n_dec):
            a = f"decoder.block.{i}.layer.1.EncDecAttention."
            out += [self._heads(hidden @ self.s[a + "k.weight"].t()), self._heads(hidden @ self.s[a + "v.weight"].t())]
        return out

    def step(self, ids: torch.Tensor, enc_bias: torch.Tensor, buckets: torch.Tensor, *caches: torch.Tensor):
        past, cross = caches[: 2 * self.n_dec], caches[2 * self.n_dec :]
        x = F.embedding(ids, self.s["shared.weight"])  # (B, 1, d)
        bias, new = None, []
        for i in range(self.n_dec):
            p = f"decoder.block.{i}.layer."
            rel = self._rel_bias("decoder", i, buckets, "SelfAttention")
            bias = rel if rel is not None else bias
            h = self._norm(x, p + "0.layer_norm.weight")
            a = p + "0.SelfAttention."
            q, k, v = (self._heads(h @ self.s[a + n + ".weight"].t()) for n in "qkv")
            k, v = torch.cat([past[2 * i], k], 2), torch.cat([past[2 * i + 1], v], 2)
            new += [k, v]
            x = x + self._attend(q, k, v, bias, a + "o.weight")
            h = self._norm(x, p + "1.layer_norm.weight")
            a = p + "1.EncDecAttention."
            q = self._heads(h @ self.s[a + "q.weight"].t())
            x = x + self._attend(q, cross[2 * i], cross[2 * i + 1], enc_bias, a + "o.weight")
            x = x + self._ff(self._norm(x, p + "2.layer_norm.weight"), p + "2.DenseReluDense.")
        x = self._norm(x, "decoder.final_layer_norm.weight")[:, 0]
        if self.c.get("scale_decoder_outputs", self.c.get("tie_word_embeddings", True)):
            x = x * self.c["d_model"] ** -0.5
        head = self.s.get("lm_head.weight", self.s["shared.weight"])
        return (x @ head.t(), *new)

    def forward(self, *args: torch.Tensor):
        return getattr(self, self.mode)(*args)


def _constants_to_initializers(path: str) -> None:
    """Rewrite the graph at ``path`` with its Constant nodes as initializers. The TorchScript exporter
    writes the weights (plain tensors of the state dict, not module parameters) as Constant nodes;
    ONNX Runtime's ``quantize_dynamic`` quantizes only MatMuls whose weight is an initializer, so
    without this it left every product in float32. (ONNX Runtime itself turns Constant nodes into
    initializers when it loads a graph, so the float32 sessions run the same either way.)"""
    import onnx

    model = onnx.load(path)
    graph, nodes = model.graph, []
    for node in graph.node:
        if node.op_type == "Constant" and [a.name for a in node.attribute] == ["value"]:
            tensor = onnx.TensorProto()
            tensor.CopyFrom(node.attribute[0].t)
            tensor.name = node.output[0]
            graph.initializer.append(tensor)
        else:
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.save(model, path)


class OrtT5:
    """Exported graphs of a checkpoint directory, run by ONNX Runtime sessions."""

    def __init__(self, model_dir: str, threads: int, int8: bool = False) -> None:
        import onnxruntime as ort
        from safetensors.torch import load_file

        self.config = json.loads((Path(model_dir) / "config.json").read_text())
        state = load_file(str(Path(model_dir) / "model.safetensors"))
        state = {k: v.float() for k, v in state.items()}
        c = self.config
        self.h, self.d, self.n_dec = c["num_heads"], c["d_kv"], c.get("num_decoder_layers") or c["num_layers"]
        self.work = tempfile.mkdtemp(prefix="ort-t5-")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.sessions = {}
        b, s = 2, 5
        layer_kv = [torch.zeros(b, self.h, s, self.d)] * (2 * self.n_dec)
        examples = {
            "encode": ((torch.ones(b, s, dtype=torch.long), torch.ones(b, s, dtype=torch.long),
                        torch.zeros(s, s, dtype=torch.long)), ["ids", "mask", "buckets"],
                       {"ids": {0: "b", 1: "s"}, "mask": {0: "b", 1: "s"}, "buckets": {0: "s", 1: "s2"}}),
            "cross": ((torch.zeros(b, s, c["d_model"]),), ["hidden"], {"hidden": {0: "b", 1: "s"}}),
            "step": ((torch.ones(b, 1, dtype=torch.long), torch.zeros(b, 1, 1, s), torch.zeros(1, 3, dtype=torch.long),
                      *[torch.zeros(b, self.h, 2, self.d)] * (2 * self.n_dec), *layer_kv),
                     ["ids", "enc_bias", "buckets"] + [f"past{i}" for i in range(2 * self.n_dec)]
                     + [f"cross{i}" for i in range(2 * self.n_dec)],
                     {"ids": {0: "b"}, "enc_bias": {0: "b", 3: "s"}, "buckets": {1: "k"},
                      **{f"past{i}": {0: "b", 2: "p"} for i in range(2 * self.n_dec)},
                      **{f"cross{i}": {0: "b", 2: "s"} for i in range(2 * self.n_dec)}}),
        }
        for mode, (args, names, axes) in examples.items():
            path = str(Path(self.work) / f"{mode}.onnx")
            with torch.no_grad():
                torch.onnx.export(_Functional(state, c, mode), args, path, input_names=names, dynamic_axes=axes,
                                  opset_version=17, dynamo=False)
            _constants_to_initializers(path)
            if int8:
                from onnxruntime.quantization import QuantType, quantize_dynamic

                quantize_dynamic(path, path.replace(".onnx", "-int8.onnx"), weight_type=QuantType.QInt8)
                path = path.replace(".onnx", "-int8.onnx")
            self.sessions[mode] = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])

    def _buckets(self, n: int, bidirectional: bool) -> np.ndarray:
        """(n, n) relative-position bucket ids, query positions down, key positions across."""
        pos = torch.arange(n)
        return relative_position_bucket(
            pos[None, :] - pos[:, None], bidirectional, self.config["relative_attention_num_buckets"],
            self.config.get("relative_attention_max_distance", 128),
        ).numpy()

    def encode(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return self.sessions["encode"].run(None, {"ids": ids, "mask": mask, "buckets": self._buckets(ids.shape[1], True)})[0]

    def generate(self, ids: np.ndarray, mask: np.ndarray, new_tokens: int, num_beams: int = 1) -> np.ndarray:
        """(B, 1 + new_tokens) int64: decoder start token then exactly ``new_tokens`` tokens."""
        b = ids.shape[0]
        hidden = self.encode(ids, mask)
        cross = self.sessions["cross"].run(None, {"hidden": hidden})
        enc_bias = ((1.0 - mask[:, None, None, :].astype(np.float32)) * np.finfo(np.float32).min).astype(np.float32)
        rows = b * num_beams
        if num_beams > 1:
            cross = [np.repeat(x, num_beams, axis=0) for x in cross]
            enc_bias = np.repeat(enc_bias, num_beams, axis=0)
        past = [np.zeros((rows, self.h, 0, self.d), np.float32)] * (2 * self.n_dec)
        seqs = np.full((rows, 1), self.config.get("decoder_start_token_id", 0), np.int64)
        scores = np.zeros((b, num_beams), np.float32)
        scores[:, 1:] = -1e9  # only the first beam is live at the start
        feeds = {"enc_bias": enc_bias, **{f"cross{i}": x for i, x in enumerate(cross)}}
        table = self._buckets(new_tokens, False)  # step t takes row t, keys 0..t
        for t in range(new_tokens):
            out = self.sessions["step"].run(None, {"ids": seqs[:, -1:], "buckets": table[t : t + 1, : t + 1], **feeds,
                                                   **{f"past{i}": x for i, x in enumerate(past)}})
            logits, past = out[0], out[1:]
            if num_beams == 1:
                seqs = np.concatenate([seqs, logits.argmax(-1)[:, None]], 1)
                continue
            logp = logits - logits.max(-1, keepdims=True)
            logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
            vocab = logp.shape[-1]
            cand = (scores.reshape(rows, 1) + logp).reshape(b, num_beams * vocab)
            top = np.argpartition(-cand, num_beams, axis=1)[:, :num_beams]  # the best, unordered
            top = np.take_along_axis(top, np.argsort(-np.take_along_axis(cand, top, 1), axis=1), 1)
            scores = np.take_along_axis(cand, top, 1)
            src = (np.arange(b)[:, None] * num_beams + top // vocab).reshape(-1)
            seqs = np.concatenate([seqs[src], (top % vocab).reshape(-1, 1)], 1)
            past = [x[src] for x in past]
        if num_beams == 1:
            return seqs
        best = scores.argmax(1)
        return seqs.reshape(b, num_beams, -1)[np.arange(b), best]
