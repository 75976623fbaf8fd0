"""Benchmark harness behind `lora-ext bench` (see _harness for how timing works).

Each kernel family registers itself from its own module in this package (lora.py,
and one module per further family); importing the package registers all of them.
"""
from ._harness import *  # noqa: F401,F403  (the public harness API)
from ._output import *  # noqa: F401,F403  (tables, files, command line)
from . import lora  # noqa: F401,E402  (registers the "lora" family)
from . import llama_train  # noqa: F401,E402  (registers the "llama_train" family)
from . import dora  # noqa: F401,E402  (registers the "dora" family)
from . import nf4  # noqa: F401,E402  (registers the "nf4" family)
from . import bgmv  # noqa: F401,E402  (registers the "bgmv" family)
from . import qlora  # noqa: F401,E402  (registers the "qlora_train" family)
from . import conv  # noqa: F401,E402  (registers the "conv" family)
