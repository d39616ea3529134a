"""What the rank fork server (compat.launch.forkserver) imports once: the stack, CPU workarounds applied."""

from compat.rank import workarounds

workarounds.apply("cpu")

import megatron.bridge.training.checkpointing  # noqa: E402, F401
import peft  # noqa: E402, F401
import transformers  # noqa: E402, F401
from megatron.bridge import AutoBridge  # noqa: E402, F401
from megatron.bridge.models.gpt_provider import local_layer_spec  # noqa: E402, F401
