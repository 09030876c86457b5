"""Making images: model loading, the scheduler registry, the generation step.

torchao (the quant axis's backend) is imported by transformers whenever it is installed,
and at import it logs, in every process, warnings that concern only its optional C++
kernels (".so failed to load" for GPU kernels on a CPU machine, torch's deprecation of its
Enum registrations, diffusers' note about its tensor classes). They would break every
job's progress bar and say nothing about the run; real errors of torchao still surface.
"""

import logging

for _name in ("torchao", "torch.utils._pytree", "diffusers.quantizers.torchao.torchao_quantizer"):
    logging.getLogger(_name).setLevel(logging.ERROR)
