"""Size limits, one object for both sides.

Defaults fit a 2-frame 1024x1024 request comfortably and stop a runaway sender from
filling Redis. Every field can be set from the environment: VLMQ_<FIELD>
(VLMQ_MAX_MESSAGE_BYTES, ...), read by the rules of schemas/settings.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional

from schemas import settings as tree


@dataclass(frozen=True)
class Limits:
    max_message_bytes: int = 16 * 1024 * 1024  # whole msgpack body
    max_frame_bytes: int = 8 * 1024 * 1024  # one image or array, raw or encoded
    max_image_side: int = 4096  # pixels, either side, raw or decoded
    max_text_bytes: int = 256 * 1024  # any one string, UTF-8 encoded
    max_messages: int = 256  # chat messages in one request
    max_choices: int = 1024  # admissible_commands
    max_new_tokens: int = 4096
    max_images: int = 16  # images in one request, across its messages
    max_prompt_tokens: int = 8192  # a chat request's prompt after templating, image tokens included
    # Decoding work per body, checked by a scan of the msgpack structure before anything is
    # built: every map key, map value, array item and scalar counts as one item.
    max_body_items: int = 65_536
    max_body_depth: int = 32  # nested maps and arrays

    @classmethod
    def from_env(cls, environ: Optional[Mapping[str, str]] = None) -> Limits:
        return tree.load(cls, environ)


DEFAULT_LIMITS = Limits()
