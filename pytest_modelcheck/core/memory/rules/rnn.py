"""oneDNN's LSTM layer: its scratch while it runs and the workspace it returns for the backward
(docs/memory-model.md, "RNN")."""
from __future__ import annotations

from typing import Any, Optional

from ._common import _PAGE, _cdiv
from .registry import CPU_RULES


def _onednn_lstm_scratch(name: str, args: tuple) -> int:
    """What one oneDNN LSTM layer holds while it runs, above its outputs: the weights reordered
    to its layout (I and H rows of ld(4H) floats), the gates of every step, T*B*ld(4H), and one
    step's hidden state, B*ld(H), plus about four pages of smaller buffers; the backward holds
    the input weights' gradient in that layout too. Fitted to within about 25 KB on 54 shapes
    (T, B in 1..20, H in 8..128, I = 4 and 200); float32 LSTMs only."""
    inp, weight = args[0], args[1]
    mode = args[9] if name == "mkldnn_rnn_layer" else args[14]
    hidden = args[10] if name == "mkldnn_rnn_layer" else args[15]
    if int(mode) != 2 or str(inp.dtype) != "torch.float32" or inp.dim() != 3:
        return 0
    # (T, B, I) whatever the batch_first flag says, as for the workspace
    t, b, h, i = int(inp.shape[0]), int(inp.shape[1]), int(hidden), int(weight.shape[1])
    gates = _good_ld(4 * h) * 4
    held = (i + h) * gates + t * b * gates + b * _good_ld(h) * 4 + 4 * _PAGE
    return held + i * gates if name == "mkldnn_rnn_layer_backward" else held


def _good_ld(d: int) -> int:
    """oneDNN's leading dimension for RNN matrices of floats: ``d`` rounded up to 16, plus 16
    where that is a multiple of 256 (no 4K aliasing)."""
    d = _cdiv(d, 16) * 16
    return d + 16 if d % 256 == 0 else d


def _onednn_lstm_workspace(args: tuple) -> Optional[int]:
    """Bytes of the workspace ``aten.mkldnn_rnn_layer`` returns in training (one layer, one
    direction; kept for the backward), which its fake kernel returns empty; None where not
    modelled (not float32, or not an LSTM).

    oneDNN (cpu/rnn/rnn_utils) lays it out as seven page-aligned parts: the gates, T*B*ld(4H);
    the hidden states, T*B*ld(H); then (T+1)*B per part for the two layers of states the cell
    reads and writes, 2*(T+1)*B*ld(max(I, H)) for the layer states, 2*(T+1)*B*H for the cell
    states, and as much again for the gradients of both (the layer-state gradient twice);
    floats throughout, ld(d) rounds d up to 16 and adds 16 where that is a multiple of 256.
    Checked byte for byte on 240 shapes (T, B, H in 1..128, I = 4 and 200).
    """
    inp, hidden, mode, train = args[0], args[10], args[9], args[15]
    if not train or int(mode) != 2 or str(inp.dtype) != "torch.float32" or inp.dim() != 3:
        return None
    # the input arrives as (T, B, I) whatever its batch_first flag says (torch transposes first)
    t, b, h, i = int(inp.shape[0]), int(inp.shape[1]), int(hidden), int(inp.shape[2])
    ld = _good_ld
    states = 2 * (t + 1) * b * 4
    parts = [t * b * ld(4 * h) * 4, t * b * ld(h) * 4, states * ld(max(i, h)), states * h,
             states * ld(max(i, h)), states * ld(max(i, h)), states * h]
    offset = 0
    for size in parts:
        offset = _cdiv(offset, _PAGE) * _PAGE + size
    return _cdiv(offset, _PAGE) * _PAGE


@CPU_RULES.register("mkldnn_rnn_layer", "mkldnn_rnn_layer_backward")
def _lstm_layer(name: str, args: tuple, out: Any) -> int:
    return _onednn_lstm_scratch(name, args)
