"""Media for multimodal requests: payload decoders and encoders, content parts, adapters, processors.

- :mod:`~mmer_dist.media.decode`: PNG/JPEG, WAV, video files, ``.npy`` point clouds -> arrays, with limits;
- :mod:`~mmer_dist.media.encode`: the inverse, for clients and tests;
- :mod:`~mmer_dist.media.parts`: OpenAI-style content parts <-> raw media (what the endpoint does per part type);
- :mod:`~mmer_dist.media.adapters`: audio / point clouds -> the image a model's processor takes (``mmer_adapter.json``);
- :mod:`~mmer_dist.media.processor`: a checkpoint's own HF processor, offline (Video-LLaVA without torchvision).
"""

from mmer_dist.media.adapters import (
    ADAPTER_FILE, MediaAdapter, PointProjectionAdapter, SpectrogramAdapter, adapter_from_config, load_adapter,
    save_adapter,
)
from mmer_dist.media.decode import Waveform, decode_image, decode_points, decode_video, decode_wav
from mmer_dist.media.encode import encode_png, encode_points, encode_video, encode_wav
from mmer_dist.media.parts import MEDIA_PART_TYPES, MediaLimits, decode_part, media_part

__all__ = [
    "ADAPTER_FILE", "MEDIA_PART_TYPES", "MediaAdapter", "MediaLimits", "PointProjectionAdapter", "SpectrogramAdapter",
    "Waveform", "adapter_from_config", "decode_image", "decode_part", "decode_points", "decode_video", "decode_wav",
    "encode_png", "encode_points", "encode_video", "encode_wav", "load_adapter", "media_part", "save_adapter",
]
