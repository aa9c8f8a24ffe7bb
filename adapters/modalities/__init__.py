"""The built-in modality plug-ins, registered in this order (a part's `requires` first): one line each."""

from ..registry import register
from . import image, speech, video

register(image.SPEC)
register(video.SPEC)
register(speech.SPEC)
