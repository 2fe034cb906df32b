"""The pieces every fused ONNX graph is built from: initializers, nodes, Linears (float, MatMulNBits, W8A8) and
norms, written once for the decoder graph (`export.onnx_fused`) and the encoder graph (`export.onnx_encoder`).

    MatMulNBits / MatMul                   a Linear: our integer codes, or float weights transposed
    QuantizeLinear + MatMulIntegerToFloat  a W8A8 Linear with static activations (one QuantizeLinear per
                                           shared input); per-token dynamic ones as the same ops spelled
                                           out (scale, round, cast, MatMulInteger, rescale)
    (Simplified)LayerNormalization         LayerNorm with its bias, or RMSNorm (Gemma's (1 + w) folded in)
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from export.fused_arch import norm_offset


def f32(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().cpu().numpy()


class Graph:
    """Nodes and initializers of one graph being written; `used` counts MatMulNBits nodes by bits."""

    def __init__(self, accuracy_level: int = 0) -> None:
        from onnx import TensorProto, helper, numpy_helper

        self.helper, self.numpy_helper, self.TensorProto = helper, numpy_helper, TensorProto
        self.accuracy_level = accuracy_level
        self.nodes: list[Any] = []
        self.inits: list[Any] = []
        self.consts: dict[str, np.ndarray] = {}
        self.used: dict[int, int] = {}
        self.quantized: dict[tuple, tuple[str, str, str]] = {}  # (input, grid) -> (uint8 codes, scale, zero)
        self.nbits_written: dict[int, tuple[list[str], dict[str, Any]]] = {}  # id(module) -> (inputs, attributes)
        self.inputs: list[Any] = []
        self.outputs: list[Any] = []

    def init(self, name: str, arr: np.ndarray) -> str:
        arr = np.asarray(arr)  # (np.ascontiguousarray would make a scalar 1-d)
        self.inits.append(self.numpy_helper.from_array(arr if arr.flags.c_contiguous else arr.copy(order="C"), name))
        return name

    def const(self, name: str, arr: np.ndarray) -> str:
        """A constant every node that needs it shares (one initializer, not one per Linear)."""
        if name not in self.consts:
            self.consts[name] = arr
            self.init(name, arr)
        elif not np.array_equal(self.consts[name], arr):  # two meanings of one name: a bug in a graph builder
            raise AssertionError(f"constant {name!r} written twice with different values")
        return name

    def node(self, op: str, inputs: list[str], outputs: list[str], domain: str = "", **attrs) -> list[str]:
        self.nodes.append(self.helper.make_node(op, inputs, outputs, name=f"{op}_{len(self.nodes)}", domain=domain,
                                                **attrs))
        return outputs

    def io(self, name: str, elem: str, shape: list, *, output: bool = False) -> None:
        """Declare a graph input (or output) of element type `elem` ("FLOAT", "INT64")."""
        info = self.helper.make_tensor_value_info(name, getattr(self.TensorProto, elem), shape)
        (self.outputs if output else self.inputs).append(info)

    def model(self, name: str):
        """The ModelProto of what has been written (ONNX opset 18 and ONNX Runtime's contrib domain)."""
        graph = self.helper.make_graph(self.nodes, name, self.inputs, self.outputs, self.inits)
        return self.helper.make_model(graph, opset_imports=[self.helper.make_opsetid("", 18),
                                                            self.helper.make_opsetid("com.microsoft", 1)],
                                      producer_name="compress")

    def linear(self, x: str, mod: nn.Module, name: str) -> str:
        """x @ W^T (+ b) for a Linear, QuantLinear or W8A8Linear, named after the module."""
        from compress.quantize.qembedding import TiedHead
        from compress.quantize.qlinear import QuantLinear
        from compress.quantize.w8a8linear import W8A8Linear

        if isinstance(mod, TiedHead):  # the embedding's own blocks (written once), multiplied as a Linear
            mod, name = mod.embedding, mod.embedding_name
        out = f"{name}_out"
        mm = out if mod.bias is None else f"{name}_mm"
        if isinstance(mod, QuantLinear):
            ins, t = self.nbits(mod, name)
            self.node("MatMulNBits", [x, *ins], [mm], "com.microsoft", K=t["K"], N=t["N"], bits=t["bits"],
                      block_size=t["block_size"], accuracy_level=self.accuracy_level)
            self.used[t["bits"]] = self.used.get(t["bits"], 0) + 1
        elif isinstance(mod, W8A8Linear):
            self.int8_linear(x, mod, name, out)  # counted by the exporter (W8A8Linear modules), not in `used`
            return out
        elif isinstance(mod, nn.Linear):
            self.node("MatMul", [x, self.init(f"{name}.weight_t", f32(mod.weight).T)], [mm])
        else:
            raise ValueError(f"{name}: expected a Linear or QuantLinear, found {type(mod).__name__}")
        if mod.bias is not None:
            self.node("Add", [mm, self.init(f"{name}.bias", f32(mod.bias))], [out])
        return out

    def output_layer(self, x: str, head: nn.Module, embedding: nn.Module, name: str) -> str:
        """x @ head^T (+ b). A float head sharing the float embedding's matrix (written as "embed_tokens")
        multiplies by that initializer transposed when the session is created: one copy of it in the file."""
        if isinstance(head, nn.Linear) and isinstance(embedding, nn.Embedding) and \
                head.weight.data_ptr() == embedding.weight.data_ptr():
            self.node("Transpose", ["embed_tokens"], ["embed_tokens_t"], perm=[1, 0])
            out = self.node("MatMul", [x, "embed_tokens_t"], [f"{name}_mm" if head.bias is not None else
                                                               f"{name}_out"])[0]
            if head.bias is None:
                return out
            return self.node("Add", [out, self.init(f"{name}.bias", f32(head.bias))], [f"{name}_out"])[0]
        return self.linear(x, head, name)

    def nbits(self, mod: nn.Module, name: str) -> tuple[list[str], dict[str, Any]]:
        """A QuantLinear's MatMulNBits initializers (B, scales[, zero points]), written once per module: a tied
        head's MatMulNBits and the embedding's gather read the same ones."""
        from export.matmulnbits import matmulnbits_tensors

        key = id(mod)
        if key not in self.nbits_written:
            t = matmulnbits_tensors(mod, np.float32)
            ins = [self.init(f"{name}.qweight", t["B"]), self.init(f"{name}.scales", t["scales"])]
            if "zero_points" in t:
                ins.append(self.init(f"{name}.zero_points", t["zero_points"]))
            self.nbits_written[key] = (ins, {k: v for k, v in t.items() if not isinstance(v, np.ndarray)})
        return self.nbits_written[key]

    def quant_gather(self, ids: str, mod: nn.Module, name: str) -> str:
        """Rows `ids` of a QuantEmbedding, dequantized from its MatMulNBits blocks: gather the blocks of the
        rows, split each byte into its codes (low bits first), (code - zero) * scale, flatten, trim padding."""
        node, const = self.node, self.const
        ins, t = self.nbits(mod, name)
        if len(ins) > 2:
            raise ValueError(f"{name}: the ONNX graph gathers symmetric quantized embeddings only")
        bits, bs, K = t["bits"], t["block_size"], t["K"]
        node("Gather", [ins[0], ids], [f"{name}.rows"], axis=0)  # (batch, seq, blocks, bs * bits / 8) uint8
        if bits == 8:
            codes = f"{name}.rows"
        else:  # byte >> (bits * j) & mask, j = 0 .. 8 / bits - 1, on a new last axis, then flattened
            per = 8 // bits
            node("Unsqueeze", [f"{name}.rows", const("axes_last", np.array([-1], np.int64))], [f"{name}.rows1"])
            shifts = const(f"gather.shifts_{bits}", (np.arange(per) * bits).astype(np.uint8))
            node("BitShift", [f"{name}.rows1", shifts], [f"{name}.shifted"], direction="RIGHT")
            node("BitwiseAnd", [f"{name}.shifted", const(f"gather.mask_{bits}", np.array(2**bits - 1, np.uint8))],
                 [f"{name}.codes"])
            codes = f"{name}.codes"
        node("Cast", [codes], [f"{name}.codes_f"], to=self.TensorProto.FLOAT)
        node("Reshape", [f"{name}.codes_f", const(f"gather.blocks_{bs}", np.array([0, 0, -1, bs], np.int64))],
             [f"{name}.blocks"])  # (batch, seq, blocks, bs)
        node("Sub", [f"{name}.blocks", const(f"gather.zero_{bits}", np.array(2 ** (bits - 1), np.float32))],
             [f"{name}.centred"])
        node("Gather", [ins[1], ids], [f"{name}.row_scales"], axis=0)  # (batch, seq, blocks)
        node("Unsqueeze", [f"{name}.row_scales", const("axes_last", np.array([-1], np.int64))],
             [f"{name}.row_scales1"])
        node("Mul", [f"{name}.centred", f"{name}.row_scales1"], [f"{name}.values"])
        node("Reshape", [f"{name}.values", const("gather.flat", np.array([0, 0, -1], np.int64))], [f"{name}.flat"])
        out = f"{name}.flat"
        if K % bs:  # the last block's padding
            node("Slice", [out, const("gather.zero_i", np.array([0], np.int64)), const(f"gather.k_{K}",
                 np.array([K], np.int64)), const("axes_last", np.array([-1], np.int64))], [f"{name}.trimmed"])
            out = f"{name}.trimmed"
        return out

    def quantize_input(self, x: str, mod: nn.Module, name: str) -> tuple[str, str, str]:
        """uint8 codes of x on `mod`'s activation grid: the int8 grid shifted by 128 (the same integers - z)."""
        node, const = self.node, self.const
        if mod.activations == "static":
            s, z = float(mod.input_scale), int(mod.input_zero_point)
            key = (x, s, z)
            if key not in self.quantized:
                sn = self.init(f"{name}.input_scale", np.array(s, np.float32))
                zn = self.init(f"{name}.input_zero_point", np.array(z + 128, np.uint8))
                self.quantized[key] = (node("QuantizeLinear", [x, sn, zn], [f"{name}.input_q"])[0], sn, zn)
            return self.quantized[key]
        key = (x, "dynamic")
        if key not in self.quantized:  # symmetric per token: s = max|x| / 127 per row, as W8A8Linear's
            node("Abs", [x], [f"{name}.abs"])
            node("ReduceMax", [f"{name}.abs", const("axes_last", np.array([-1], np.int64))], [f"{name}.amax"],
                 keepdims=1)
            node("Div", [f"{name}.amax", const("w8a8.qmax", np.array(127, np.float32))], [f"{name}.s0"])
            node("Max", [f"{name}.s0", const("w8a8.tiny", np.array(1e-12, np.float32))], [f"{name}.scale"])
            node("Div", [x, f"{name}.scale"], [f"{name}.xs"])
            node("Round", [f"{name}.xs"], [f"{name}.r"])
            node("Add", [f"{name}.r", const("w8a8.shift", np.array(128, np.float32))], [f"{name}.ru"])
            node("Clip", [f"{name}.ru", const("w8a8.lo", np.array(0, np.float32)),
                          const("w8a8.hi", np.array(255, np.float32))], [f"{name}.rc"])
            node("Cast", [f"{name}.rc"], [f"{name}.input_q"], to=self.TensorProto.UINT8)
            self.quantized[key] = (f"{name}.input_q", f"{name}.scale",
                                   const("w8a8.zero_point_128", np.array(128, np.uint8)))
        return self.quantized[key]

    def int8_linear(self, x: str, mod: nn.Module, name: str, out: str) -> None:
        node = self.node
        xq, s, z = self.quantize_input(x, mod, name)
        # (in, out) uint8 = int8 + 128 with zero point 128: the same products, but ONNX Runtime's u8 x s8 kernels
        # on x86 without VNNI (vpmaddubsw) saturate pairs of products at int16 (logits off by > 1 on the tests'
        # tiny model on an AVX2 machine); its u8 x u8 kernels are exact everywhere
        w = self.init(f"{name}.weight_q", (mod.weight.cpu().numpy().T.astype(np.int16) + 128).astype(np.uint8))
        wz = self.const("w8a8.zero_point_128", np.array(128, np.uint8))
        w_scale = self.init(f"{name}.weight_scale", f32(mod.weight_scale).reshape(-1))  # (out,)
        bias = [self.init(f"{name}.bias", f32(mod.bias))] if mod.bias is not None else []
        if mod.activations == "static":
            node("MatMulIntegerToFloat", [xq, w, s, w_scale, z, wz, *bias], [out], "com.microsoft")
            return
        node("MatMulInteger", [xq, w, z, wz], [f"{name}.acc"])
        node("Cast", [f"{name}.acc"], [f"{name}.accf"], to=self.TensorProto.FLOAT)
        node("Mul", [f"{name}.accf", s], [f"{name}.rows"])
        node("Mul", [f"{name}.rows", w_scale], [out if not bias else f"{name}.mm"])
        if bias:
            node("Add", [f"{name}.mm", bias[0]], [out])

    def norm_params(self, module: nn.Module, name: str) -> tuple[list[str], float, bool]:
        """(weight[, bias] initializers, epsilon, whether it is a LayerNorm rather than an RMSNorm)."""
        if isinstance(module, nn.LayerNorm):
            return [self.init(f"{name}.weight", f32(module.weight)), self.init(f"{name}.bias", f32(module.bias))], \
                float(module.eps), True
        eps = float(getattr(module, "variance_epsilon", getattr(module, "eps", None)))
        return [self.init(f"{name}.weight", f32(module.weight) + norm_offset(module))], eps, False  # Gemma: 1 + w

    def plain_norm(self, x: str, module: nn.Module, name: str) -> str:
        """The norm of one tensor over its last axis."""
        params, eps, layer_norm = self.norm_params(module, name)
        op = "LayerNormalization" if layer_norm else "SimplifiedLayerNormalization"
        return self.node(op, [x, *params], [f"{name}_out"], axis=-1, epsilon=eps, stash_type=1)[0]

    def skip_norm(self, x: str, skip: str, module: nn.Module, name: str) -> tuple[str, str]:
        """norm(x + skip) in one kernel: (the normed output, the sum)."""
        params, eps, layer_norm = self.norm_params(module, name)
        op = "SkipLayerNormalization" if layer_norm else "SkipSimplifiedLayerNormalization"
        out = self.node(op, [x, skip, *params], [f"{name}_out", "", "", f"{name}_resid"], "com.microsoft",
                        epsilon=eps)
        return out[0], out[3]

    def activation(self, x: str, act: str, name: str) -> str:
        """act(x) for the MLP activations the graphs take (`export.fused_arch.ACTIVATIONS`' values)."""
        if act == "silu":
            self.node("Sigmoid", [x], [f"{name}.sig"])
            return self.node("Mul", [x, f"{name}.sig"], [f"{name}.act"])[0]
        op = {"relu": ("Relu", ""), "gelu": ("Gelu", "com.microsoft"), "gelu_tanh": ("FastGelu", "com.microsoft")}
        if act not in op:
            raise ValueError(f"the fused ONNX graph does not support the activation {act!r}")
        return self.node(op[act][0], [x], [f"{name}.act"], op[act][1])[0]
