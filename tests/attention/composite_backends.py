"""A composite backend that runs on the CPU (Triton under the interpreter for decode rows, the torch
reference for prefill rows), registered as ``"triton+torch"`` for runner-level tests."""
from attention.composite import composite_backend
from attention.selector import register_backend
from attention.torch_ref import TorchAttentionBackend
from attention.triton_attn import TritonAttentionBackend

TritonTorchComposite = composite_backend(TritonAttentionBackend, TorchAttentionBackend)
register_backend(TritonTorchComposite.name, f"{__name__}:TritonTorchComposite")
