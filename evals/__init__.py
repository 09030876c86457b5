"""Metrics on arrays: features, FID, KID, CLIP score, diversity, reports.

torchao's import-time warnings are kept off the console here too, as in pipelines/__init__.py
(evals imports no pipelines module): transformers imports torchao whenever it is installed.
"""

import logging

for _name in ("torchao", "torch.utils._pytree", "diffusers.quantizers.torchao.torchao_quantizer"):
    logging.getLogger(_name).setLevel(logging.ERROR)
