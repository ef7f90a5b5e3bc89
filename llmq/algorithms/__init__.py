"""Quantization algorithms: tensors in, codes/scales out (``QuantizedWeight`` for weights), never a model.

One class per algorithm (``add_batch`` for statistics where it needs data,
``quantize`` for the paper's loop). The model-level driver that feeds them is
``llmq.pipeline`` (weight-only methods); ``smoothquant`` belongs to W8A8 (``llmq.w8a8``).
"""

from llmq.algorithms.awq import AWQ
from llmq.algorithms.gptq import GPTQ
from llmq.algorithms.hqq import HQQ
from llmq.algorithms.rtn_clip import RTNClip, search_clip_qparams

__all__ = ["AWQ", "GPTQ", "HQQ", "RTNClip", "search_clip_qparams"]
